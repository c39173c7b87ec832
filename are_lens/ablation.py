"""Which layers matter: leave-one-out / leave-one-in ablation of a trained edit, and a single-layer sweep.

`ablate(edit, model, concept)` measures each variant of a trained edit (the full edit, no adapters at
all, every adapter layer removed in turn, every adapter layer kept alone) the way the rounds measure
the edit while it trains: read the streams in ``edit.config["read"]`` at the last prompt token on the
concept's split, train a fresh discriminator on the training half and score it on the held-out half.
Every variant gets the same split and the same discriminator seed, so differences are the layers' doing.
An optional behaviour `metric(model, variant_edit) -> float` is called once per variant too.

`sweep(model, concept, at=[...], read=...)` trains one single-layer edit per candidate hook with the
same seed and budget and tabulates how far each one got.

Rows are plain JSON-able dicts; `save_ablation(rows, edit_dir)` stores them next to a saved edit as
``ablation.json``, where `are-lens report` picks them up.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import hook_names
from .artifact import Edit
from .backends import Backend, backend_for
from .concept import Concept
from .edit import _flush_denormals, _with_replies
from .edit import edit as train_edit
from .rounds import Interventions, RoundsConfig, Rows, compared, extract, fresh_accuracy, gap_figures, joined

ABLATION_FILE = "ablation.json"
Metric = Callable[[object, Edit], float]
_PARTS = ("train_source", "train_target", "test_source", "test_target")


def rounds_config(config: dict[str, Any]) -> RoundsConfig:
    """The `RoundsConfig` an edit was trained under (its saved config), measuring at the last prompt token."""
    names = {f.name for f in dataclasses.fields(RoundsConfig)}
    values = {k: v for k, v in config.items() if k in names}
    if "stop_band" in values:
        values["stop_band"] = tuple(values["stop_band"])
    return dataclasses.replace(RoundsConfig(**values), reply_tokens=0)


def measure_features(
    backend: Backend, interventions: Interventions, read: Sequence[str], rows: Rows, cfg: RoundsConfig
) -> dict[str, torch.Tensor]:
    """R(x) at the last prompt token for the four parts of the split, under `interventions` ([n, F] each)."""
    out = {}
    for part in _PARTS:
        values = extract(backend, getattr(rows, part), read, interventions, 1, cfg.batch_size)
        out[part] = joined(values, read)[:, 0, :]
    return out


def measure(
    backend: Backend, interventions: Interventions, read: Sequence[str], rows: Rows, cfg: RoundsConfig,
    seed: int, base: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Fresh-discriminator held-out accuracy under `interventions` (discriminator seeded by `seed`).

    With `base` (the unedited features, `measure_features` without interventions) the discriminator
    compares what the edit was matched to (`rounds.compared`: the base target rows for `anchor="start"`)
    and the rounds' gap figures are added: projection, cosine, mean_gap_left and target_drift.
    """
    feats = measure_features(backend, interventions, read, rows, cfg)
    seen = feats if base is None else compared(cfg, feats, base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same discriminator initialisation for every variant
        generator = torch.Generator().manual_seed(seed)
        accuracy = fresh_accuracy(cfg, generator, (seen["train_source"], seen["train_target"]),
                                  (seen["test_source"], seen["test_target"]))[0]
    out: dict[str, Any] = {"fresh_d_accuracy": accuracy}
    if base is not None:
        out.update(gap_figures(base["train_source"], base["train_target"], feats["train_source"],
                               feats["train_target"], seen["train_target"]))
    return out


def units(result: Edit) -> list[list[str]]:
    """The edit's adapter layers as ablation units: each hook once, a hook-pair LoRA's two hooks together."""
    from .adapters import partners

    seen: set[int] = set()
    out = []
    for i, (name, _) in enumerate(result.interventions):
        if i in seen:
            continue
        group = partners(result.interventions, {j for j, (n, _) in enumerate(result.interventions) if n == name})
        seen |= group
        hooks = []
        for j in sorted(group):
            if result.interventions[j][0] not in hooks:
                hooks.append(result.interventions[j][0])
        out.append(hooks)
    return out


def _read_of(result: Edit, read: Any) -> list[str]:
    if read is not None:
        return hook_names.normalize(read, "read")
    if "read" not in result.config:
        raise ValueError("this edit's config names no read streams (a sum of edits?); pass read= explicitly")
    return list(result.config["read"])


def ablate(
    edit: Any, model: object, concept: Any, metric: Any = None, seed: Any = 0, read: Any = None
) -> list[dict[str, Any]]:
    """Leave-one-out and leave-one-in ablation of `edit`'s adapter layers.

    Returns rows ``{"layer": "full"}`` (the edit as trained), ``{"layer": "none"}`` (no adapters: the
    base model), then one row per adapter layer (a hook; a hook-pair LoRA counts as one layer, named by
    its write hook) with each figure twice: ``*_without`` (that layer removed, `result.without`) and
    ``*_only`` (that layer alone, `result.only`). Figures: ``fresh_d_accuracy`` (held-out accuracy of a
    fresh discriminator on the edit's read streams, last prompt token, the concept split by the edit's
    own seed so held-out prompts stay held out), ``projection`` / ``cosine`` / ``mean_gap_left`` (how
    far the training-source mean moved along the base source→target gap; 1 / 1 / 0 is all the way),
    and ``metric`` when `metric(model, variant_edit)` is given. `seed` seeds every variant's
    discriminator identically. `read=` overrides the edit's read streams.
    """
    result = edit
    if not isinstance(result, Edit):
        raise TypeError(f"edit= must be an are_lens.Edit; got {type(result).__name__}")
    if not isinstance(concept, Concept):
        raise TypeError(f"concept= must be an are_lens.Concept; got {type(concept).__name__}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric= must be a callable metric(model, edit) -> float; got {type(metric).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed= must be an int; got {seed!r}")
    if not result.interventions:
        raise ValueError("edit= has no adapters to ablate")
    backend = backend_for(model)
    read_names = _read_of(result, read)
    cfg = rounds_config(result.config if "read" in result.config else {})
    split_seed = int(result.config.get("seed", seed))
    for _, adapter in result.interventions:
        adapter.to(backend.device)

    groups = units(result)
    variants: list[tuple[str, str, Edit]] = [("full", "", result), ("none", "", result.without(at=result.hooks))]
    for hooks in groups:
        variants += [(hooks[-1], "_without", result.without(at=hooks)), (hooks[-1], "_only", result.only(at=hooks))]

    rows: dict[str, dict[str, Any]] = {}
    with backend.frozen(), _flush_denormals(backend.device):
        split_rows = _with_replies(backend, concept, cfg, split_seed)
        base = measure_features(backend, (), read_names, split_rows, cfg)
        for layer, suffix, variant in variants:
            figures = measure(backend, variant.interventions, read_names, split_rows, cfg, seed, base)
            if metric is not None:
                figures["metric"] = float(metric(model, variant))
            row = rows.setdefault(layer, {"layer": layer})
            if suffix:
                row["hooks"] = next(h for h in groups if h[-1] == layer)
            row.update({key + suffix: value for key, value in figures.items()})
    return list(rows.values())


def save_ablation(rows: Sequence[dict[str, Any]], folder: str | Path) -> Path:
    """Store `ablate` rows as ``ablation.json`` in a saved edit's folder (read back by `load_ablation`)."""
    path = Path(folder) / ABLATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2), encoding="utf-8")
    return path


def load_ablation(folder: str | Path) -> list[dict[str, Any]] | None:
    """The rows `save_ablation` stored in `folder`, or None when it holds none."""
    path = Path(folder) / ABLATION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def sweep(
    model: object, concept: Any, at: Any, read: Any, metric: Any = None, **edit_options: Any
) -> list[dict[str, Any]]:
    """Train one single-layer edit per candidate hook in `at` (same `read`, seed and budget) and tabulate them.

    Each row: ``layer``, ``fresh_d_accuracy`` (the last round's), ``fresh_d_accuracy_pooled`` (when
    reply positions were trained), ``projection``, ``cosine``, ``mean_gap_left`` (last round),
    ``rounds`` (adapter phases run), ``converged``, ``weight_norm``, ``seconds`` (wall time of the
    edit) and ``metric`` (`metric(model, edit)`, when given). `edit_options` go to `edit()` unchanged.
    Every candidate is checked against `read` before any training starts.
    """
    candidates = hook_names.normalize(at, "at")
    read_names = hook_names.normalize(read, "read")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric= must be a callable metric(model, edit) -> float; got {type(metric).__name__}")
    backend = backend_for(model)
    for name in candidates:  # fail before hours of training, not after
        hook_names.check_known([name], backend.hook_names(), "at", backend.n_layers)
        hook_names.check_reachable([name], read_names, backend.n_layers)
    rows = []
    for name in candidates:
        start = time.perf_counter()
        result = train_edit(model, concept, at=[name], read=read_names, **edit_options)
        seconds = time.perf_counter() - start
        last = result.history[-1]
        row: dict[str, Any] = {"layer": name, "fresh_d_accuracy": last["fresh_d_accuracy"]}
        if "fresh_d_accuracy_pooled" in last:
            row["fresh_d_accuracy_pooled"] = last["fresh_d_accuracy_pooled"]
        row.update({k: last.get(k) for k in ("projection", "cosine", "mean_gap_left", "target_drift")})
        row.update(rounds=len(result.history) - 1, converged=bool(last["converged"]),
                   weight_norm=last.get("adapters", {}).get(name, {}).get("weight_norm"), seconds=seconds)
        if metric is not None:
            row["metric"] = float(metric(model, result))
        rows.append(row)
    return rows
