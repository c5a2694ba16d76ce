"""Sharded training (FSDP2 through accelerate) on 2 CPU processes (gloo) against one process, same global batch.

Why grad_norm is compared and not only losses: AdamW divides by the running gradient scale, so a run whose
gradients are all twice too large (a reduction that sums where it should average; PyTorch issue 162338 reports
this for fully_shard on gloo) has almost the same loss curve. The logged gradient norm is the norm of the reduced
gradient, before clipping: a sum-for-mean error doubles it.
Tolerances: losses 1e-5 absolute, gradient norms 1e-4 relative, saved weights 1e-5 absolute — only the order of
floating-point reductions differs (fp32 on both sides).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import read_metrics
from tests.train.procs import cpu_only, rank_pid, run_train, sigkill, start_train, wait_for, write_config
from tunesmith.recipes.finetune import run_finetune

FP32 = "train.precision=fp32"  # bf16 autocast on one side and FSDP's bf16 parameter gather on the other would differ


@pytest.fixture(autouse=True)
def _cpu(monkeypatch, request):
    if "gpu" not in request.keywords:
        cpu_only(monkeypatch)


def quiet(*_a, **_k):
    pass


def compare_runs(a_dir: Path, b_dir: Path, weights: str) -> None:
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], abs=1e-5)
    assert [r.get("eval_loss") for r in b] == pytest.approx([r.get("eval_loss") for r in a], abs=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-4)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    wa, wb = load_file(str(a_dir / weights)), load_file(str(b_dir / weights))
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5), key


@pytest.mark.parametrize("method", ["lora", *(pytest.param(m, marks=pytest.mark.slow) for m in ("full", "adapters", "qlora"))])
def test_fsdp_on_two_processes_equals_one_process(make_config, tmp_path, method):
    """~40 s each on 2 loaded cores. QLoRA here is bitsandbytes' CPU backend with uint8 quant storage: accelerate
    leaves those 4-bit weights unsharded (replicated), the LoRA weights and the rest are sharded."""
    steps = ["train.max_steps=3", "train.eval_steps=3", FP32, f"method.name={method}"]
    if method == "full":
        steps.append("train.learning_rate=1e-3")
    single = make_config("train.batch_size=4", *steps, name="single")
    run_finetune(single, log=quiet)
    sharded = make_config("train.batch_size=2", "train.sharding=fsdp", *steps, name="fsdp")
    result = run_train(write_config(tmp_path / "fsdp.yaml", sharded), nproc=2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # the mesh was built on CPU (never CUDA by accident: PyTorch issue 132471), one unit per decoder layer
    assert "FSDP2 over 2 processes, mesh DeviceMesh((dp_shard=2), 'cpu'" in result.stdout
    assert "LlamaDecoderLayer" in result.stdout
    root = Path(single.output.dir)
    weights = "adapter/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    compare_runs(root / "single", root / "fsdp", weights)
    assert (root / "fsdp/checkpoints/step-3/sharded/.metadata").exists()  # a torch.distributed.checkpoint folder
    from transformers import AutoModelForCausalLM

    if method in ("lora", "qlora"):
        from peft import PeftModel

        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(single.model.name_or_path), root / "fsdp/adapter")
    elif method == "full":
        AutoModelForCausalLM.from_pretrained(root / "fsdp/adapter")


def test_prompt_learning_and_loss_terms_are_refused_under_fsdp(tiny_model_and_tokenizer):
    from tunesmith.config import ConfigError, MethodConfig
    from tunesmith.methods.registry import get_method
    from tunesmith.train.sharding import check_supported

    sharded = type("Sharded", (), {"is_fsdp2": True})()
    model, _ = tiny_model_and_tokenizer
    prefix = get_method("prefix")
    with pytest.raises(ConfigError, match="prompt-learning methods .* not supported with FSDP"):
        check_supported(sharded, prefix, prefix.apply(model, MethodConfig.model_validate({})), [])
    with pytest.raises(ConfigError, match="loss terms .* not supported with FSDP"):
        check_supported(sharded, get_method("lora"), model, [lambda m: ("x", torch.zeros(()))])


def kill_rank_one_after_step(config_path: Path, run_dir: Path, step: int) -> None:
    process = start_train(config_path, nproc=2)
    wait_for(lambda: (run_dir / f"checkpoints/step-{step - 1}").is_dir() and _steps(run_dir) >= step, process,
             what=f"step {step}")
    sigkill(rank_pid(process.pid, 1))
    process.wait(timeout=120)
    assert process.returncode != 0


def _steps(run_dir: Path) -> int:
    from tests.train.procs import logged_steps

    return logged_steps(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("resume_on", [2, 1])
def test_kill_one_rank_then_resume_from_the_sharded_checkpoint(make_config, tmp_path, resume_on):
    """SIGKILL of rank 1 after step 3 (last checkpoint: step 2); resumed on 2 processes (FSDP) or on 1 (the
    sharded checkpoint re-sharded onto an unsharded model): the curve and the adapter equal an uninterrupted
    single-process run's. ~70 s each."""
    steps = ["train.max_steps=5", "train.eval_steps=1", "train.save_steps=2", FP32]
    single = make_config("train.batch_size=4", *steps, name="single")
    run_finetune(single, log=quiet)
    killed = make_config("train.batch_size=2", "train.sharding=fsdp", *steps, name="killed")
    config_path = write_config(tmp_path / "killed.yaml", killed)
    root = Path(single.output.dir)
    kill_rank_one_after_step(config_path, root / "killed", 3)
    assert (root / "killed/checkpoints/step-2/sharded").is_dir()
    if resume_on == 1:
        resumed = make_config("train.batch_size=4", "train.sharding=fsdp", *steps, name="killed")
        config_path = write_config(tmp_path / "resume1.yaml", resumed)
    result = run_train(config_path, nproc=resume_on, resume=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step 2 of 5" in result.stdout
    compare_runs(root / "single", root / "killed", "adapter/adapter_model.safetensors")
    summary = json.loads((root / "killed/summary.json").read_text())
    assert summary["steps"] == 5 and summary["processes"] == resume_on


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL); this machine has "
                    f"{torch.cuda.device_count()}")
def test_fsdp_on_two_gpus_equals_one_gpu(make_config, tmp_path):
    """The same comparison on 2 CUDA devices (NCCL, where FSDP2's AVG reduction is native)."""
    steps = ["train.max_steps=3", "train.eval_steps=3", FP32]
    single = make_config("train.batch_size=4", *steps, name="single")
    run_finetune(single, log=quiet)
    sharded = make_config("train.batch_size=2", "train.sharding=fsdp", *steps, name="fsdp")
    result = run_train(write_config(tmp_path / "fsdp.yaml", sharded), nproc=2, env={"ACCELERATE_USE_CPU": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mesh DeviceMesh((dp_shard=2), 'cuda'" in result.stdout
    root = Path(single.output.dir)
    compare_runs(root / "single", root / "fsdp", "adapter/adapter_model.safetensors")
