"""Shared plumbing for benchmark scripts: the shared data folder, the machine line, RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARE_LENS_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        sys.exit(f"{path} is absent: set ARE_LENS_SHARED to the shared data folder")
    return path


def command() -> str:
    """The command line that ran this benchmark, as RESULTS.md shows it."""
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}")


def write_section(heading: str, body: str) -> None:
    """Replace (or append) the `## heading` section of benchmarks/RESULTS.md."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n", encoding="utf-8")
