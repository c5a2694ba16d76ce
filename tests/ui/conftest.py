"""Dashboard fixtures: a tiny registry of fake runs (two finished runs on one test set, a run whose name and values
hold markup, an unregistered run still "training"), and one real tiny training run (`tunesmith train`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

HOSTILE_NAME = "<script>window.__pwned=1</script>"
HOSTILE_VALUE = '<img src=x onerror="window.__pwned=2">'
TEST_ITEMS = [("Parse 12.", "12"), ("Parse 7.", "7"), ("Parse 30.", "30")]


def _metrics(lr: float, steps: int = 12, slope: float = 0.08) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "train_loss": round(3.0 * math.exp(-slope * step) + 0.5, 6), "lr": lr * min(1.0, step / 3),
               "epoch": round(step / 6, 4), "tokens": 128 * step, "grad_norm": 1.0}
        if step % 3 == 0:
            row["eval_loss"] = round(3.1 * math.exp(-slope * step * 0.8) + 0.6, 6)
        rows.append(row)
    return rows


def _eval(predictions: list[str], base: bool) -> dict:
    def result(preds):
        examples = [{"index": i, "source_file": "/data/test.jsonl", "line": i + 1,
                     "prompt": [{"role": "user", "content": q}], "reference": ref, "prediction": p,
                     "scores": {"exact_match": float(p == ref)}} for i, ((q, ref), p) in enumerate(zip(TEST_ITEMS, preds, strict=True))]
        score = sum(e["scores"]["exact_match"] for e in examples) / len(examples)
        return {"n": 3, "total": 3, "metrics": {"exact_match": score}, "examples": examples}

    models = {"tuned": {"test": result(predictions)}}
    if base:
        models = {"base": {"test": result(["?", "?", "30"])}, **models}
    return {"models": models, "forgetting": {"kl_drift": 0.0123, "probe_accuracy": {"base": 0.8, "tuned": 0.75},
                                             "probe_retention": 0.9375, "perplexity": {"base": 10.0, "tuned": 11.0},
                                             "perplexity_ratio": 1.1}}


def write_run(root: Path, folder: str, lr: float, predictions: list[str] | None, summary: bool = True,
              extra_summary: dict | None = None, manifest: dict | None = None) -> Path:
    run = root / folder
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lr": lr}))
    config = {"model": {"name_or_path": "fake/base-model"}, "method": {"name": "lora", "lora": {"r": 4}},
              "train": {"learning_rate": lr, "max_steps": 12}, "data": {"train": ["/data/train.jsonl"]},
              "output": {"name": folder}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(lr)))
    (run / "data_manifest.json").write_text(json.dumps(manifest or {"hash": "sha256:" + "ab" * 32, "files": [],
                                                                    "train_records": 40}))
    if predictions is not None:
        evaluated = _eval(predictions, base=True)
        (run / "eval.json").write_text(json.dumps(evaluated))
    if summary:
        body = {"name": folder, "method": "lora", "base_model": "fake/base-model", "steps": 12,
                "best_eval_loss": min(r["eval_loss"] for r in _metrics(lr) if "eval_loss" in r),
                "final_train_loss": _metrics(lr)[-1]["train_loss"], "status": "finished", "diagnosis": "healthy"}
        if predictions is not None:
            body["eval"] = {label: {s: r["metrics"] for s, r in res.items()} for label, res in evaluated["models"].items()}
        body.update(extra_summary or {})
        (run / "summary.json").write_text(json.dumps(body))
        (run / "diagnosis.json").write_text(json.dumps({"diagnosis": "healthy", "advice": ["continue"], "best_step": 12,
                                                        "spikes": []}))
    return run


PREPARED = {
    "hash": "sha256:" + "cd" * 32, "files": [{"path": "/data/train.jsonl", "split": "train", "records": 38}],
    "train_records": 38, "validation_records": 2,
    "mixture": {"total": 40, "seed": 0, "sampling": "without replacement within a source", "replayed_from": {},
                "tasks": {"contracts": {"origin": "dataset", "available": 35, "weight": 0.75, "drawn": 30, "repeats": 0,
                                        "unused": 5, "realised_share": 0.75},
                          "general": {"origin": "general", "available": 100, "weight": 0.25, "drawn": 10, "repeats": 0,
                                      "unused": 90, "realised_share": 0.25}}},
    "prepare": {
        "input": 44, "kept": 40, "quarantined": 2, "duplicates_exact": 1, "duplicates_near": 1, "trimmed": 0,
        "pii_dropped": 0, "leakage_removed": 0, "pii": {"EMAIL": 3}, "pii_mode": "redact",
        "quarantine_reasons": {"empty_field": 2},
        "identity": {"holds": True, "formula": "input 44 = kept 40 + quarantined 2 + duplicates_exact 1 + duplicates_near 1"},
        "lengths": {"unit": "tokens", "trim_limit": None, "before_trim": {"count": 40, "min": 3, "mean": 5.0, "p50": 5,
                    "p90": 7, "p99": 8, "max": 8, "histogram": {"edges": [3.0, 5.0, 7.0, 9.0], "counts": [10, 20, 10]}}},
        "diversity": {"embedder": "tfidf+svd", "clusters": 2, "sizes": [30, 10], "largest_share": 0.75,
                      "near_empty": [], "examples": ["a", "b"]},
        "leakage": {"pairs": [], "threshold": 0.8}, "splits": {"train": {"count": 38, "hash": "sha256:x"}},
    },
}


def build_fake_registry(root: Path) -> dict:
    """runs/ with alpha and beta (same test set, one answer differs), a hostile run, and a live unregistered run;
    alpha, beta and the hostile run are registered in runs/registry.db."""
    from tunesmith.registry.runs import register_run

    runs = root / "runs"
    runs.mkdir(parents=True)
    url = str(runs / "registry.db")
    write_run(runs, "alpha", 1e-4, ["12", "7", "30"], manifest=PREPARED)
    write_run(runs, "beta", 3e-4, ["12", "8", "30"])
    write_run(runs, "hostile", 2e-4, None, extra_summary={"eval": {"tuned": {"test": {"exact_match": HOSTILE_VALUE}}}})
    live = write_run(runs, "live", 5e-4, None, summary=False)
    (live / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(5e-4, steps=4)))
    for folder in ("alpha", "beta"):
        register_run(runs / folder, url=url)
    register_run(runs / "hostile", url=url, name=HOSTILE_NAME)
    return {"root": root, "runs": runs, "url": url, "live": live}


@pytest.fixture(scope="module")
def fake_registry(tmp_path_factory) -> dict:
    return build_fake_registry(tmp_path_factory.mktemp("ui-fake"))


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, tiny_model_dir) -> dict:
    """One real tiny training run through `tunesmith train` (LoRA on the tiny model, prepared data, test split,
    registered), about 5 s on one core."""
    from tunesmith.cli import main

    root = tmp_path_factory.mktemp("ui-real")
    rows = [{"instruction": f"Say the code for item {i}.", "output": f"code-{i % 5}"} for i in range(36)]
    rows.append({"instruction": "Write to bob@example.com", "output": "ok"})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:30] + rows[36:]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[30:34]))
    (root / "run.yaml").write_text("")
    runs = root / "runs"
    sets = [f"model.name_or_path={tiny_model_dir}", f"data.train=[{root / 'train.jsonl'}]",
            f"data.test=[{root / 'test.jsonl'}]", "data.prepare=true", "data.max_seq_len=128", "train.batch_size=4",
            "train.max_steps=6", "train.learning_rate=1e-2", "train.eval_steps=2", "train.logging_steps=1",
            "train.show_progress=false", "method.lora.r=4", "method.lora.dropout=0.0", "eval.max_new_tokens=6",
            f"output.dir={runs}", "output.name=real", f"output.registry_url={runs / 'registry.db'}"]
    argv = ["train", str(root / "run.yaml")] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    return {"root": root, "runs": runs, "url": str(runs / "registry.db"), "run_dir": runs / "real"}
