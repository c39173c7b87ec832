"""Does the edit converge and change behaviour? `matched` (default) vs `paper` schedules on SmolLM2.

Concepts: plain Alpaca instructions → the same + a cheerful-tone request, and → a negative tone (the
one SmolLM2 follows best among angry/sad/gloomy/pessimistic/rude, measured here first). Two seeds.
Prints per run: steps, seconds (of training, from the edit's history), convergence figures, VADER and
Repetition-4 before/after at several generation strengths and instructed, Self-BLEU and reply length
(collapse across replies, which Repetition-4 misses), five before/after pairs; writes the table to
benchmarks/RESULTS.md. Trained edits are cached in --out and re-evaluated on rerun.

    python benchmarks/converge.py            # 12 min on 2 cores from cached edits; 13-14 min per new matched edit
    python benchmarks/converge.py --quick    # tiny model, seconds (a test runs this)
    python benchmarks/converge.py --tones gloomy --seeds 0 --set reply_tokens=0   # an ablation

Ablations (`--set OPTION=JSON` for edit() options, `--source-suffix` for a contrastive source set, `--at`/
`--read` for other blocks) are cached and labelled separately, each label naming its edited and read blocks;
their rows gather in one "Convergence ablations" section of RESULTS.md, each with the command that measured it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import _common
import torch

import are_lens
from are_lens import Concept, edit, evaluate, hook_names
from are_lens.backends import backend_for
from are_lens.rounds import RoundsConfig, gap_figures, preset

TONES = {
    "cheerful": " Answer in a very cheerful, happy, enthusiastic tone.",
    "angry": " Answer in a very angry, irritated, hostile tone.",
    "sad": " Answer in a very sad, sorrowful, mournful tone.",
    "gloomy": " Answer in a very gloomy, dark, bleak tone.",
    "pessimistic": " Answer in a very pessimistic, negative, hopeless tone.",
    "rude": " Answer in a very rude, dismissive, insulting tone.",
}


def alpaca(n_train: int, n_eval: int) -> tuple[list[str], list[str]]:
    train = json.loads(_common.shared("data", "refusal_direction", "splits", "harmless_train.json").read_text())
    val = json.loads(_common.shared("data", "refusal_direction", "splits", "harmless_val.json").read_text())
    short = [r["instruction"] for r in train if len(r["instruction"]) < 120]
    return short[:n_train], [r["instruction"] for r in val if len(r["instruction"]) < 120][:n_eval]


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every run edits and evaluates: the model, Alpaca instructions (training, held out), whether they
    are chat prompts, the edited and read blocks, reply length in tokens, and edit() options (`--quick`'s
    tiny budget)."""

    model: object
    train: list[str]
    held_out: list[str]
    chat: bool
    at: Sequence[int]
    read: Sequence[int]
    tokens: int
    budget: dict


def workload(quick: bool) -> Workload:
    """SmolLM2-135M-Instruct with 64 training and 30 held-out instructions, adapters at blocks 6-9, reads at
    14-29, 48-token replies; `quick`: the tiny TinyStories model, a dozen prompts, one round of two steps."""
    if quick:
        tiny = are_lens.load_model(str(_common.shared("models", "tinystories-656k")))
        return Workload(tiny, *alpaca(12, 3), chat=False, at=[0], read=[1], tokens=8,
                        budget=dict(rounds=1, steps_per_round=2, reply_tokens=2))
    return Workload(are_lens.load_model("smollm2-135m-instruct"), *alpaca(64, 30), chat=True, at=range(6, 10),
                    read=(14, 18, 22, 26, 29), tokens=48, budget={})


def tone_concept(work: Workload, tone: str, source_suffix: str = "") -> Concept:
    """The training instructions (+ `source_suffix`) → the same with the tone request."""
    return Concept([p + source_suffix for p in work.train], [p + TONES[tone] for p in work.train], chat=work.chat,
                   name=tone)


def steps(result: are_lens.Edit, concept: Concept) -> int:
    """Adapter steps the edit took: `steps_per_round` per trained round (matched), or `adapter_epochs`
    passes of `batch_size` rows over the training source prompts (paper)."""
    config, trained = result.config, sum(1 for h in result.history if h["adapter_loss"] is not None)
    if config["schedule"] == "matched":
        return trained * config["steps_per_round"]
    per_pass = -(-len(concept.split(config["seed"]).train_source) // config["batch_size"])
    return trained * config["adapter_epochs"] * per_pass


def load_cached(folder: Path) -> are_lens.Edit | None:
    """An edit an earlier run saved, or None when absent or written by an older are_lens."""
    try:
        return are_lens.Edit.load(folder)
    except (FileNotFoundError, ValueError):
        return None


def trained_as_now(cached: are_lens.Edit, at: object, read: object, schedule: str, seed: int,
                   options: dict) -> bool:
    """Whether a saved edit's config records what edit() would train now with these arguments (the
    schedule's preset with `options`): an edit trained under an earlier default or other reads is trained
    again."""
    fields = {f.name for f in dataclasses.fields(RoundsConfig)}
    rounds = dataclasses.replace(preset(schedule), seed=seed, **{k: v for k, v in options.items() if k in fields})
    wanted = json.loads(json.dumps({"at": hook_names.normalize(at, "at"), "read": hook_names.normalize(read, "read"),
                                    **{k: v for k, v in options.items() if k not in fields}, **rounds.to_dict()}))
    return {k: cached.config.get(k) for k in wanted} == wanted


def gaps(result: are_lens.Edit) -> dict[str, float]:
    """Gap figures of the last round against round 0 (`rounds.gap_figures`), from the edit's saved
    last-token snapshots of the training split, the same for every edit whatever it was matched to:
    `mean_gap_left` to the edited target rows (what a discriminator on the edited model sees) and
    `gap_to_base` to the base target rows (the target representations the concept defines)."""
    first, last = (result.snapshots[r] for r in (min(result.snapshots), max(result.snapshots)))
    figures = gap_figures(first["source"], first["target"], last["source"], last["target"])
    to_base = gap_figures(first["source"], first["target"], last["source"], last["target"], first["target"])
    return {**figures, "gap_to_base": to_base["mean_gap_left"]}


def score(replies: list[str]) -> dict[str, float]:
    """Tone (VADER), repetition within replies (Rep-4), and collapse across them: Self-BLEU and mean length
    in words catch an edit that trades answers for one short stock line, which Rep-4 does not."""
    return {"vader": evaluate.mean_sentiment(replies), "rep4": evaluate.repetition_4(replies),
            "self_bleu": evaluate.self_bleu(replies), "words": sum(len(r.split()) for r in replies) / len(replies)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--schedules", nargs="+", default=["matched", "paper"])
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    parser.add_argument("--tones", nargs="+", default=None, help="which tones to edit (default: cheerful and the "
                        "negative tone the model follows best)")
    parser.add_argument("--set", nargs="+", default=[], metavar="OPTION=JSON",
                        help="edit() options for every run, e.g. reply_tokens=0 preserve_weight=1 (ablations)")
    parser.add_argument("--source-suffix", default="", help="appended to the source prompts: a contrastive "
                        "source, e.g. ' Answer in a neutral, plain, matter-of-fact tone.' (default: plain prompts)")
    parser.add_argument("--at", type=int, nargs="+", default=None, help="edited blocks (default 6-9)")
    parser.add_argument("--read", type=int, nargs="+", default=None, help="read blocks (default 14 18 22 26 29)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default=str(Path.home() / ".cache" / "are_lens" / "converge"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = workload(args.quick)
    model, held_out, chat, tokens, budget = work.model, work.held_out, work.chat, work.tokens, work.budget
    tones = ["cheerful", "sad"] if args.quick else list(TONES)
    at, read = args.at or work.at, args.read or work.read
    if any("=" not in item for item in args.set):
        parser.error(f"--set takes OPTION=JSON items, e.g. preserve_weight=1; got {args.set}")
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    ablation = bool(extra or args.source_suffix or args.at or args.read)  # every ablation names its blocks
    variant = "".join(f"-{k}{v}" for k, v in sorted(extra.items())) + (
        f"-source{hashlib.sha256(args.source_suffix.encode()).hexdigest()[:8]}" if args.source_suffix else "") + (
        f"-at{'_'.join(map(str, at))}-read{'_'.join(map(str, read))}" if ablation else "")
    label = "".join(f", {k}={v}" for k, v in extra.items()) + (  # the variant as the table shows it
        f", source +{args.source_suffix!r}" if args.source_suffix else "") + (
        f", at {list(at)} read {list(read)}" if ablation else "")

    def replies(prompts: list[str], e: are_lens.Edit | None = None) -> list[str]:
        return evaluate.generate(model, prompts, edit=e, chat=chat, max_new_tokens=tokens, progress=False)

    base = replies(held_out)
    ceilings = {tone: score(replies([p + TONES[tone] for p in held_out])) for tone in args.tones or tones}
    if args.tones is None:
        negative = min((t for t in tones if t != "cheerful"), key=lambda t: ceilings[t]["vader"])
        print(f"negative tone followed best: {negative}")
    print(f"base {score(base)}; instructed ceilings {json.dumps(ceilings)}")

    rows = []
    for tone in args.tones or ("cheerful", negative):
        concept = tone_concept(work, tone, args.source_suffix)
        for schedule in args.schedules:
            for seed in args.seeds:
                folder = Path(args.out) / f"{tone}-{schedule}{variant}-{seed}{'-quick' if args.quick else ''}"
                cached = load_cached(folder)
                if (cached is not None and cached.fingerprint == backend_for(model).fingerprint()
                        and trained_as_now(cached, at, read, schedule, seed, {**budget, **extra})):
                    result = cached  # trained by an earlier run on this model: evaluate it again
                else:
                    result = edit(model, concept, at=at, read=read, schedule=schedule, seed=seed, strength=1.0,
                                  progress=False, **{**budget, **extra})
                    result.save(folder)
                seconds = sum(h["seconds"] for h in result.history)
                last, first = result.history[-1], result.history[0]
                after = {s: replies(held_out, result.scaled(s)) for s in args.strengths}
                row = {"tone": tone, "schedule": schedule + label,
                       "seed": seed, "steps": steps(result, concept), "seconds": seconds,
                       "fresh_d": last["fresh_d_accuracy"], "fresh_d_pooled": last.get("fresh_d_accuracy_pooled"),
                       "oracle_d": first["oracle_d_accuracy"], **gaps(result),
                       "base": score(base), "instructed": ceilings[tone],
                       "after": {str(s): score(r) for s, r in after.items()},
                       "pairs": [{"prompt": p, "before": b, "after": a}
                                 for p, b, a in list(zip(held_out, base, after[args.strengths[-1]]))[:5]]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    wall = time.perf_counter() - started
    if variant and not args.quick:  # the tiny model's figures are a smoke test, not results
        _common.write_section("Convergence ablations (SmolLM2-135M-Instruct)", ablations(rows, Path(args.out), wall))
    elif not args.quick:
        _common.write_section("Convergence (SmolLM2-135M-Instruct, tone concepts)", table(rows, ceilings, wall))
    print(table(rows, ceilings, wall))


def ablations(rows: list[dict], out: Path, wall: float) -> str:
    """All ablation rows measured so far (kept in `out`/ablations.json, this run's replacing its own), with
    the command and machine that measured each."""
    store = out / "ablations.json"
    command = f"`{_common.command()}` — {_common.machine()}, wall {wall / 60:.1f} min"
    saved = json.loads(store.read_text()) if store.exists() else []
    fresh = [{**r, "command": command} for r in rows]
    keys = {(r["tone"], r["schedule"], r["seed"]) for r in fresh}
    saved = [r for r in saved if (r["tone"], r["schedule"], r["seed"]) not in keys] + fresh
    store.write_text(json.dumps(saved, indent=1))
    commands = "\n".join(f"* {c}" for c in dict.fromkeys(r["command"] for r in saved))
    return markdown_rows(saved) + f"\n\nMeasured by:\n\n{commands}\n"


def markdown_rows(rows: list[dict]) -> str:
    """One table line per run: convergence figures, VADER and Rep-4 at every strength, Self-BLEU and reply
    length at the strongest ("–" where a row did not measure a figure or strength)."""
    strengths = sorted({s for r in rows for s in r["after"]}, key=float)  # rows may differ in strengths measured
    top = strengths[-1] if strengths else ""
    head = ("| tone | schedule | seed | steps | s | fresh-D last | pooled | oracle | gap to edited | gap to base | "
            "target drift | proj | "
            "cos | VADER base | " + " | ".join(f"VADER ×{s}" for s in strengths) + " | VADER instr. | Rep-4 base | "
            + " | ".join(f"Rep-4 ×{s}" for s in strengths)
            + f" | Self-BLEU base | Self-BLEU ×{top} | words base | words ×{top} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def shown(figures: dict, key: str, form: str) -> str:
        return "–" if figures.get(key) is None else format(figures[key], form)

    for r in rows:
        pooled = "–" if r["fresh_d_pooled"] is None else f"{r['fresh_d_pooled']:.2f}"
        base, strongest = r["base"], r["after"].get(top, {})
        after = {s: r["after"].get(s, {}) for s in strengths}
        lines.append(
            f"| {r['tone']} | {r['schedule']} | {r['seed']} | {r['steps']} | {r['seconds']:.0f} | {r['fresh_d']:.2f} | "
            f"{pooled} | {r['oracle_d']:.2f} | {r['mean_gap_left']:.2f} | {shown(r, 'gap_to_base', '.2f')} | "
            f"{shown(r, 'target_drift', '.2f')} | "
            f"{r['projection']:.2f} | {r['cosine']:.2f} | "
            f"{base['vader']:+.2f} | " + " | ".join(shown(after[s], "vader", "+.2f") for s in strengths)
            + f" | {r['instructed']['vader']:+.2f} | {base['rep4']:.2f} | "
            + " | ".join(shown(after[s], "rep4", ".2f") for s in strengths)
            + f" | {shown(base, 'self_bleu', '.2f')} | {shown(strongest, 'self_bleu', '.2f')} | "
            f"{shown(base, 'words', '.0f')} | {shown(strongest, 'words', '.0f')} |")
    return "\n".join(lines)


def table(rows: list[dict], ceilings: dict, wall: float) -> str:
    ceiling_line = ", ".join(f"{t} {c['vader']:+.2f} (Rep-4 {c['rep4']:.2f}, Self-BLEU {c['self_bleu']:.2f}, "
                             f"{c['words']:.0f} words)" for t, c in ceilings.items())
    first = {(r["tone"], r["schedule"]): r for r in reversed(rows)}  # each tone × schedule's first seed
    runs = list(reversed(first.values()))
    pairs = "\n".join(
        f"* _{p['prompt']}_ — before: {p['before'][:120]!r}\n" + "\n".join(
            f"  * {r['tone']}, {r['schedule']}, seed {r['seed']}: {r['pairs'][i]['after'][:120]!r}" for r in runs)
        for i, p in enumerate(runs[0]["pairs"])) if rows else ""
    return (f"`{_common.command()}` — {_common.machine()}; wall time {wall / 60:.1f} min.\n\n"
            f"Instructed ceilings (mean VADER on the held-out prompts): {ceiling_line}.\n\n"
            + markdown_rows(rows) + f"\n\nReplies before and after (first seed, strongest strength):\n\n{pairs}\n")


if __name__ == "__main__":
    main()
