"""`are-lens demo`: one tone edit on SmolLM2-135M-Instruct, with before/after replies and scores.

Concept: plain instructions (source) → the same instructions asking for a cheerful reply (target).
The edit is judged on held-out instructions by mean VADER compound, beside the instructed ceiling.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from . import evaluate
from .concept import Concept
from .edit import edit
from .inspect import plot_rounds
from .models import load_model

CHEERFUL = " Answer in a very cheerful, happy, enthusiastic tone."


def instructions() -> list[str]:
    """119 everyday instructions written for this demo (shipped with the package)."""
    text = files("are_lens").joinpath("data/instructions.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class DemoPlan:
    n_train: int
    n_eval: int
    rounds: int
    steps_per_round: int
    batch_size: int
    reply_tokens: int
    max_new_tokens: int


# Sized to a few minutes on 2 CPU cores (134 s measured, 95 s of it training): the default schedule with
# half-size adapter batches.
FULL = DemoPlan(n_train=64, n_eval=24, rounds=4, steps_per_round=25, batch_size=8, reply_tokens=16,
                max_new_tokens=48)
QUICK = DemoPlan(n_train=16, n_eval=4, rounds=1, steps_per_round=6, batch_size=8, reply_tokens=4,
                 max_new_tokens=16)


def run_demo(out: str | Path = "are_lens_demo", quick: bool = False, seed: int = 0,
             model: str = "smollm2-135m-instruct") -> dict[str, Any]:
    """Train the cheerful edit, compare replies before and after, and write everything to `out`."""
    plan = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"Loading {model} …", flush=True)
    bridge = load_model(model)
    prompts = instructions()
    train, held_out = prompts[: plan.n_train], prompts[-plan.n_eval :]
    concept = Concept(train, [p + CHEERFUL for p in train], chat=True, name="cheerful")
    n = bridge.cfg.n_layers
    at, read = range(n // 5, n // 3), range(n // 3, n // 2)  # SmolLM2 (30 layers): adapters 6–9, reads 10–14
    print(f"Training the edit: adapters at layers {list(at)}, discriminator reads {list(read)}", flush=True)
    result = edit(bridge, concept, at=at, read=read, rounds=plan.rounds, steps_per_round=plan.steps_per_round,
                  batch_size=plan.batch_size, reply_tokens=plan.reply_tokens, seed=seed)
    trained = time.perf_counter()

    def replies(prompts: list[str], **kw: Any) -> list[str]:
        return evaluate.generate(bridge, prompts, max_new_tokens=plan.max_new_tokens, progress=False, **kw)

    print(f"Generating replies to {len(held_out)} held-out instructions …", flush=True)
    before = replies(held_out)
    after = replies(held_out, edit=result)
    instructed = replies([p + CHEERFUL for p in held_out])
    scores = {
        name: {"vader": evaluate.mean_sentiment(r), "repetition_4": evaluate.repetition_4(r)}
        for name, r in (("base", before), ("edited", after), ("instructed", instructed))
    }
    figures = {
        "model": model, "quick": quick, "seed": seed, "at": result.hooks, "read": result.config["read"],
        "rounds_run": len(result.history), "converged": result.converged, "strength": result.config["strength"],
        "final_fresh_d_accuracy": result.history[-1]["fresh_d_accuracy"],
        "scores": scores, "train_seconds": trained - start, "total_seconds": time.perf_counter() - start,
        "examples": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(held_out, before, after)],
    }
    result.save(out / "edit")
    (out / "figures.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    plot_rounds(result.history, out / "rounds.png", stop_band=result.config["stop_band"])
    _print_report(figures, out)
    return figures


def _clip(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_report(figures: dict[str, Any], out: Path) -> None:
    print()
    for example in figures["examples"][:3]:
        print(f"prompt: {example['prompt']}")
        print(f"  before: {_clip(example['before'])}")
        print(f"  after:  {_clip(example['after'])}")
    print()
    print(f"{'':12}{'VADER (mean)':>14}{'Repetition-4':>14}")
    for name, s in figures["scores"].items():
        print(f"{name:12}{s['vader']:>+14.2f}{s['repetition_4']:>14.2f}")
    print()
    print(f"rounds: {figures['rounds_run']}, last fresh-D held-out accuracy {figures['final_fresh_d_accuracy']:.2f}"
          f" ({'converged' if figures['converged'] else 'not converged'}); edit applied at its recorded strength "
          f"{figures['strength']:g}")
    print(f"time: {figures['total_seconds']:.0f} s; saved the edit, figures.json and rounds.png to {out}/")
