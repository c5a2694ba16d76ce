"""`tunesmith eval` and `tunesmith diagnose` end to end on a tiny model with a tiny PEFT LoRA adapter."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tunesmith.cli import main


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory):
    """runs/lora-a/{config.yaml, adapter/}, a sibling runs/older/eval.json, and a test file."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("runs")
    run_dir = root / "lora-a"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # B starts at zero; make the adapter change the model
    peft_model.save_pretrained(run_dir / "adapter")
    config = {"model": {"name_or_path": str(tiny_model_dir)}, "method": {"name": "lora"},
              "eval": {"metrics": ["exact_match", "json_valid", "field_f1", "hallucination_rate"],
                       "max_new_tokens": 6, "batch_size": 4}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    test = root / "test.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Extract: Acme pays {i}00 dollars."},
                          {"role": "assistant", "content": json.dumps({"party": "Acme", "amount": i * 100})}]}
            for i in range(1, 4)]
    test.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, run_dir, test


def test_eval_run_dir_with_base_forgetting_and_comparison(adapter_run, capsys):
    root, run_dir, test = adapter_run
    code = main(["eval", str(run_dir), "--data", str(test), "--base", "--max-examples", "2", "--forgetting",
                 "--forgetting-max-prompts", "2", "--forgetting-max-probes", "4",
                 "--forgetting-max-text-tokens", "300", "--option",
                 "closed_fields=[clause_type]", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((run_dir / "eval.json").read_text())
    assert printed["metrics"] == report["metrics"] == ["exact_match", "json_valid", "field_f1", "hallucination_rate"]
    assert report["data"]["test"]["n_total"] == 3 and report["data"]["test"]["n_evaluated"] == 2
    assert report["data"]["test"]["subset"] == "first 2 of 3 (file order)"
    assert set(report["models"]) == {"base", "tuned"}
    tuned = report["models"]["tuned"]["test"]
    assert tuned["n"] == 2 and len(tuned["examples"]) == 2 and "examples" not in printed["models"]["tuned"]["test"]
    assert tuned["scored"]["json_valid"] + tuned["skipped"]["json_valid"] == 2
    assert report["metric_options"] == {"closed_fields": ["clause_type"]}
    # the adapter changes the model: KL > 0; the base model's own numbers are finite
    forgetting = report["forgetting"]
    assert forgetting["kl_drift"] > 0 and forgetting["prompts"] == 2
    assert forgetting["probes"]["base"]["n"] == 4 and forgetting["perplexity"]["base"] > 1
    # 300 tokens in windows of 256 + 44; each window's first token is context only: 255 + 43 predicted
    assert forgetting["perplexity"]["tokens"] == 298
    assert [r["model"] for r in report["comparison"]] == ["base", "lora-a"]
    page = (run_dir / "eval.html").read_text()
    assert page.count("<svg") == 3 and "Forgetting" in page  # task chart + probe chart + perplexity chart

    # a second run on the same data sees the first one in its table
    other = root / "lora-b"
    other.mkdir()
    (other / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (other / "adapter").symlink_to(run_dir / "adapter", target_is_directory=True)
    # an eval.json written by `tunesmith train` (no data hash) matches by file list and example count
    trained = root / "trainer-run"
    trained.mkdir()
    trainer_eval = {"models": {"tuned": {"test": {"n": 2, "files": [str(test)], "metrics": {"exact_match": 0.5}}}}}
    (trained / "eval.json").write_text(json.dumps(trainer_eval))
    assert main(["eval", str(other), "--data", str(test), "--max-examples", "2"]) == 0
    second = json.loads((other / "eval.json").read_text())
    models = [r["model"] for r in second["comparison"]]
    assert models == ["lora-b", "base (from lora-a)", "lora-a", "trainer-run"]
    assert second["comparison"][3]["metrics"] == {"exact_match": 0.5}
    assert second["comparison"][2]["metrics"] == tuned["metrics"]  # same adapter, greedy: same scores
    assert "lora-a" in capsys.readouterr().out


def test_eval_adapter_folder_and_errors(adapter_run, capsys, tmp_path):
    root, run_dir, test = adapter_run
    assert main(["eval", str(run_dir / "adapter"), "--data", str(test), "--metrics", "exact_match,token_f1",
                 "--max-examples", "1"]) == 0
    report = json.loads((run_dir / "eval.json").read_text())  # an adapter inside a run dir reports to the run
    assert report["metrics"] == ["exact_match", "token_f1"] and report["models"]["tuned"]["test"]["n"] == 1
    assert main(["eval", str(run_dir), "--data", str(test), "--metrics", "exact_mtch"]) == 2
    assert "unknown metric(s) exact_mtch" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--data", str(test)]) == 2
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_lm_eval_missing_is_a_notice_not_a_crash(adapter_run, capsys):
    from tunesmith.eval.lm_eval_adapter import lm_eval_available

    if lm_eval_available():
        pytest.skip("lm-eval installed")
    root, run_dir, test = adapter_run
    assert main(["eval", str(run_dir), "--data", str(test), "--max-examples", "1", "--metrics", "exact_match",
                 "--lm-eval", "mmlu,gsm8k"]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert "pip install lm-eval" in report["lm_eval"]["tuned"]["error"]
    assert "notice:" in capsys.readouterr().out


def test_diagnose_cli(tmp_path, capsys):
    rows = [{"step": s, "train_loss": 0.1 + 2 * 0.98 ** s} for s in range(1, 201)]
    rows += [{"step": s, "eval_loss": 1.0 + 1.5 * 0.97 ** s + 0.002 * s} for s in range(20, 201, 20)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["diagnose", str(tmp_path), "--json", "--plot"]) == 0
    result = json.loads(capsys.readouterr().out)
    # eval' = 0 where 1.5 ln(1/0.97) 0.97^s = 0.002, i.e. s = ln(0.0438) / ln(0.97) ~ 103: evaluated at 100
    assert result["diagnosis"] == "overfitting" and result["best_step"] == 100
    assert (tmp_path / "loss_curves.png").stat().st_size > 5000
    assert main(["diagnose", str(tmp_path / "metrics.jsonl")]) == 0
    assert "diagnosis: overfitting" in capsys.readouterr().out
    assert main(["diagnose", str(tmp_path / "none")]) == 2
