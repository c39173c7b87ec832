"""Per-layer figures recorded every round: where the concept is readable and what each adapter did.

Cheap enough to leave on: one linear probe per read stream on last-token features, and norms of
tensors the round has already extracted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from . import discriminators
from .adapters import Adapter


def probe_accuracies(
    train: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    test: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    read: Sequence[str],
    generator: torch.Generator,
    epochs: int = 30,
) -> dict[str, float]:
    """Held-out accuracy of a fresh linear probe (source vs target) on each read stream alone."""
    out = {}
    for name in read:
        probe = discriminators.make("linear", train[0][name].shape[-1])
        discriminators.fit(probe, train[0][name], train[1][name], epochs=epochs, generator=generator)
        out[name] = discriminators.accuracy(probe, test[0][name], test[1][name])
    return out


def adapter_effects(
    interventions: Sequence[tuple[str, Adapter]],
    base: Mapping[str, Float[Tensor, "n d"]],
    edited: Mapping[str, Float[Tensor, "n d"]],
) -> dict[str, dict[str, float]]:
    """Per adapter hook: mean ‖Δh‖ and cosine(edited, base) at the last prompt token, and weight norm.

    Δh is the edited minus the base activation at the hook, so it includes upstream adapters' effect.
    """
    out = {}
    for name, adapter in interventions:
        delta = edited[name] - base[name]
        params = [p.detach().flatten() for p in adapter.parameters()]  # on the adapter's device (GPU too)
        weights = torch.cat(params) if params else torch.zeros(1)
        out[name] = {
            "delta_norm": float(delta.norm(dim=-1).mean()),
            "relative_delta_norm": float((delta.norm(dim=-1) / base[name].norm(dim=-1).clamp_min(1e-12)).mean()),
            "cosine": float(F.cosine_similarity(edited[name], base[name], dim=-1).mean()),
            "weight_norm": float(adapter.scale * weights.norm()),
        }
    return out

