"""How long does one edit take on this machine, and where does the time go?

One `edit()` per schedule of converge.py's cheerful concept and workload (SmolLM2-135M-Instruct, 64 + 64
training prompts, adapters at blocks 6-9, reads at 14-29, seed 0), run alone: the wall time, split by the
edit's history into the rounds' adapter steps and their measurement (fresh discriminators, gap figures,
probes, KL to the base model), and the rest (tokenising, the teacher-forced replies, setting up). The issue's
target is 3 minutes on the 2-core CPU. Run it on an otherwise idle machine: it measures time.

    python benchmarks/edit_time.py                            # the default schedule: ~5 min on 2 cores
    python benchmarks/edit_time.py --schedules matched paper  # and the paper preset (160 steps, longer)
    python benchmarks/edit_time.py --set rounds=2             # a candidate budget (a labelled row)
    python benchmarks/edit_time.py --quick                    # tiny model, seconds (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import time

import _common
import converge
import torch

from are_lens import edit


def timed(schedule: str, options: dict, work: converge.Workload) -> dict:
    """One edit's wall time and its history's split of it."""
    concept = converge.tone_concept(work, "cheerful")
    started = time.perf_counter()
    result = edit(work.model, concept, at=work.at, read=work.read, schedule=schedule, seed=0, progress=False,
                  **{**work.budget, **options})
    wall = time.perf_counter() - started
    trained = [h for h in result.history if h["adapter_seconds"] is not None]
    adapter = sum(h["adapter_seconds"] for h in trained)
    rounds = sum(h["seconds"] for h in result.history)
    n_steps = converge.steps(result, concept)
    return {"schedule": schedule + "".join(f", {k}={v}" for k, v in options.items()), "steps": n_steps,
            "measurements": len(result.history), "wall": wall, "setup": wall - rounds, "measurement": rounds - adapter,
            "adapter": adapter, "per_step": adapter / max(n_steps, 1),
            "per_measurement": (rounds - adapter) / len(result.history)}


def table(rows: list[dict]) -> str:
    lines = ["| schedule | adapter steps | measurements | wall s | setup s | measurement s | adapter steps s | "
             "s per step | s per measurement |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['steps']} | {r['measurements']} | {r['wall']:.0f} | {r['setup']:.0f} | "
              f"{r['measurement']:.0f} | {r['adapter']:.0f} | {r['per_step']:.2f} | {r['per_measurement']:.1f} |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--schedules", nargs="+", default=["matched"])
    parser.add_argument("--set", nargs="+", default=[], metavar="OPTION=JSON", help="edit() options for every run")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    if any("=" not in item for item in args.set):
        parser.error(f"--set takes OPTION=JSON items, e.g. rounds=2; got {args.set}")
    options = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    torch.set_num_threads(args.threads)
    work = converge.workload(args.quick)
    rows = []
    for schedule in args.schedules:
        rows.append(timed(schedule, options, work))
        print(json.dumps(rows[-1]), flush=True)
    body = (f"`{_common.command()}` — {_common.machine()}. One edit "
            "of the cheerful concept (seed 0) per row, alone on the machine; setup is the wall time outside the "
            "rounds (tokenising, teacher-forced replies), measurement each round's fresh discriminators, gap "
            "figures, probes and KL to the base model, adapter steps the training.\n\n" + table(rows))
    if not args.quick:
        _common.write_section("Time of one edit (SmolLM2-135M-Instruct, CPU)", body)
    print(body)


if __name__ == "__main__":
    main()
