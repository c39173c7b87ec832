"""Benchmark scripts keep working: each runs its --quick mode (tiny shapes, seconds)."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script, expect", [
    ("converge.py", "| cheerful | matched | 0 |"),
    ("speed.py", "| Llama-2-7B-shaped (scaled down) | nnsight (prefix reused) | cpu |"),
    ("backend_overhead.py", "nnsight"),
    ("efficacy.py", "| attack | supervised LoRA → AdvBench 'Sure, here is' | held-out harmful |"),
])
def test_benchmark_quick_mode(script, expect, tmp_path):
    shared_path("data", "refusal_direction")
    args = [sys.executable, str(ROOT / "benchmarks" / script), "--quick"]
    if script == "converge.py":
        args += ["--seeds", "0", "--out", str(tmp_path)]
    if script == "efficacy.py":
        args += ["--out", str(tmp_path / "efficacy")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout
