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
    ("edit_time.py", "| matched | 2 | 2 |"),
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


def test_converge_ablation_rows_accumulate(tmp_path, monkeypatch):
    """Each ablation run adds its rows to the stored table; rerunning one replaces its own rows only."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import converge

    def row(label: str, seed: int, vader: float) -> dict:
        score = {"vader": vader, "rep4": 0.3}
        return {"tone": "gloomy", "schedule": f"matched, {label}", "seed": seed, "steps": 150, "seconds": 9.0,
                "fresh_d": 0.9, "fresh_d_pooled": 0.7, "oracle_d": 0.8, "mean_gap_left": 0.1, "projection": 0.9,
                "cosine": 0.99, "base": score, "instructed": score, "after": {"0.8": score}, "pairs": []}

    converge.ablations([row("a", 0, 0.11)], tmp_path, 60.0)
    converge.ablations([row("b", 0, 0.22)], tmp_path, 60.0)
    text = converge.ablations([row("a", 0, -0.33)], tmp_path, 60.0)
    lines = [line for line in text.splitlines() if line.startswith("| gloomy")]
    assert len(lines) == 2 and "+0.22" in lines[0] and "-0.33" in lines[1]
    assert "+0.11" not in text and "Measured by:" in text
    assert lines[0].endswith("| – | – | – | – |")  # rows stored before Self-BLEU and length were recorded
