"""Continual fine-tuning, measured: a sequence of three tasks learned one after another under six strategies.

Tasks (examples/tasks/generate.py; each with its own held-out test set and metric): `extract` (clause type and
parties as JSON, field_f1), `risk` (low/medium/high, accuracy), `dates` (dates and amounts as JSON, field_f1),
learned in that order. Strategies, all LoRA (same rank, targets, learning rate, steps per task, seed):
    seq          naive sequential fine-tuning (SeqFT): one adapter, trained on task 1, then 2, then 3
    replay       as seq, plus a reservoir replay buffer of earlier tasks' training records mixed into each stage
    ewc          as seq, plus the online-EWC penalty (empirical Fisher, train/ewc.py) of the earlier stages
    progressive  a new adapter per task on top of the frozen earlier ones; task j is evaluated with adapters 1..j
    olora        as progressive, plus O-LoRA's orthogonality penalty (Wang et al. 2023) between the new adapter's A
                 and the frozen ones' (--olora-lambda); every task is evaluated with ALL adapters active (no task
                 identity at test time, as in the paper), so its R[i][j] for j < i is measured, not reused
    merged:C     one adapter per task trained independently from the base, merged with peft combination C
                 (cat = task arithmetic, the exact sum of the deltas; ties = TIES, density 0.5)
    joint        one adapter on the equal-weight mixture of all tasks for T x the steps (the multi-task upper bound)
Stage 1 (a fresh adapter on task 1) is the same model for every strategy but joint; it is trained once.

Reported per strategy: R[i][j] = metric on task j after stage i (row 0 = the base model; j > i is not measured),
final average accuracy ACC = mean_j R[T][j], backward transfer BWT = mean_{j<T} (R[T][j] - R[j][j]), and
forgetting against the base on general inputs (eval/forgetting.py): KL drift = mean KL(base || tuned) over the
positions of K general prompts, probe retention = multiple-choice probe accuracy tuned / base. Where an entry is
the same model as an earlier measured one (progressive's R[i][j] for j < i uses exactly adapters 1..j; row 1 of
merged is the stage-1 adapter), the earlier measurement is reused and marked `reused` in the JSON.

    python bench/continual_bench.py --quick --json          # tiny random model: shape and invariants (CI)
    python bench/continual_bench.py --json --md docs/continual.md   # the reference run (see docs/continual.md; ~1 h)
Last line: ratio=<ACC of seq / ACC of joint> (naive sequential relative to the multi-task upper bound).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_STRATEGIES = ("seq", "replay", "ewc", "progressive", "olora")


def _tasks_module():
    spec = importlib.util.spec_from_file_location("tunesmith_examples_tasks_generate", ROOT / "examples/tasks/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- metrics
def bwt(matrix: list[list[float | None]]) -> float | None:
    """mean over j < T of (R[T][j] - R[j][j]); rows 1..T are stages (row 0 = base), columns 0..T-1 tasks."""
    t = len(matrix) - 1
    diffs = [matrix[t][j] - matrix[j + 1][j] for j in range(t - 1)
             if matrix[t][j] is not None and matrix[j + 1][j] is not None]
    return sum(diffs) / len(diffs) if diffs else None


def final_average(matrix: list[list[float | None]]) -> float | None:
    last = [v for v in matrix[-1] if v is not None]
    return sum(last) / len(last) if len(last) == len(matrix[-1]) else None


def check_invariants(result: dict[str, Any]) -> list[str]:
    """What must hold in any run, quick or full; returns the violations (empty = fine)."""
    problems = []
    t = len(result["tasks"])
    for name, row in result["strategies"].items():
        matrix = row["R"]
        if len(matrix) != t + 1 or any(len(r) != t for r in matrix):
            problems.append(f"{name}: R is not {t + 1} x {t}")
            continue
        if matrix[0] != result["base_row"]:
            problems.append(f"{name}: row 0 is not the base row")
        for i in range(t + 1):
            for j in range(t):
                value = matrix[i][j]
                if value is not None and not 0.0 <= value <= 1.0:
                    problems.append(f"{name}: R[{i}][{j}] = {value} outside [0, 1]")
                needed = j == i - 1 or i == t or result.get("evals", "full") == "full"
                if name != "joint" and 1 <= i and j < i and value is None and needed:
                    problems.append(f"{name}: R[{i}][{j}] missing")
                if i >= 1 and j >= i and value is not None:
                    problems.append(f"{name}: R[{i}][{j}] measured for a future task")
        if name == "joint" and any(v is None for v in matrix[t]):
            problems.append("joint: final row incomplete")
        if name == "progressive":
            for i in range(1, t + 1):
                for j in range(i - 1):
                    if matrix[i][j] != matrix[j + 1][j]:
                        problems.append(f"progressive: R[{i}][{j}] differs from R[{j + 1}][{j}] (same model)")
        if row["ACC"] != final_average(matrix) or row["BWT"] != bwt(matrix):
            problems.append(f"{name}: ACC/BWT do not follow from R")
    return problems


# ------------------------------------------------------------------------------------------------ runner
class Bench:
    def __init__(self, args, work: Path):
        import torch
        from transformers import set_seed

        from tunesmith.config import MethodConfig, ModelConfig
        from tunesmith.methods.lora import lora_config
        from tunesmith.models.load import load_tokenizer

        torch.set_num_threads(args.threads)
        self.args, self.work, self.set_seed = args, work, set_seed
        self.model_config = ModelConfig(name_or_path=args.model)
        self.lora = lora_config(MethodConfig.model_validate(
            {"name": "lora", "lora": {"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05}}))
        self.tokenizer = load_tokenizer(self.model_config, log=lambda *a: None)
        self.tasks = self._load_tasks()
        self.seconds: dict[str, float] = {}

    # --- data
    def _load_tasks(self):
        from tunesmith.data.formats import read_conversations
        from tunesmith.data.mixing import apply_task_format
        from tunesmith.recipes.continual import TaskSpec

        module = _tasks_module()
        paths = module.generate(self.work / "data", self.args.seed, self.args.n_train, 4, self.args.n_test)
        tasks = []
        for name in module.ORDER:
            spec = module.TASKS[name]
            split = {s: apply_task_format(read_conversations(paths[name][s]), spec["prefix"], spec["system_prompt"], name)
                     for s in ("train", "validation", "test")}
            budget = min(spec["max_new_tokens"], self.args.max_new_tokens or spec["max_new_tokens"])
            tasks.append(TaskSpec(name, split["train"], split["validation"], split["test"], spec["metrics"],
                                  spec["headline"], budget, spec["metric_options"]))
        return tasks

    # --- models
    def base(self):
        from tunesmith.models.load import load_model

        self.set_seed(self.args.seed)
        return load_model(self.model_config, log=lambda *a: None)

    def fresh(self):
        from peft import get_peft_model

        model = self.base()
        self.set_seed(self.args.seed)
        return get_peft_model(model, self.lora)

    def continued(self, adapter_dir: Path):
        from peft import PeftModel

        return PeftModel.from_pretrained(self.base(), adapter_dir, is_trainable=True)

    def train(self, model, conversations, tag: str, steps: int | None = None, loss_terms=()):
        from tunesmith.config import TrainConfig
        from tunesmith.recipes.continual import train_stage
        from tunesmith.records.metrics import read_metrics

        config = TrainConfig(max_steps=steps or self.args.steps, batch_size=self.args.batch,
                             learning_rate=self.args.lr, warmup_ratio=0.0, seed=self.args.seed, show_progress=False,
                             save_total_limit=1, load_best_at_end=False, precision="fp32")
        started = time.perf_counter()
        state = train_stage(model, self.tokenizer, conversations, config, self.work / "runs" / tag,
                            self.args.seq_len, loss_terms=loss_terms, log=lambda *a: None)
        self.seconds[tag] = round(time.perf_counter() - started, 1)
        last = read_metrics(self.work / "runs" / tag / "metrics.jsonl")[-1]
        _log(f"trained {tag}: {state.step} steps in {self.seconds[tag]} s, last train_loss {last.get('train_loss')}"
             + "".join(f", {k} {last[k]:.4g}" for k in ("ewc_penalty", "orthogonal_penalty") if k in last))
        return state

    def save(self, model, name: str, tag: str) -> Path:
        from tunesmith.methods.combine import save_adapter

        return save_adapter(model, name, self.work / "adapters" / tag)

    def score(self, model, j: int, tag: str) -> float:
        from tunesmith.recipes.continual import score_task

        task = self.tasks[j]
        started = time.perf_counter()
        result = score_task(model, self.tokenizer, task, max_examples=self.args.n_test, batch_size=self.args.eval_batch)
        value = result["metrics"].get(task.headline)
        value = 0.0 if value is None else float(value)
        _log(f"scored {tag} on {task.name}: {task.headline} {value:.3f} (n={result['n']}, "
             f"{time.perf_counter() - started:.0f} s)")
        return value

    def forgetting(self, model, tag: str) -> dict[str, Any]:
        from tunesmith.eval.forgetting import kl_drift, load_general_prompts, probe_accuracy, retention

        started = time.perf_counter()
        drift = kl_drift(model, self.tokenizer, load_general_prompts(self.args.kl_prompts), batch_size=8)
        accuracy = probe_accuracy(model, self.tokenizer, self.probes, batch_size=16)["accuracy"]
        _log(f"forgetting {tag}: KL {drift['kl']:.4f}, probes {accuracy:.3f} ({time.perf_counter() - started:.0f} s)")
        return {"kl_drift": drift["kl"], "kl_positions": drift["positions"], "probe_accuracy": accuracy,
                "probe_retention": retention(accuracy, self.base_probe_accuracy)}

    # --- the sequence
    def run(self) -> dict[str, Any]:
        from tunesmith.eval.forgetting import load_probes, probe_accuracy

        t = len(self.tasks)
        base = self.base()
        self.probes = load_probes(self.args.probes, kinds=("mc",))
        self.base_probe_accuracy = probe_accuracy(base, self.tokenizer, self.probes, batch_size=16)["accuracy"]
        reuse = json.loads(Path(self.args.reuse, "scores.json").read_text()) if self.args.reuse else None
        base_row = reuse["base_row"] if reuse else [self.score(base, j, "base") for j in range(t)]
        del base
        empty = lambda: [list(base_row)] + [[None] * t for _ in range(t)]  # noqa: E731
        R = {name: empty() for name in self.strategies()}
        reused: dict[str, list[list[int]]] = {name: [] for name in R}
        forgetting: dict[str, dict[str, Any]] = {}
        extra: dict[str, Any] = {}

        # stage 1, shared by every strategy but joint
        if reuse:  # the base row and stage 1 of an earlier run of this bench with the same settings (scores.json)
            first, r11 = Path(self.args.reuse, "adapters", "stage1"), reuse.get("stage1")
            model = self.continued(first)
            if r11 is None:  # scores.json without it: measure the reused adapter here (greedy: the same value)
                r11 = self.score(model, 0, "stage1 (reused adapter)")
        else:
            model = self.fresh()
            self.train(model, self.tasks[0].train, "stage1")
            first = self.save(model, "default", "stage1")
            r11 = self.score(model, 0, "stage1")
        (self.work / "scores.json").write_text(json.dumps({"base_row": base_row, "stage1": r11}))
        for name in R:
            if name != "joint":
                R[name][1][0] = r11
        if "ewc" in R:
            extra["ewc"] = self._fisher_after(model, 0, None)
        del model
        done: list[str] = []

        def finished(name: str) -> None:  # partial results survive a run that is stopped early
            done.append(name)
            partial = self._result(base_row, {n: R[n] for n in done}, reused, forgetting, extra)
            partial["meta"] = {**self.meta, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                               "args": vars(self.args)}
            (self.work / "partial.json").write_text(json.dumps(partial, default=str))

        for name in [n for n in ("seq", "joint", "replay", "ewc") if n in R]:
            if name == "joint":
                forgetting[name] = self._run_joint(R[name])
            else:
                forgetting[name] = getattr(self, f"_run_{name}")(R[name], first, extra)
            finished(name)
        if "progressive" in R:
            forgetting["progressive"] = self._run_progressive(R["progressive"], first, reused["progressive"])
            finished("progressive")
        if "olora" in R:
            forgetting["olora"], extra["olora"] = self._run_olora(R["olora"], first)
            finished("olora")
        merges = [n for n in R if n.startswith("merged:")]
        if merges:
            independent = [first] + [self._independent(i) for i in range(1, t)]
            for name in merges:
                reused[name].append([1, 0])
                forgetting[name], extra[name] = self._run_merged(R[name], independent, name.split(":", 1)[1])
                finished(name)
        return self._result(base_row, R, reused, forgetting, extra)

    def strategies(self) -> list[str]:
        names = [s for s in BASE_STRATEGIES if s in self.args.strategies]
        names += [f"merged:{c}" for c in self.args.merges] if "merged" in self.args.strategies else []
        return names + (["joint"] if "joint" in self.args.strategies else [])

    def _eval_row(self, model, matrix, i: int, tag: str) -> None:
        """Row i+1 up to the diagonal; with --evals minimal only what ACC and BWT need (diagonal, last row)."""
        last = i == len(self.tasks) - 1
        for j in range(i + 1):
            if self.args.evals == "full" or last or j == i:
                matrix[i + 1][j] = self.score(model, j, tag)

    def _run_seq(self, matrix, first: Path, extra) -> dict[str, Any]:
        previous = first
        for i in range(1, len(self.tasks)):
            model = self.continued(previous)
            self.train(model, self.tasks[i].train, f"seq{i + 1}")
            previous = self.save(model, "default", f"seq{i + 1}")
            self._eval_row(model, matrix, i, f"seq{i + 1}")
        return self.forgetting(model, "seq")

    def _run_replay(self, matrix, first: Path, extra) -> dict[str, Any]:
        from tunesmith.data.mixing import ReservoirBuffer, TaskSource, mix, replay_counts, tag_replay

        buffer = ReservoirBuffer(capacity=self.args.replay_size, seed=self.args.seed)
        buffer.add(tag_replay(self.tasks[0].train, "stage1", self.tasks[0].name))
        previous, manifests = first, []
        for i in range(1, len(self.tasks)):
            task = self.tasks[i]
            data, report = mix([TaskSource(task.name, task.train, 1 - self.args.replay_share),
                                TaskSource("replay", list(buffer.items), self.args.replay_share, origin="replay")],
                               total=len(task.train), seed=self.args.seed + i)
            report["replayed_from"] = replay_counts(data)
            manifests.append(report)
            model = self.continued(previous)
            self.train(model, data, f"replay{i + 1}")
            previous = self.save(model, "default", f"replay{i + 1}")
            self._eval_row(model, matrix, i, f"replay{i + 1}")
            buffer.add(tag_replay(task.train, f"replay{i + 1}", task.name))
        extra["replay"] = {"capacity": self.args.replay_size, "share": self.args.replay_share, "mixtures": [
            {"drawn": {k: v["drawn"] for k, v in m["tasks"].items()}, "replayed_from": m["replayed_from"]}
            for m in manifests]}
        return self.forgetting(model, "replay")

    def _fisher_after(self, model, i: int, state):
        from tunesmith.data.render import render_dataset
        from tunesmith.methods.registry import get_method
        from tunesmith.train.ewc import EwcState, estimate_fisher, trainable_values

        examples, _ = render_dataset(self.tokenizer, self.tasks[i].train[: self.args.ewc_examples], self.args.seq_len)
        started = time.perf_counter()
        fisher, used = estimate_fisher(model, get_method("lora"), examples, self.tokenizer.pad_token_id,
                                       max_examples=self.args.ewc_examples)
        mean = sum(float(f.sum()) for f in fisher.values()) / sum(f.numel() for f in fisher.values())
        _log(f"Fisher after task {i + 1}: {used} examples, mean {mean:.3e} ({time.perf_counter() - started:.0f} s)")
        state = state or EwcState(online=True, gamma=1.0)
        return state.accumulate(fisher, trainable_values(model), self.tasks[i].name, used)

    def _run_ewc(self, matrix, first: Path, extra) -> dict[str, Any]:
        from tunesmith.train.ewc import EwcPenalty

        previous, state = first, extra["ewc"]
        for i in range(1, len(self.tasks)):
            model = self.continued(previous)
            penalty = EwcPenalty(state, self.args.ewc_lambda)
            penalty.check(model)
            self.train(model, self.tasks[i].train, f"ewc{i + 1}", loss_terms=[penalty])
            previous = self.save(model, "default", f"ewc{i + 1}")
            self._eval_row(model, matrix, i, f"ewc{i + 1}")
            if i < len(self.tasks) - 1:
                state = self._fisher_after(model, i, state)
        extra["ewc"] = {"lambda": self.args.ewc_lambda, "fisher": "empirical", "examples": state.examples,
                        "accumulation": "online (gamma 1: sum of Fishers, anchor = latest parameters)"}
        return self.forgetting(model, "ewc")

    def _stack_stage(self, adapters: dict[str, Path], i: int, tag: str, loss_terms=()):
        """Train task i's adapter on top of the frozen `adapters` (added to them), all active afterwards."""
        from tunesmith.methods.combine import activate, add_progressive_adapter, load_stack

        name = f"t{i + 1}"
        model = load_stack(self.base(), adapters)
        self.set_seed(self.args.seed)
        add_progressive_adapter(model, name, self.lora, frozen=list(adapters))
        self.train(model, self.tasks[i].train, f"{tag}{i + 1}", loss_terms=loss_terms)
        adapters[name] = self.save(model, name, f"{tag}{i + 1}")
        activate(model, list(adapters))
        return model

    def _run_progressive(self, matrix, first: Path, reused) -> dict[str, Any]:
        adapters = {"t1": first}
        for i in range(1, len(self.tasks)):
            model = self._stack_stage(adapters, i, "progressive")
            matrix[i + 1][i] = self.score(model, i, f"progressive{i + 1}")
            for j in range(i):  # task j uses adapters 1..j: the model measured at stage j
                matrix[i + 1][j] = matrix[j + 1][j]
                reused.append([i + 1, j])
        return self.forgetting(model, "progressive (all adapters active)")

    def _run_olora(self, matrix, first: Path):
        from tunesmith.methods.combine import OrthogonalPenalty

        adapters, penalties = {"t1": first}, []
        for i in range(1, len(self.tasks)):
            penalty = OrthogonalPenalty(self.args.olora_lambda, f"t{i + 1}", list(adapters))
            model = self._stack_stage(adapters, i, "olora", loss_terms=[penalty])
            penalties.append(float(penalty(model)[1]))
            self._eval_row(model, matrix, i, f"olora{i + 1}")  # all adapters active: no task identity at test time
        return self.forgetting(model, "olora (all adapters active)"), {
            "lambda": self.args.olora_lambda, "final_penalty_per_stage": penalties}

    def _independent(self, i: int) -> Path:
        model = self.fresh()
        self.train(model, self.tasks[i].train, f"independent{i + 1}")
        return self.save(model, "default", f"independent{i + 1}")

    def _run_merged(self, matrix, independent: list[Path], combination: str):
        from tunesmith.methods.combine import load_stack, logit_drift, merge_adapters, probe_logits

        drift = None
        for i in range(1, len(self.tasks)):
            names = [f"t{k + 1}" for k in range(i + 1)]
            model = load_stack(self.base(), dict(zip(names, independent, strict=False)))
            stacked = probe_logits(model, self.tokenizer)
            report = merge_adapters(model, names, "merged", combination)
            drift = {**report, **logit_drift(stacked, probe_logits(model, self.tokenizer))}
            self._eval_row(model, matrix, i, f"merged:{combination}{i + 1}")
        _log(f"merged:{combination} logit drift vs stacked: {drift['max_abs_logit_diff']:.3g}")
        return self.forgetting(model, f"merged:{combination}"), drift

    def _run_joint(self, matrix) -> dict[str, Any]:
        from tunesmith.data.mixing import TaskSource, mix

        data, _ = mix([TaskSource(task.name, task.train, 1.0) for task in self.tasks],
                      total=sum(len(task.train) for task in self.tasks), seed=self.args.seed)
        model = self.fresh()
        self.train(model, data, "joint", steps=self.args.steps * len(self.tasks))
        t = len(self.tasks)
        for j in range(t):
            matrix[t][j] = self.score(model, j, "joint")
        return self.forgetting(model, "joint")

    def _result(self, base_row, R, reused, forgetting, extra) -> dict[str, Any]:
        strategies = {}
        for name, matrix in R.items():
            strategies[name] = {"R": matrix, "ACC": final_average(matrix), "BWT": bwt(matrix),
                                "reused": reused[name], **forgetting.get(name, {})}
        return {"evals": self.args.evals, "tasks": [{"name": t.name, "metric": t.headline, "n_test": min(len(t.test), self.args.n_test),
                           "n_train": len(t.train)} for t in self.tasks],
                "base_row": base_row, "base_probe_accuracy": self.base_probe_accuracy,
                "strategies": strategies, "extra": extra, "train_seconds": self.seconds}


# ------------------------------------------------------------------------------------------------ output
def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.3f}"


def summary_rows(result: dict[str, Any]) -> list[list[str]]:
    names = [t["name"] for t in result["tasks"]]
    rows = [["base", *(_fmt(v) for v in result["base_row"]), _fmt(sum(result["base_row"]) / len(names)), "-", "0",
             "1.000"]]
    for name, row in result["strategies"].items():
        rows.append([name, *(_fmt(v) for v in row["R"][-1]), _fmt(row["ACC"]), _signed(row["BWT"]),
                     _fmt(row.get("kl_drift"), 4), _fmt(row.get("probe_retention"))])
    return rows


def header(result: dict[str, Any]) -> list[str]:
    return ["strategy", *(f"{t['name']} ({t['metric']})" for t in result["tasks"]), "ACC", "BWT", "KL drift",
            "probe retention"]


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140, file=sys.stderr, emoji=False, markup=False)
    table = Table(title="continual learning: final row R[T][j], ACC, BWT and forgetting vs base (measured)")
    for i, column in enumerate(header(result)):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in summary_rows(result):
        table.add_row(*row)
    console.print(table)
    names = [t["name"] for t in result["tasks"]]
    for name, row in result["strategies"].items():
        lines = [f"  R[{i}] " + "  ".join(f"{_fmt(v):>6}" for v in r) for i, r in enumerate(row["R"])]
        console.print(f"{name}: rows = after stage i (0 = base), columns = {', '.join(names)}\n" + "\n".join(lines))


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    names = [t["name"] for t in result["tasks"]]
    cols = header(result)
    out = [f"Measured {meta['date']} at commit `{meta['commit']}` on {meta['machine']}; load average before/after: "
           f"{meta['load_before']} / {meta['load_after']}; "
           + (f"wall time {meta['wall_seconds']:.0f} s." if meta.get("wall_seconds") else "wall time: see each run's record.")
           , "",
           f"Command: `{meta['command']}`", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r) + " |" for r in summary_rows(result)]
    skipped = ("; with `--evals minimal` only the diagonal and the last row are measured (what ACC and BWT need), "
               "so `-` below the diagonal = not measured" if result.get("evals") == "minimal" else "")
    out += ["", "Accuracy matrices R[i][j] (row i = after training task i, row 0 = base; column j = task; "
            f"`-` = a future task, not measured; *italic* = the same model as an earlier entry, reused{skipped}):", ""]
    for name, row in result["strategies"].items():
        reused = {tuple(x) for x in row["reused"]}
        out.append(f"**{name}**\n")
        out.append("| R | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        for i, r in enumerate(row["R"]):
            cells = [f"*{_fmt(v)}*" if (i, j) in reused else _fmt(v) for j, v in enumerate(r)]
            out.append(f"| {i} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_md(path: Path, text: str) -> None:
    """Replace the block between the bench markers in `path` (or write the block alone if the file is new)."""
    begin, end = "<!-- continual_bench:begin -->", "<!-- continual_bench:end -->"
    block = f"{begin}\n{text}\n{end}"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = (old + "\n\n" if old else "") + block + "\n"
    path.write_text(new)


def machine() -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {"commit": commit.stdout.strip() or "unknown", "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}", "date": time.strftime("%Y-%m-%d %H:%M UTC",
            time.gmtime()), "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, tiny data, 2 steps per task")
    parser.add_argument("--json", action="store_true", help="print the JSON record before the ratio line")
    parser.add_argument("--md", default=None, help="write the tables (with command, commit, machine) into this file")
    parser.add_argument("--model", default=None, help=f"base model (default {REFERENCE}; --quick: a tiny one)")
    parser.add_argument("--strategies", default="seq,replay,ewc,progressive,olora,merged,joint")
    parser.add_argument("--olora-lambda", type=float, default=0.5, help="O-LoRA orthogonality weight (the paper's 0.5)")
    parser.add_argument("--merges", default=None, help="peft combinations for `merged` (default cat,ties; quick cat)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per task (default 24: at 12 the risk task stays at chance; quick 2)")
    parser.add_argument("--batch", type=int, default=2, help="packed sequences per step")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=None, help="training records per task (default 120; quick 12)")
    parser.add_argument("--n-test", type=int, default=None, help="test records per task (default 24; quick 3)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on each task's budget (quick 6)")
    parser.add_argument("--eval-batch", type=int, default=24)
    parser.add_argument("--replay-size", type=int, default=None, help="replay buffer capacity (default 40; quick 6)")
    parser.add_argument("--replay-share", type=float, default=0.25, help="share of each later stage that is replay")
    parser.add_argument("--ewc-lambda", type=float, default=None, help="EWC lambda (default 1e4; quick 1e3)")
    parser.add_argument("--ewc-examples", type=int, default=None, help="examples for the Fisher (default 32; quick 4)")
    parser.add_argument("--kl-prompts", type=int, default=None, help="general prompts for KL drift (default 24; quick 4)")
    parser.add_argument("--probes", type=int, default=None, help="multiple-choice probes (default 60; quick 6)")
    parser.add_argument("--evals", choices=("full", "minimal"), default="full",
                        help="full: every R[i][j], j <= i; minimal: the diagonal and the last row (what ACC/BWT need)")
    parser.add_argument("--reuse", default=None, metavar="WORK",
                        help="reuse the base row and stage-1 adapter of an earlier run's --work folder (same settings)")
    parser.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                        help="print (and --md) one table from several runs' JSON records or partial.json files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"steps": (24, 2), "n_train": (120, 12), "n_test": (24, 3), "replay_size": (40, 6),
                "ewc_lambda": (1e4, 1e3), "ewc_examples": (32, 4), "kl_prompts": (24, 4), "probes": (60, 6),
                "max_new_tokens": (None, 6)}
    for key, (full, small) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    args.merges = (args.merges or ("cat" if quick else "cat,ties")).split(",")
    args.strategies = args.strategies.split(",")
    return args


def combine(paths: list[str]) -> dict[str, Any]:
    """One result from several runs' records (same tasks and base row required); later files add strategies."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    for other in results[1:]:
        # base rows may differ by the 3-decimal rounding of a base row copied from a log (see --reuse)
        same_base = all(abs(a - b) <= 5e-4 for a, b in zip(other["base_row"], first["base_row"], strict=True))
        if not same_base or [t["name"] for t in other["tasks"]] != [t["name"] for t in first["tasks"]]:
            raise SystemExit("--combine: the runs differ in tasks or base row; they are not one measurement")
        for name, row in other["strategies"].items():
            row["R"][0] = list(first["base_row"])
            first["strategies"].setdefault(name, row)
        first["extra"].update(other.get("extra", {}))
        first["train_seconds"].update(other.get("train_seconds", {}))
    first["evals"] = "minimal" if any(r.get("evals") == "minimal" for r in results) else "full"
    return first


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.combine:
        result = combine(args.combine)
        print_table(result)
        if args.md:
            meta = {**result.get("meta", {}), "command": "python bench/continual_bench.py " + " ".join(
                argv if argv is not None else sys.argv[1:])}
            write_md(Path(args.md), markdown(result, meta) + "\n\nCombined from: " + ", ".join(args.combine))
        problems = check_invariants(result)
        if problems:
            print("invariant violations:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1 if problems else 0
    meta = machine()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="continual-bench-") as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.model is None:
            if args.quick:
                from tunesmith.models.tiny import save_tiny_model

                args.model = str(save_tiny_model(work / "tiny-model", "llama"))
            else:
                args.model = REFERENCE
        bench = Bench(args, work)
        bench.meta = {**meta, "command": "python bench/continual_bench.py " + " ".join(
            argv if argv is not None else sys.argv[1:])}
        result = bench.run()
    meta.update(load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()), wall_seconds=time.perf_counter() - started,
                command="python bench/continual_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    result["meta"] = {**meta, "args": {k: v for k, v in vars(args).items()}}
    problems = check_invariants(result)
    print_table(result)
    if args.md:
        write_md(Path(args.md), markdown(result, meta))
    if args.json:
        print(json.dumps(result))
    if problems:
        print("invariant violations:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    seq, joint = result["strategies"].get("seq", {}).get("ACC"), result["strategies"].get("joint", {}).get("ACC")
    print(f"ratio={seq / joint:.3f}" if seq is not None and joint else "ratio=nan")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
