"""The benchmarks' quick modes run end to end, print the documented JSON keys, and compute their ratios from the
numbers they measured (not constants). The end-to-end runs (tiny models, a few steps) are in the default suite: each
bench's quick path is checked on every `make test` (~2-3 min together on 2 cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def run_bench(*args, timeout=900):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio=")
    return json.loads(lines[-2]), lines


# ---------------------------------------------------------------- train_throughput
def test_train_throughput_rotation_ratios_are_medians_of_adjacent_runs():
    from train_throughput import rotation_ratios

    def side(tps):
        return {"useful_tokens_per_second": tps}

    rotations = [{"baseline": side(100), "trl": side(50), "tunesmith": side(120)},
                 {"baseline": side(80), "trl": side(40), "tunesmith": side(120)},
                 {"baseline": side(100), "trl": side(60), "tunesmith": side(90)}]
    ratios = rotation_ratios(rotations)
    assert ratios["baseline"]["per_rotation"] == [1.2, 1.5, 0.9] and ratios["baseline"]["median"] == pytest.approx(1.2)
    assert ratios["trl"]["per_rotation"] == [2.4, 3.0, 1.5] and ratios["trl"]["median"] == pytest.approx(2.4)


def test_train_throughput_profile_categories():
    from types import SimpleNamespace as NS

    from train_throughput import _category

    dims = {"vocab": 1000, "intermediate": 96, "rank": 8}
    opt = NS(name="Optimizer.step#AdamW.step", cpu_parent=None)
    assert _category(NS(name="aten::mul_", input_shapes=[], cpu_parent=opt), dims) == "optimizer"
    col = NS(name="collation", cpu_parent=None)
    assert _category(NS(name="aten::cat", input_shapes=[], cpu_parent=col), dims) == "collation"
    mm = lambda *shapes: NS(name="aten::mm", input_shapes=[list(s) for s in shapes], cpu_parent=None)  # noqa: E731
    assert _category(mm((300, 64), (64, 1000)), dims) == "head"
    assert _category(mm((300, 64), (64, 96)), dims) == "mlp"
    assert _category(mm((300, 64), (64, 8)), dims) == "lora"
    assert _category(mm((300, 64), (64, 64)), dims) == "attention"
    assert _category(NS(name="aten::_scaled_dot_product_flash_attention_for_cpu", input_shapes=[], cpu_parent=None),
                     dims) == "attention"
    assert _category(NS(name="aten::rms_norm", input_shapes=[], cpu_parent=None), dims) == "other"


def test_flop_counter_counts_cpu_attention_and_matmuls():
    import torch
    import torch.nn.functional as F
    from train_throughput import flop_counter

    q = torch.randn(1, 2, 32, 16, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    mask = torch.zeros(32, 32)
    with flop_counter() as counter:
        out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        (out @ w).sum().backward()
    # independent count: attention forward = 2 matmuls (QK^T, PV) of 2*b*h*s*s*d FLOPs at full s x s (a mask is
    # applied to every pair); a flash backward runs 5 such matmuls (it recomputes QK^T): 2.5x forward. Projection:
    # forward 2*64*16*8, backward two matmuls of the same size.
    attention = 2 * (2 * 1 * 2 * 32 * 32 * 16)
    projection = 2 * 64 * 16 * 8
    assert counter.get_total_flops() == attention * 3.5 + 3 * projection
    # causal: only the s(s+1)/2 pairs on and below the diagonal are computed
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    causal = 2 * (2 * 1 * 2 * (32 * 33 // 2) * 16)
    assert counter.get_total_flops() == pytest.approx(causal * 3.5, abs=2)
    # in-place addmm_ (the fused LoRA update, methods/lora_forward.py) and mm with out= are matmuls too
    a, b, c = torch.randn(64, 32), torch.randn(32, 16), torch.zeros(64, 16)
    with flop_counter() as counter:
        c.addmm_(a, b)
        torch.mm(a, b, out=c)
    assert counter.get_total_flops() == 2 * (2 * 64 * 32 * 16)


def test_train_throughput_flops_per_token_averages_the_counted_steps():
    """FLOPs are counted over as many steps as were timed, after the window, and divided by those steps' own useful
    tokens (one counted step made the utilisation depend on which batch it was)."""
    from types import SimpleNamespace

    import train_throughput as tt

    ends = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0]  # the ends of steps 1..8
    instruments = SimpleNamespace(timed_steps=4, flop_steps=3, flops=9000, ends=ends, resumes=ends, profiler=None,
                                  step_seconds=lambda: [1.0, 1.0, 1.0], window_peaks=[1e3, 2e3, 4e3, 4e3],
                                  rss_at_step_end=[5, 6, 7, 7, 8, 8, 9, 12])
    tokens = [10, 100, 100, 100, 200, 300, 400, 50]
    record = tt.finish(instruments, tokens, {"vocab": 1, "intermediate": 2, "rank": 3})
    assert record["useful_tokens"] == 300 and record["useful_tokens_per_second"] == 100  # steps 2..4 in 3 s
    assert record["flops_per_token"] == 9000 / (200 + 300 + 400)  # steps 5..7
    assert record["achieved_flops"] == pytest.approx(1000) and record["flops_counted_steps"] == "5..7"
    assert record["profile_step_seconds"] == 2.0  # step 8
    # the peak: the median of the probes at the ends of steps 1..4; each step against the probes on its two sides
    assert record["matmul_peak_flops"] == 3e3 and record["utilisation"] == pytest.approx(1000 / 3e3)
    per_token = 9000 / 900
    assert record["utilisation_per_step"] == pytest.approx([per_token * 100 / 1.5e3, per_token * 100 / 3e3,
                                                            per_token * 100 / 4e3], abs=1e-4)
    assert record["peak_rss_timed_steps_bytes"] == 7  # at the end of step 4, before the counted and profiled steps
    assert tt.StepInstruments.steps_needed(4) == 8 and tt.StepInstruments.steps_needed(2) == 4


def test_train_throughput_tiny_end_to_end():
    pytest.importorskip("trl", reason="the TRL side needs trl (in the test and bench extras)")
    record, lines = run_bench(ROOT / "bench" / "train_throughput.py", "--tiny", "--steps", "2", "--batch", "2", "--json")
    assert {"rotations", "ratios", "ratio", "threads", "timing_window"} <= set(record)
    rotation = record["rotations"][0]
    assert set(rotation) == {"baseline", "trl", "tunesmith"}
    for side in rotation.values():
        assert {"useful_tokens", "seconds", "useful_tokens_per_second", "flops_per_token", "achieved_flops",
                "matmul_peak_flops", "utilisation", "profile_seconds", "profile_top_other", "threads",
                "peak_rss_bytes"} <= set(side)
        assert sum(side["profile_top_other"].values()) <= side["profile_seconds"]["other"] + 1e-3
        assert side["threads"] == record["threads"] and side["flops_per_token"] > 0
        assert side["useful_tokens"] == sum(side["tokens_per_step"][1:2])  # step 2 only is timed
    expected = rotation["tunesmith"]["useful_tokens_per_second"] / rotation["baseline"]["useful_tokens_per_second"]
    assert record["ratio"] == pytest.approx(expected)
    assert lines[-1].startswith(f"ratio={expected:.2f}")


# ---------------------------------------------------------------- serve_bench
def test_serve_bench_quick_end_to_end():
    record, lines = run_bench(ROOT / "bench" / "serve_bench.py", "--tiny", "--quick", "--slora", "--json")
    assert {"records", "ratios", "slora", "targets_met"} <= set(record)
    modes = {(r["mode"], r["adapters"]) for r in record["records"]}
    assert {("hf-base", 4), ("tunesmith", 4), ("base", 4), ("peft-mixed", 4), ("naive", 4)} <= modes
    tps = {(r["mode"], r["adapters"]): r["tokens_per_s"] for r in record["records"]}
    top = record["ratios"]["4"]
    assert top["vs_hf_base"] == pytest.approx(tps[("tunesmith", 4)] / tps[("hf-base", 4)], rel=1e-9)
    assert top["vs_base"] == pytest.approx(tps[("tunesmith", 4)] / tps[("base", 4)], rel=1e-9)
    slora = record["slora"]
    assert slora["registered"] == 16 and slora["cache_slots"] == 4 and slora["max_hot"] == 4
    # 16 requests drawn over 16 adapters with 4 slots: the timed run must load (and so evict) adapters
    assert slora["loads"][0] > 0 and slora["evictions"][0] > 0
    cold = next(r for r in record["records"] if r["mode"] == "tunesmith-cold")
    hf = next(r for r in record["records"] if r["mode"] == "hf-base" and r["adapters"] == 16)
    assert slora["cold_vs_hf_base"] == pytest.approx(cold["tokens_per_s"] / hf["tokens_per_s"], rel=1e-9)
    assert {"ttft_p50_s", "ttft_p99_s"} <= set(cold)
    assert lines[-1].startswith(f"ratio={top['vs_hf_base']:.3f}")


# ---------------------------------------------------------------- method_table
def test_method_table_protocol_selects_on_validation_and_scores_two_seeds(monkeypatch, tmp_path):
    import method_table as mt

    calls = []

    def fake_child(args, name, data, out, rate, seed, score):
        calls.append((name, rate, seed, score))
        # validation loss is lowest at 3x the advised rate; test scores differ by seed
        loss = abs(rate - 3 * {"full": 2e-5, "lora": 2e-4}[name]) * 1e3 + 0.5
        row = {"best_eval_loss": loss, "trainable_params": 10, "total_params": 100, "peak_memory_bytes": 1,
               "step_seconds": 0.1, "adapter_bytes": 5, "final_train_loss": 0.4}
        if score:
            row.update(test_score={"full": 0.8, "lora": 0.6}[name] + 0.1 * seed, ood_score=0.5)
        return row

    monkeypatch.setattr(mt, "child", fake_child)
    args = mt.parse(["--grid", "0.3,1,3"])
    full = mt.run_method(args, "full", 2e-5, tmp_path, tmp_path)
    lora = mt.run_method(args, "lora", 2e-4, tmp_path, tmp_path)
    # the same grid for each (a stage's runs start together, so their order of calls is free)
    assert sorted(c[1] for c in calls if c[0] == "lora" and not c[3]) == [6e-5, 2e-4, 6e-4]
    assert sorted(c[1] for c in calls if c[0] == "full" and not c[3]) == [6e-6, 2e-5, 6e-5]
    assert lora["best_rate"] == 6e-4 and full["best_rate"] == 6e-5  # chosen on validation loss
    assert lora["best_at_edge"] and full["best_at_edge"]
    assert sorted((c[1], c[2]) for c in calls if c[0] == "lora" and c[3]) == [(6e-4, 0), (6e-4, 1)]
    assert lora["test_scores"] == [0.6, 0.7] and lora["test_score"] == pytest.approx(0.65)
    assert full["test_score"] == pytest.approx(0.85)


def test_method_table_workers_bound_the_children_training_at_once(monkeypatch, tmp_path):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import method_table as mt

    active, peak, lock = [0], [0], threading.Lock()

    def fake_run(command, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        row = {"best_eval_loss": 1.0, "trainable_params": 1, "total_params": 2, "peak_memory_bytes": 1,
               "step_seconds": 0.1, "adapter_bytes": 1, "final_train_loss": 1.0, "test_score": 0.5, "ood_score": 0.5}
        Path(command[command.index("--result") + 1]).write_text(json.dumps(row))
        with lock:
            active[0] -= 1
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(mt.subprocess, "run", fake_run)
    monkeypatch.setattr(mt, "SLOTS", threading.BoundedSemaphore(2))
    args = mt.parse(["--grid", "0.3,1,3", "--model", "m"])
    with ThreadPoolExecutor(3) as pool:  # three methods at once, as main runs them
        rows = list(pool.map(lambda name: mt.run_method(args, name, 1e-4, tmp_path, tmp_path), ["full", "lora", "prompt"]))
    assert peak[0] == 2  # 15 children in all, never more than two training at once
    assert all(row["test_scores"] == [0.5, 0.5] for row in rows)


def test_method_table_reuse_takes_finished_runs_with_the_same_parameters(monkeypatch, tmp_path):
    import method_table as mt

    calls = []
    row = {"trainable_params": 1, "total_params": 2, "peak_memory_bytes": 1, "step_seconds": 0.1, "adapter_bytes": 1,
           "final_train_loss": 1.0, "test_score": 0.5, "ood_score": 0.5}

    def fake_run(command, **kwargs):
        result = Path(command[command.index("--result") + 1])
        calls.append(result.name)
        (result.parent / "runs" / result.stem).mkdir(parents=True)  # the run's folder, removed once it is read
        result.write_text(json.dumps({**row, "best_eval_loss": 1.0}))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(mt.subprocess, "run", fake_run)
    old = tmp_path / "old"
    old.mkdir()
    args = mt.parse(["--grid", "1,3", "--model", "m", "--reuse", str(old)])
    (old / "lora-0.0002-s0.json").write_text(json.dumps({**row, "best_eval_loss": 0.1, "args": mt.run_key(args)}))
    other = {**mt.run_key(args), "steps": 5}  # another budget: not the same run
    (old / "lora-0.0006-s0.json").write_text(json.dumps({**row, "best_eval_loss": 0.01, "args": other}))
    (old / "lora-0.0002-s0-scored.json").write_text(json.dumps({"error": "exit 1: disk full"}))  # failed: run again
    out = tmp_path / "out"
    out.mkdir()
    result = mt.run_method(args, "lora", 2e-4, tmp_path, out)
    assert sorted(calls) == ["lora-0.0002-s0-scored.json", "lora-0.0002-s1-scored.json", "lora-0.0006-s0.json"]
    assert result["grid"] == {"0.0002": 0.1, "0.0006": 1.0} and result["best_rate"] == 2e-4
    assert (out / "lora-0.0002-s0.json").is_file()  # the reused result is part of this invocation's results
    assert not any((out / "runs").iterdir())  # every run's folder removed after its result was read


def test_method_table_diverged_grid_and_advised_rates(monkeypatch, tmp_path):
    import method_table as mt

    monkeypatch.setattr(mt, "child", lambda *a, **k: {"best_eval_loss": float("nan")})
    row = mt.run_method(mt.parse([]), "lora", 2e-4, tmp_path, tmp_path)
    assert "error" in row and set(row["grid"]) == {"6e-05", "0.0002", "0.0006"}
    monkeypatch.setattr(mt, "parameter_count", lambda model: 134_515_008)
    advised = mt.advised_rates("any", ["full", "lora", "prompt", "prefix"], 1000)
    assert advised["full"][0] < advised["lora"][0]
    for method in ("prompt", "prefix"):  # method-appropriate: the planner's, or the bench's marked table
        assert advised[method][0] >= mt.PROMPT_LEARNING_FLOOR


def test_method_table_quick_end_to_end():
    record, lines = run_bench(ROOT / "bench" / "method_table.py", "--quick", "--methods", "full,lora", "--grid", "1",
                              "--json", timeout=1800)
    methods = record["methods"]
    assert set(methods) == {"full", "lora"}
    for row in methods.values():
        assert {"advised", "grid", "best_rate", "test_scores", "relative_to_full", "merges"} <= set(row)
        assert len(row["test_scores"]) == 2
    expected = methods["lora"]["test_score"] / methods["full"]["test_score"] if methods["full"]["test_score"] else None
    assert methods["lora"]["relative_to_full"] == (pytest.approx(expected) if expected is not None else None)


# ---------------------------------------------------------------- dedup_bench
def test_dedup_bench_quick_end_to_end():
    record, lines = run_bench(ROOT / "bench" / "dedup_bench.py", "--n", "2000", "--json")
    assert {"n", "planted_pairs", "backend", "tunesmith", "baseline", "ratio", "cpu_ratio"} <= set(record)
    assert record["n"] == 2000 and record["planted_pairs"] == 100
    for side in ("tunesmith", "baseline"):
        assert {"seconds", "records_per_s", "recall", "precision", "pairs"} <= set(record[side])
        assert record[side]["records_per_s"] == pytest.approx(2000 / record[side]["seconds"], rel=0.01)
    assert record["tunesmith"]["recall"] == 1.0  # every planted pair is found (all are above the threshold)
    expected = record["tunesmith"]["records_per_s"] / record["baseline"]["records_per_s"]
    assert record["ratio"] == pytest.approx(expected, abs=0.01)
    assert lines[-1].startswith(f"ratio={record['ratio']:.2f}")


# ---------------------------------------------------------------- dropout_speed
def test_dropout_speed_quick_end_to_end():
    record, lines = run_bench(ROOT / "bench" / "dropout_speed.py", "--tokens", "256", "--iterations", "2",
                              "--repeats", "3", "--json")
    assert {"threads", "tokens", "inputs", "p", "rotations", "ratio"} <= set(record)
    assert len(record["rotations"]) == 3
    for rotation in record["rotations"]:
        assert rotation["ratio"] == pytest.approx(rotation["torch"] / rotation["tunesmith"])
    assert record["ratio"] == pytest.approx(sorted(r["ratio"] for r in record["rotations"])[1])
    assert lines[-1].startswith(f"ratio={record['ratio']:.2f}")


def test_train_throughput_peak_probes_stay_outside_the_steps(monkeypatch):
    """The matmul peak is probed at the end of every timed step, and the probe's seconds belong to no step: a probe
    made to take 0.2 s leaves the window at the steps' own time (built without __init__, which would register a
    global optimizer hook in the test process)."""
    import contextlib
    import time as clock
    from types import SimpleNamespace

    import train_throughput as tt

    monkeypatch.setattr(tt, "matmul_peak_flops", lambda size=1024, repeats=10: clock.sleep(0.2) or 100.0 + repeats)
    instruments = object.__new__(tt.StepInstruments)
    instruments.__dict__.update(timed_steps=3, flop_steps=1, on_step_end=None, ends=[], resumes=[], window_peaks=[],
                                rss_at_step_end=[], flop_counter=None, profiler=None, flops=0)
    monkeypatch.setattr(tt, "flop_counter", lambda: contextlib.nullcontext(SimpleNamespace(get_total_flops=lambda: 7)))
    for _ in range(3):
        instruments.step_end()
        clock.sleep(0.01)
    assert instruments.window_peaks == [100.0 + tt.PROBE_REPEATS] * 3
    assert len(instruments.step_seconds()) == 2
    assert sum(instruments.step_seconds()) < 0.15  # two steps of ~0.01 s; the three 0.2 s probes are not in it
    assert len(instruments.rss_at_step_end) == 3 and instruments.rss_at_step_end[0] > 0  # the peak RSS at each step end


# ---------------------------------------------------------------- forward_heap
def test_forward_heap_quick_end_to_end():
    record, lines = run_bench(ROOT / "bench" / "forward_heap.py", "--quick", "--json")
    assert {"model", "threads", "rows", "slopes", "ratio"} <= set(record)
    assert [(r["method"], r["batch"], r["seq"]) for r in record["rows"]] == [
        ("lora", 1, 64), ("lora", 2, 128), ("adapters", 1, 64), ("adapters", 2, 128)]
    for row in record["rows"]:
        assert row["saved_bytes"] > 0 and row["heap_bytes"] == row["rss_growth_bytes"] - row["saved_bytes"]
    for method, s in record["slopes"].items():  # from the rows, not constants
        low, high = (r for r in record["rows"] if r["method"] == method)
        tokens = high["tokens"] - low["tokens"]
        assert s["heap_per_token"] == pytest.approx((high["heap_bytes"] - low["heap_bytes"]) / tokens)
        assert s["saved_per_token"] == pytest.approx((high["saved_bytes"] - low["saved_bytes"]) / tokens)
    if record["ratio"] is not None:
        assert record["ratio"] == pytest.approx(record["slopes"]["adapters"]["heap_per_token"]
                                                / record["slopes"]["lora"]["heap_per_token"])
    assert lines[-1].startswith("ratio=")
