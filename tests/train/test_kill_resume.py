"""Real faults on `tunesmith train` processes: SIGKILL (inside a checkpoint write and at random moments), a second
process on the same run directory, resume on another number of processes, a full disk and a read-only output.

Equality with an uninterrupted run: losses 1e-6 absolute and adapter weights 1e-6 absolute on the same process
count (the same computation replayed: data order and dropout seeds depend only on seed, rank and step), 1e-5 when
the process count changes (dropout 0 there: the dropout masks differ by design, see train/checkpoint.py).
"""

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import read_metrics
from tests.train.procs import (
    ENV,
    cpu_only,
    descendants,
    finish,
    logged_steps,
    run_train,
    sigkill,
    start_train,
    wait_for,
    write_config,
)
from tunesmith.recipes.finetune import run_finetune
from tunesmith.train.checkpoint import PAUSE_ENV

STEPS = ["train.max_steps=6", "train.eval_steps=1", "train.save_steps=2", "method.lora.dropout=0.1"]


@pytest.fixture(autouse=True)
def _cpu(monkeypatch, request):
    if "gpu" not in request.keywords:
        cpu_only(monkeypatch)


def quiet(*_a, **_k):
    pass


def assert_same_run(a_dir: Path, b_dir: Path, tol: float = 1e-6) -> None:
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert [r["train_loss"] for r in b] == pytest.approx([r["train_loss"] for r in a], abs=tol)
    assert [r.get("eval_loss") for r in b] == pytest.approx([r.get("eval_loss") for r in a], abs=tol)
    wa = load_file(str(a_dir / "adapter/adapter_model.safetensors"))
    wb = load_file(str(b_dir / "adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=tol) for k in wa)


def test_sigkill_inside_a_checkpoint_write_and_a_second_process_on_the_directory(make_config, tmp_path):
    """Killed while writing step 4's checkpoint: step 4 never appears as complete, --resume continues from step
    2, and the finished run equals an uninterrupted one. While the first process lives, a second is refused; once
    it is killed, the lock is gone. ~40 s."""
    straight = make_config(*STEPS, name="straight")
    run_finetune(straight, log=quiet)
    root = Path(straight.output.dir)
    config_path = write_config(tmp_path / "killed.yaml", make_config(*STEPS, name="killed"))
    run_dir = root / "killed"
    first = start_train(config_path, env={PAUSE_ENV: "4"})
    wait_for(lambda: (run_dir / ".paused-in-checkpoint-4").exists(), first, what="the pause inside step 4's write")

    second = run_train(config_path, resume=True)
    assert second.returncode == 2 and "in use by another tunesmith process" in second.stderr
    assert f"pid {first.pid}" in second.stderr

    sigkill(first.pid)
    first.wait(timeout=60)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-2"]
    partial = [p for p in checkpoints.iterdir() if p.name.startswith(".step-4")]
    assert partial and (partial[0] / "trainable.safetensors").exists()  # it was really half-written
    assert logged_steps(run_dir) == 4  # metrics of steps 3-4 exist beyond the last checkpoint

    third = run_train(config_path, resume=True)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resumed from" in third.stdout and "(step 2 of 6)" in third.stdout
    assert "removed 1 partial checkpoint" in third.stdout
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert_same_run(root / "straight", run_dir)


@pytest.mark.slow
def test_sigkill_at_random_moments(make_config, tmp_path):
    """Three SIGKILLs at seeded random moments of a run that checkpoints every step (so a kill may land inside a
    checkpoint write): 0-50 ms after logged step done+1 or done+2, chosen at random. Each is followed by --resume;
    the last one runs to the end and the run equals an uninterrupted one. ~60 s."""
    steps = [*STEPS, "train.save_steps=1", "train.max_steps=8"]
    straight = make_config(*steps, name="straight")
    run_finetune(straight, log=quiet)
    root = Path(straight.output.dir)
    config_path = write_config(tmp_path / "killed.yaml", make_config(*steps, name="killed"))
    run_dir = root / "killed"
    rng = random.Random(0)
    moments = []
    for attempt in range(6):  # until three kills landed before the end of the run
        done = logged_steps(run_dir)
        if len(moments) == 3 or done >= 7:
            break
        target = min(7, done + rng.randint(1, 2))
        process = start_train(config_path, resume=attempt > 0)
        wait_for(lambda target=target: logged_steps(run_dir) >= target, process, what=f"step {target}")
        delay = rng.uniform(0.0, 0.05)  # a tiny-model step takes ~20-200 ms here, depending on the load
        time.sleep(delay)
        if process.poll() is None:
            sigkill(process.pid)
            moments.append((target, round(delay, 2)))
        process.wait(timeout=60)
    assert len(moments) >= 2, moments
    partial = [p.name for p in (run_dir / "checkpoints").glob(".step-*")]  # left by a kill inside a write
    final = run_train(config_path, resume=True)
    assert final.returncode == 0, final.stderr[-3000:]
    print(f"kills (after step, delay s): {moments}; partial checkpoints left by the last kill: {partial}")
    assert_same_run(root / "straight", run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(make_config, tmp_path, before, after):
    """DDP (gloo) 2 -> kill -> resume on 1, and 1 -> kill -> resume on 2, same global batch of 4, dropout 0: the
    curve and adapter equal an uninterrupted single-process run (1e-5). ~60 s each."""
    common = ["train.max_steps=5", "train.eval_steps=1", "train.save_steps=2", "train.precision=fp32"]
    straight = make_config("train.batch_size=4", *common, name="straight")
    run_finetune(straight, log=quiet)
    root = Path(straight.output.dir)
    run_dir = root / "moved"
    configs = {n: write_config(tmp_path / f"moved{n}.yaml", make_config(f"train.batch_size={4 // n}", *common,
                                                                         name="moved")) for n in (1, 2)}
    process = start_train(configs[before], nproc=before)
    wait_for(lambda: (run_dir / "checkpoints/step-2").is_dir() and logged_steps(run_dir) >= 3, process, what="step 3")
    for pid in [*descendants(process.pid), process.pid]:  # the workers, then the launcher (or the one process)
        sigkill(pid)
    process.wait(timeout=60)
    result = run_train(configs[after], nproc=after, resume=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "(step 2 of 5)" in result.stdout
    assert_same_run(root / "straight", run_dir, tol=1e-5)


def _mount_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _mount_available(), reason="needs `unshare -rm` + tmpfs mounts (user namespaces)")


def _in_small_filesystem(tmp_path: Path, size: str, script: str, read_only: bool = False) -> subprocess.CompletedProcess:
    """Run `script` (sh) with a fresh tmpfs of `size` mounted on tmp_path/'mnt' (private mount namespace)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    command = f"mount -t tmpfs -o {options} tmpfs {mount} && {script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", command], env=ENV, capture_output=True, text=True, timeout=300)


@needs_mount
def test_disk_full_names_the_path_and_keeps_the_last_checkpoint(make_config, tmp_path, tiny_model_dir):
    """Full fine-tuning of the tiny model on a 1.6 MB file system: the step-1 checkpoint (1.1 MB) fits, the step-2 one
    does not. The run fails with an error naming the checkpoint path, and step 1 is intact. ~15 s."""
    config = make_config("method.name=full", "train.max_steps=3", "train.save_steps=1", "train.eval_steps=1",
                         name="full")
    config.output.dir = str(tmp_path / "mnt")
    config_path = write_config(tmp_path / "full.yaml", config)
    keep = tmp_path / "kept"
    train = " ".join([sys.executable, "-m", "tunesmith.cli", "train", str(config_path)])
    result = _in_small_filesystem(tmp_path, "1600k", f"{train}; echo rc=$?; cp -a {tmp_path / 'mnt'} {keep}")
    assert "rc=2" in result.stdout, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: could not write checkpoint") and "step-2" in message, message
    assert "bytes free on that file system" in message and "step-1" in message and "intact" in message
    step1 = keep / "full/checkpoints/step-1"
    from tunesmith.train.checkpoint import checkpoint_dirs

    assert checkpoint_dirs(keep / "full") == [step1]
    load_file(str(step1 / "trainable.safetensors"))  # complete and readable
    torch.load(step1 / "optimizer.pt", weights_only=True)
    assert json.loads((step1 / "trainer_state.json").read_text())["step"] == 1


@needs_mount
def test_read_only_output_is_a_clear_error(make_config, tmp_path):
    config = make_config("train.max_steps=1")
    config.output.dir = str(tmp_path / "mnt" / "runs")
    config_path = write_config(tmp_path / "ro.yaml", config)
    train = " ".join([sys.executable, "-m", "tunesmith.cli", "train", str(config_path)])
    result = _in_small_filesystem(tmp_path, "64k", f"{train}; echo rc=$?", read_only=True)
    assert "rc=2" in result.stdout, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "mnt") in message and "Read-only file system" in message, message


def test_the_run_lock_dies_with_its_process(tmp_path):
    """flock: held while the holder lives (the error names its pid), free the moment it is SIGKILLed."""
    from tunesmith.train.lock import RunInUseError, acquire_run_lock, release_run_lock

    run_dir = tmp_path / "runs" / "a"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tunesmith.train.lock import "
                               f"acquire_run_lock; acquire_run_lock({str(run_dir)!r}); print('held', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=f"in use by another tunesmith process \\(pid {holder.pid}\\)"):
            acquire_run_lock(run_dir)
    finally:
        sigkill(holder.pid)
        finish(holder)
    acquire_run_lock(run_dir)
    acquire_run_lock(run_dir)  # re-entrant in the holding process
    release_run_lock(run_dir)
