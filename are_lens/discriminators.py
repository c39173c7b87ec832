"""Discriminators: classify concatenated read streams as source (label 0) or target (label 1).

Paper: Linear(n·d → 512) – ReLU – Linear(512 → 2), Adam 1e-3, 30 epochs, batch 64. Inputs are
standardised per feature with statistics of the training set (a fixed affine map, part of the model),
because residual streams carry a few dimensions orders of magnitude larger than the rest.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

SOURCE, TARGET = 0, 1


class Discriminator(nn.Module):
    def __init__(self, in_features: int, hidden: int | None = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.hidden, self.dropout = in_features, hidden, dropout
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("std", torch.ones(in_features))
        if hidden is None:
            self.net: nn.Module = nn.Linear(in_features, 2)
        else:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, 2))

    def forward(self, x: Float[Tensor, "batch features"]) -> Float[Tensor, "batch 2"]:
        return self.net((x.float() - self.mean) / self.std)

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "hidden": self.hidden, "dropout": self.dropout}

    def standardize_on(self, x: Float[Tensor, "n features"]) -> None:
        """Fix the input standardisation to the statistics of `x`."""
        self.to(x.device)
        self.mean.copy_(x.float().mean(0))
        self.std.copy_(x.float().std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(self.std))


KINDS = ("mlp", "linear")
"""The discriminators `edit(discriminator=...)` can name."""


def make(kind: str, in_features: int, hidden: int = 512, dropout: float = 0.0) -> Discriminator:
    """Build the discriminator named by `edit(discriminator=...)`: "mlp" or "linear"."""
    if kind not in KINDS:
        raise ValueError(f"discriminator= must be one of {KINDS}; got {kind!r}")
    return Discriminator(in_features, hidden, dropout) if kind == "mlp" else Discriminator(in_features, None)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor (e.g. from a seeded CPU generator) copied to `device` without a host synchronisation:
    on CUDA through pinned memory and a non-blocking copy (a pageable copy waits for the stream)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def labelled(
    source: Float[Tensor, "n_src features"], target: Float[Tensor, "n_tgt features"]
) -> tuple[Tensor, Tensor]:
    x = torch.cat([source, target]).float()
    y = torch.cat([torch.full((len(source),), SOURCE, dtype=torch.long, device=x.device),
                   torch.full((len(target),), TARGET, dtype=torch.long, device=x.device)])
    return x, y


def fit(
    disc: Discriminator,
    source: Float[Tensor, "n_src features"],
    target: Float[Tensor, "n_tgt features"],
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    generator: torch.Generator,
) -> float:
    """Train a fresh discriminator in place; returns its mean loss over the last epoch.

    Runs on the features' device and reads one number back at the end (no per-step host sync).
    """
    x, y = labelled(source, target)
    disc.standardize_on(x)
    opt = torch.optim.Adam(disc.parameters(), lr=lr)
    disc.train()
    last = torch.zeros((), device=x.device)
    for _ in range(epochs):
        order = to_device(torch.randperm(len(x), generator=generator), x.device)
        last = torch.zeros((), device=x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(disc(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = last + loss.detach() * len(idx)
    disc.eval()
    disc.requires_grad_(False)
    return float(last / len(x))


@torch.no_grad()
def accuracy(
    disc: Discriminator, source: Float[Tensor, "n_src features"], target: Float[Tensor, "n_tgt features"]
) -> float:
    """Share of held-out representations the discriminator labels correctly."""
    x, y = labelled(source, target)
    return float((disc(x).argmax(-1) == y).float().mean())
