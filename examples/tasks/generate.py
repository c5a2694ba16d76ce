"""Three small tasks over contract clauses, for multi-task and continual fine-tuning (bench/continual_bench.py).

The clauses come from the demo's generator (examples/contracts/generate.py: same templates, names, amounts, dates);
each task asks something different of the same kind of text, so that training on one task can overwrite another:

    extract  [Extract clauses]            -> {"clause_type": ..., "parties": [...]}      metric field_f1
    risk     [Classify risk]              -> low | medium | high                         metric accuracy (closed set)
    dates    [Extract dates and amounts]  -> {"dates": [...], "amounts": [...]}          metric field_f1

Risk is a fixed function of the clause type (what a buyer's counsel would flag first): indemnification carve-outs
and material-adverse-change clauses are `high`, liability caps and termination `medium`, confidentiality and
governing law `low`; the three labels are balanced because clause types are. Values in the JSON answers are
verbatim spans of the clause (lists in order of first appearance); every `dates` answer names at least one value.

Records are written WITHOUT the task prefix or system prompt (user = clause, assistant = answer): the prefix and
system prompt are configuration (TASKS below, or `data.datasets[*].task_prefix/system_prompt` in a run config) and
are added by tunesmith.data.mixing.apply_task_format to training, validation and test records alike.
No clause text occurs twice within or across tasks and splits.

Usage:  python examples/tasks/generate.py --out data/tasks --seed 0 [--n-train 300 --n-validation 40 --n-test 60]
writes data/tasks/{extract,risk,dates}/{train,validation,test}.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _contracts():
    """The demo generator, loaded from its file (examples/ is not a package)."""
    name = "tunesmith_examples_contracts_generate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE.parent / "contracts" / "generate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


RISK_OF_TYPE = {
    "indemnification_carve_out": "high", "material_adverse_change": "high",
    "limitation_of_liability": "medium", "termination": "medium",
    "confidentiality": "low", "governing_law": "low",
}

# name -> how the task is asked and scored (prefix and system prompt are applied by data/mixing.py)
TASKS: dict[str, dict[str, Any]] = {
    "extract": {
        "prefix": "[Extract clauses]",
        "system_prompt": "Extract the clause as JSON with keys clause_type and parties.",
        "metrics": ["field_f1", "json_valid"], "headline": "field_f1", "max_new_tokens": 40,
        "metric_options": {},
    },
    "risk": {
        "prefix": "[Classify risk]",
        "system_prompt": "Classify the clause's risk for the buyer as low, medium or high. Answer with one word.",
        "metrics": ["accuracy"], "headline": "accuracy", "max_new_tokens": 4, "metric_options": {},
    },
    "dates": {
        "prefix": "[Extract dates and amounts]",
        "system_prompt": "List the dates and amounts in the clause as JSON with keys dates and amounts.",
        "metrics": ["field_f1", "json_valid"], "headline": "field_f1", "max_new_tokens": 40,
        "metric_options": {},
    },
}
ORDER = ("extract", "risk", "dates")
SPLITS = ("train", "validation", "test")


def answer_for(task: str, clause_type: str, answer: dict[str, Any]) -> str:
    if task == "extract":
        value = {"clause_type": clause_type, "parties": answer["parties"]}
    elif task == "risk":
        return RISK_OF_TYPE[clause_type]
    elif task == "dates":
        value = {"dates": answer["dates"], "amounts": answer["amounts"]}
    else:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def make_records(task: str, split: str, n: int, seed: int, seen: set[str]) -> list[dict[str, Any]]:
    """n records, clause types balanced (counts differ by <= 1), clause texts not in `seen` (updated)."""
    contracts = _contracts()
    rng = random.Random(f"tasks:{seed}:{task}:{split}")
    types = [contracts.CLAUSE_TYPES[i % len(contracts.CLAUSE_TYPES)] for i in range(n)]
    rng.shuffle(types)
    records = []
    for clause_type in types:
        for _attempt in range(1000):
            template = rng.choice(contracts.TEMPLATES[clause_type])
            text, answer = contracts.render(clause_type, template, rng, contracts.TRAIN_JURISDICTIONS)
            # every dates answer names at least one value: field_f1 scores an empty reference 1.0 against any
            # unparseable reply, which would reward a model for not answering
            if text not in seen and (task != "dates" or answer["dates"] or answer["amounts"]):
                break
        else:
            raise RuntimeError(f"{task}/{split}: no new unique {clause_type} clause after 1000 tries; lower the sizes")
        seen.add(text)
        records.append({"messages": [{"role": "user", "content": text},
                                     {"role": "assistant", "content": answer_for(task, clause_type, answer)}]})
    return records


def generate(out_dir: str | Path, seed: int = 0, n_train: int = 300, n_validation: int = 40,
             n_test: int = 60, tasks: tuple[str, ...] = ORDER) -> dict[str, dict[str, str]]:
    """Write out_dir/<task>/<split>.jsonl; returns {task: {split: path}}."""
    contracts = _contracts()
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    for split, n in sizes.items():
        if n < 1:
            raise ValueError(f"n_{split} must be >= 1, got {n}")
    seen: set[str] = set()
    paths: dict[str, dict[str, str]] = {}
    for task in tasks:
        folder = Path(out_dir) / task
        folder.mkdir(parents=True, exist_ok=True)
        paths[task] = {}
        for split in SPLITS:
            path = folder / f"{split}.jsonl"
            contracts._write_jsonl_atomic(path, make_records(task, split, sizes[split], seed, seen))
            paths[task][split] = str(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/tasks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-validation", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=60)
    args = parser.parse_args(argv)
    for task, splits in generate(args.out, args.seed, args.n_train, args.n_validation, args.n_test).items():
        for split, path in splits.items():
            print(f"{task:<8} {split:<11} {path}")


if __name__ == "__main__":
    main()
