"""The benchmarks' quick modes still run end to end (slow: run with `make test-all` or `-m slow`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_method_table_quick_prints_every_method_with_the_documented_keys():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "method_table.py"), "--quick", "--json"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio=")
    methods = json.loads(lines[-2])["methods"]
    assert set(methods) == {"full", "lora", "qlora", "adapters", "prefix", "prompt"}
    keys = {"trainable_params", "peak_memory_bytes", "step_seconds", "adapter_bytes", "test_score",
            "relative_to_full", "ood_score", "merges"}
    for name, row in methods.items():
        assert set(row) == keys, name
        assert row["trainable_params"] > 0 and row["adapter_bytes"] > 0
    assert methods["lora"]["merges"] == "yes" and methods["prefix"]["merges"] == "no"
