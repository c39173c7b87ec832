"""edit(): the front door. Validates arguments, builds adapters and runs the adversarial rounds."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from . import adapters, checkpoint, discriminators, hook_names
from .artifact import Edit
from .backends import Backend, backend_for
from .concept import Concept
from .files import writable_folder
from .rounds import BatchSize, RoundsConfig, Rows, check_matched_only, preset, run_rounds, teacher_replies

STRENGTH = {"matched": 1.25, "paper": 1.0}
"""Generation strength each schedule's edits record by default, chosen in benchmarks/converge.py
(SmolLM2-135M-Instruct, reads at blocks 14–29): 1.25 is the one strength measured at which both tone
directions meet their targets on two seeds with Repetition-4 within base + 0.10 (cheerful +0.68 / +0.72,
gloomy −0.12 / −0.32); at 1.0 one gloomy seed repeats more, at 1.5 the other."""
_TUNABLE = {f.name for f in dataclasses.fields(RoundsConfig)} - {"schedule", "stop_band", "seed"}
_CHOICES = {"discriminator": discriminators.KINDS, "mean_metric": ("standardized", "raw"),
            "mean_positions": ("pooled", "each"), "source_replies": ("target", "own"), "anchor": ("edited", "start")}


def _checked_options(cfg: RoundsConfig, options: dict[str, Any]) -> RoundsConfig:
    """Apply keyword overrides to a preset, each checked against the type of its default."""
    for name, value in options.items():
        if name not in _TUNABLE:
            raise TypeError(f"edit() got an unknown option {name}=; valid options: {sorted(_TUNABLE)}")
        default = getattr(cfg, name)
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}= must be an int; got {value!r}")
            low = 0 if name in ("reply_tokens", "seed") else 1
            if value < low:
                raise ValueError(f"{name}= must be ≥ {low}; got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}= must be a number; got {value!r}")
            if value < 0:
                raise ValueError(f"{name}= must be ≥ 0; got {value!r}")
            if name.endswith("_weight") and not math.isfinite(value):  # a loss weight; lr=inf is a NumericsError
                raise ValueError(f"{name}= must be a finite number ≥ 0; got {value!r}")
            value = float(value)
        elif name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(f"{name}= must be one of {_CHOICES[name]}; got {value!r}")
        cfg = dataclasses.replace(cfg, **{name: value})
    check_matched_only(cfg)
    return cfg


def _check_stop_band(stop_band: Any) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in stop_band)
    except (TypeError, ValueError):
        raise TypeError(f"stop_band= must be a pair (low, high) of accuracies; got {stop_band!r}") from None
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"stop_band= must satisfy 0 ≤ low < high ≤ 1; got {stop_band!r}")
    return low, high


def _stream_widths(backend: Backend, names: list[str], row: list[int]) -> dict[str, int]:
    """Run one short prompt to learn each hook's width; adapters and reads need [batch, pos, d]."""
    with torch.no_grad():
        streams = backend.read(backend.batch([row]), names)
    widths = {}
    for name, value in streams.items():
        if value.dim() != 3:
            raise ValueError(
                f"hook {name!r} carries a tensor of shape {tuple(value.shape)}; are_lens edits and reads "
                "streams shaped [batch, pos, d] (e.g. hook_resid_post, hook_mlp_out, mlp.hook_post)"
            )
        widths[name] = int(value.shape[-1])
    return widths


@contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU, a fooled discriminator's gradients underflow into denormals and backward slows 4–6×."""
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _encode(backend: Backend, concept: Concept, prompts: list[str]) -> list[list[int]]:
    rows = backend.tokenize(concept.render(backend.tokenizer, prompts), add_special_tokens=not concept.chat)
    longest = max(len(r) for r in rows)
    if backend.n_ctx is not None and longest > backend.n_ctx:
        raise ValueError(f"concept= holds a prompt of {longest} tokens; the model's context is {backend.n_ctx}")
    vocab = int(backend.input_embeddings().shape[0])
    top = max((max(r) for r in rows if r), default=0)
    if top >= vocab:
        raise ValueError(f"the model's tokenizer produced token id {top}, but its embedding has only {vocab} rows: "
                         "the tokenizer does not belong to this model")
    return rows


def _with_replies(backend: Backend, concept: Concept, cfg: RoundsConfig, seed: int,
                  sizer: BatchSize | None = None) -> Rows:
    """Token rows of the split; with `reply_tokens`, each pair gets the target prompt's own greedy reply."""
    split = concept.split(seed)
    sets = [_encode(backend, concept, prompts) for prompts in
            (split.train_source, split.train_target, split.test_source, split.test_target)]
    k = cfg.reply_tokens
    if k == 0:
        return Rows(*sets)
    sizer = BatchSize(cfg.batch_size, backend.device) if sizer is None else sizer
    train_replies = teacher_replies(backend, sets[1], k, sizer)
    test_replies = teacher_replies(backend, sets[3], k, sizer)
    if cfg.source_replies == "own":
        train_own, test_own = teacher_replies(backend, sets[0], k, sizer), teacher_replies(backend, sets[2], k, sizer)
    else:
        train_own, test_own = train_replies, test_replies

    def append(rows: list[list[int]], replies: list[list[int]]) -> list[list[int]]:
        return [row + replies[i % len(replies)] for i, row in enumerate(rows)]

    return Rows(append(sets[0], train_own), append(sets[1], train_replies),
                append(sets[2], test_own), append(sets[3], test_replies), window=k + 1)


def edit(
    model: object,
    concept: Any,
    at: Any,
    read: Any,
    *,
    schedule: str = "matched",
    adapter: str = "lowrank",
    rank: Any = 8,
    stop_band: Any = (0.45, 0.70),
    strength: Any = None,
    seed: Any = 0,
    progress: bool = True,
    checkpoint_dir: Any = None,
    **options: Any,
) -> Edit:
    """Train adapters at `at` until a fresh discriminator reading `read` cannot tell source from target.

    `at`/`read`: ints mean ``blocks.{i}.hook_resid_post``; any hook name of the model works.
    `schedule`: "matched" (default; warm discriminator + mean matching over reply positions, converges)
    or "paper" (the published schedule). `adapter`: "lowrank" (h + B·A·h, B zero-initialised),
    "lowrank+bias" or "bias" (a steering vector). `options` override the schedule's defaults
    (`rounds`, `lr`, `discriminator` ("mlp"/"linear"), `hidden`, `steps_per_round`, `reply_tokens`,
    `mean_metric` ("standardized"/"raw"), `source_replies` ("target"/"own"), …; see `RoundsConfig`);
    `anchor` ("start"/"edited", matched only) says whether source rows are matched to the target rows as
    round 0 read them or as the edit leaves them (the fresh discriminators compare the same);
    `mean_positions` ("each"/"pooled", matched only) matches every window position's own mean or one mean
    over them all; `hold_weight` (matched only, default 0) weighs a term keeping the target rows'
    mean read features where round 0 found them (the edit applies to every prompt); `pair_weight` (matched
    only, default 1) weighs each source row's distance to its own target twin — the default is dropped to 0
    for a concept that does not pair its prompts or with `source_replies="own"`, a chosen weight refused;
    `preserve_weight` (matched only, default 0 = off) adds that weight times KL(base ‖ edited) of the
    next-token distributions on target training rows to every adapter step, and every history record
    holds `kl_to_base`, the same KL on the held-out target rows. `strength` is the
    generation strength the Edit records and applies (its adapters' output multiplier; default: the
    schedule's measured choice, `STRENGTH`).
    `checkpoint_dir`: a folder where the full training state is written after every round; a run
    started again with the same folder, model, concept and options resumes from the last complete
    round and ends with the same edit (a checkpoint of a different run is refused). A NaN or infinite
    loss raises `rounds.NumericsError` naming the round and phase. The model is frozen during training
    and handed back unchanged.
    """
    backend = backend_for(model)
    if not isinstance(concept, Concept):
        raise TypeError(f"concept= must be an are_lens.Concept; got {type(concept).__name__}")
    at_names = hook_names.normalize(at, "at")
    read_names = hook_names.normalize(read, "read")
    known = backend.hook_names()
    hook_names.check_known(at_names, known, "at", backend.n_layers)
    hook_names.check_known(read_names, known, "read", backend.n_layers)
    hook_names.check_reachable(at_names, read_names, backend.n_layers)
    if adapter not in adapters.KINDS:
        raise ValueError(f"adapter= must be one of {sorted(adapters.KINDS)}; got {adapter!r}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank= must be an int; got {rank!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed= must be an int; got {seed!r}")
    strength = STRENGTH.get(schedule, 1.0) if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
        raise TypeError(f"strength= must be a number ≥ 0; got {strength!r}")
    cfg = dataclasses.replace(_checked_options(preset(schedule), options),
                              stop_band=_check_stop_band(stop_band), seed=seed)
    cfg = _paired(cfg, concept, chosen="pair_weight" in options)
    folder = None if checkpoint_dir is None else writable_folder(checkpoint_dir, "checkpoint_dir")
    fingerprint = backend.fingerprint()
    run = {"at": at_names, "read": read_names, "adapter": adapter, "rank": rank, **cfg.to_dict()}
    key = {"config": run, "concept": _concept_digest(concept), "fingerprint": fingerprint}

    with backend.frozen(), _flush_denormals(backend.device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        saved = None if folder is None else checkpoint.open_saved(folder, key)
        sizer = BatchSize(cfg.batch_size, backend.device)  # halved for the rest of the edit on out-of-memory
        rows = _with_replies(backend, concept, cfg, seed, sizer) if saved is None else saved.rows
        widths = _stream_widths(backend, at_names + read_names, rows.train_source[0])
        interventions = [(name, adapters.make(adapter, widths[name], rank).to(backend.device))
                         for name in at_names]
        state = None if saved is None else saved.state(interventions, cfg, backend.device)
        on_round = None if folder is None else functools.partial(checkpoint.save, folder, key, rows, interventions,
                                                                 device=backend.device)
        history, disc, snapshots = run_rounds(backend, interventions, read_names, rows, cfg, progress=progress,
                                              state=state, on_round=on_round, sizer=sizer)

    for _, module in interventions:
        module.scale = float(strength)
    config = {**run, "strength": float(strength)}
    return Edit(interventions, disc, config, history, fingerprint, concept.summary(), snapshots)


def _paired(cfg: RoundsConfig, concept: Concept, chosen: bool) -> RoundsConfig:
    """`pair_weight` matches each source row to its own target twin: the concept must pair its prompts and
    both rows must carry the same teacher-forced reply. The default weight is dropped (to 0, as the Edit's
    config records) where they do not; a weight the caller chose is refused there."""
    if cfg.pair_weight == 0:
        return cfg
    if not chosen and not (concept.paired and cfg.source_replies == "target"):
        return dataclasses.replace(cfg, pair_weight=0.0)
    if not concept.paired:
        raise ValueError(f"pair_weight= needs a paired concept (as many source as target prompts, the i-th of "
                         f"each a pair); got {len(concept.source)} source and {len(concept.target)} target prompts")
    if cfg.source_replies != "target":
        raise ValueError("pair_weight= compares each source row with its target twin position by position, so "
                         f"both must carry the same reply: source_replies='target'; got {cfg.source_replies!r}")
    return cfg


def _concept_digest(concept: Concept) -> str:
    """sha256 of everything about a concept that changes training (a checkpoint must match it)."""
    fields = [list(concept.source), list(concept.target), concept.chat, concept.system, concept.held_out]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]
