"""Which layer should the adapter sit at? A single-layer sweep on tinystories-656k (2 layers, d=128).

    python benchmarks/sweep_tinystories.py                  # prints the table, updates RESULTS.md
    python benchmarks/sweep_tinystories.py --report docs/report.png   # also: a 3-layer edit, its ablation,
                                                            # the HTML report and a headless-Chromium screenshot

Concept: TinyStories openings where a child is "sad/upset/scared/lonely" (source) or
"happy/glad/excited/proud" (target); the prompt ends on the same words either way ("… saw a dog and"),
so the mood is only in the context. Read stream: blocks.1.hook_resid_post. Every candidate gets the
same seed and budget. Behaviour metric: mean KL(target twin's base next-token distribution ‖ edited
source's), in nats, over the held-out pairs (lower: the edited source prompt continues like its
happy twin).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

from are_lens import Concept, Edit, ablate, edit, sweep
from are_lens.ablation import save_ablation
from are_lens.report import write_report

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Sam", "Anna"]
THINGS = ["dog", "ball", "cat", "toy", "kite", "bird"]
SAD = ["sad", "upset", "scared", "lonely"]
HAPPY = ["happy", "glad", "excited", "proud"]
CANDIDATES = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
              "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
READ = ["blocks.1.hook_resid_post"]
BUDGET = dict(rounds=8, reply_tokens=4, seed=0, progress=False)
SECTION = "Layer sweep (tinystories-656k)"


def stories(moods: list[str], n: int = 48) -> list[str]:
    """`n` ≤ 48 distinct openings: every (name, thing) pair once, so no prompt sits in both splits."""
    return [f"Once upon a time, {NAMES[i % 8]} was very {moods[i % 4]}. {NAMES[i % 8]} saw a {THINGS[i // 8 % 6]} "
            "and" for i in range(n)]


def mood_concept(n: int = 48) -> Concept:
    return Concept(stories(SAD, n), stories(HAPPY, n), name="sad → happy")


def load_tinystories():
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _common.SHARED / "models" / "tinystories-656k"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return TransformerBridge.boot_transformers(str(folder), hf_model=model, tokenizer=tokenizer)


def next_token_kl(concept: Concept, seed: int = 0):
    """metric(model, edit): mean KL(base next-token dist. of the target twin ‖ edited source's), held-out pairs."""
    split = concept.split(seed)

    @torch.no_grad()
    def last_logprobs(model, prompts):
        out = []
        for prompt in prompts:
            tokens = model.tokenizer(prompt, return_tensors="pt").input_ids
            out.append(torch.log_softmax(model(tokens)[0, -1].float(), -1))
        return torch.stack(out)

    cache = {}

    def metric(model, variant) -> float:
        if "target" not in cache:
            cache["target"] = last_logprobs(model, split.test_target)
        with variant.applied(model):
            source = last_logprobs(model, split.test_source)
        target = cache["target"]
        return float((target.exp() * (target - source)).sum(-1).mean())

    return metric


def markdown(rows: list[dict]) -> str:
    cols = ["layer", "fresh_d_accuracy", "fresh_d_accuracy_pooled", "projection", "cosine", "mean_gap_left",
            "target_drift", "rounds", "converged", "weight_norm", "metric", "seconds"]
    head = ["layer", "fresh-D acc", "pooled acc", "projection", "cosine", "gap left", "target drift", "rounds",
            "converged", "‖W‖", "next-token KL to target", "seconds"]

    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else f"`{v}`" if isinstance(v, str) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 2000) -> Path:
    """Render `html` in headless Chromium (no network, throwaway profile) to `png`."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png.resolve()}",
                        f"--window-size={width},{height}", html.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return png


def make_report(model, concept: Concept, png: Path) -> None:
    at = ["blocks.0.hook_attn_out", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    result = edit(model, concept, at=at, read=READ, **BUDGET)
    rows = ablate(result, model, concept, metric=next_token_kl(concept))
    with tempfile.TemporaryDirectory() as folder:
        result.save(Path(folder) / "edit")
        save_ablation(rows, Path(folder) / "edit")
        html = write_report(Path(folder) / "edit", Path(folder) / "report.html",
                            title="ARE edit report: sad → happy on tinystories-656k")
        full = screenshot(html, Path(folder) / "full.png", height=3600)
        from PIL import Image

        image = Image.open(full).convert("RGB")
        image = image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.LANCZOS)
        png.parent.mkdir(parents=True, exist_ok=True)
        image.quantize(colors=128).save(png, optimize=True)
    print(f"screenshot {png} ({png.stat().st_size // 1024} KB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--report", type=Path, default=None, help="also write a report screenshot PNG here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_tinystories()
    concept = mood_concept()
    start = time.perf_counter()
    rows = sweep(model, concept, at=CANDIDATES, read=READ, metric=next_token_kl(concept), **BUDGET)
    base_kl = next_token_kl(concept)(model, Edit([]))  # no interventions: the base model
    table = markdown(rows)
    print(table)
    print(f"base next-token KL to target: {base_kl:.3f}; sweep {time.perf_counter() - start:.0f} s")
    if not args.no_write:
        budget = ", ".join(f"{k}={v}" for k, v in BUDGET.items() if k != "progress")
        _common.write_section(
            SECTION,
            f"`python benchmarks/sweep_tinystories.py` — `are_lens.sweep`: one single-hook edit per candidate, "
            f"read `{READ[0]}`, default matched schedule, {budget}; concept: 48 TinyStories openings with a "
            f"sad vs happy mood word earlier in the prompt (same last tokens), 20% held out; CPU, "
            f"{args.threads} thread(s). fresh-D acc: last round's held-out accuracy of a fresh MLP "
            f"discriminator (0.5 = indistinguishable); projection/cosine: the edited source mean's shift along "
            f"the base source→target gap; gap left: the distance between the edited source and target means, "
            f"target drift: how far the edit moved the target mean, both in units of the base gap; "
            f"next-token KL: mean KL(base target twin ‖ edited source) "
            f"over held-out pairs, in nats (base model: {base_kl:.3f}).\n\n{table}")
    if args.report is not None:
        make_report(model, concept, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
