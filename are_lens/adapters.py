"""Trainable interventions spliced in at a hook: `h -> h + scale * delta(h)`.

Weights are fp32 whatever the model's dtype; the update is computed in fp32 and cast back, so a bf16
model trains adapters without losing their small updates. `scale` is the generation strength: 0 is
the base model exactly, 1 the trained edit, 2 its doubled output.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn


class Adapter(nn.Module):
    """Base class: subclasses define `delta`; `forward` adds it at the recorded strength."""

    kind: str

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def delta(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        raise NotImplementedError

    def forward(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if self.scale == 0.0:
            return h
        return h + (self.scale * self.delta(h.float())).to(h.dtype)

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


class LowRank(Adapter):
    """Low-rank residual update `B·A·h` (+ optional bias); B starts at zero so the edit starts as identity."""

    kind = "lowrank"

    def __init__(self, d_model: int, rank: int = 8, bias: bool = False) -> None:
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= d_model:
            raise ValueError(f"rank= must be an int in 1..{d_model} (the stream's width); got {rank!r}")
        self.d_model, self.rank, self.has_bias = d_model, rank, bias
        self.A = nn.Parameter(torch.empty(rank, d_model))
        self.B = nn.Parameter(torch.zeros(d_model, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def delta(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        out = (h @ self.A.T) @ self.B.T
        return out + self.bias if self.bias is not None else out

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model, "rank": self.rank, "bias": self.has_bias}


class Bias(Adapter):
    """A steering vector: the same learned offset added at every position."""

    kind = "bias"

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.bias = nn.Parameter(torch.zeros(d_model))

    def delta(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.bias.expand_as(h)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model}


KINDS = {"lowrank": LowRank, "lowrank+bias": LowRank, "bias": Bias}


def make(kind: str, d_model: int, rank: int) -> Adapter:
    """Build the adapter named by `edit(adapter=...)`."""
    if kind not in KINDS:
        raise ValueError(f"adapter= must be one of {sorted(KINDS)}; got {kind!r}")
    if kind == "bias":
        return Bias(d_model)
    return LowRank(d_model, rank, bias=kind == "lowrank+bias")


def from_config(config: dict[str, Any]) -> Adapter:
    """Rebuild an adapter (weights not loaded) from `Adapter.config()`."""
    config = dict(config)
    kind = config.pop("kind")
    if kind == "lowrank":
        return LowRank(config["d_model"], config["rank"], bias=config["bias"])
    if kind == "bias":
        return Bias(config["d_model"])
    if kind == "steering":
        return Steering(config["d_model"])
    if kind == "ablation":
        return Ablation(config["d_model"])
    if kind == "lora_write":
        return LoRAWrite(config["d_in"], config["d_out"], config["rank"], config["read_hook"], config["write_hook"])
    if kind == "lora_read":  # tied to its writer by `link_pairs` once the whole edit is rebuilt
        return LoRARead(config["read_hook"], config["write_hook"])
    raise ValueError(f"unknown adapter kind {kind!r} in saved edit")


# -- fixed interventions of the baselines (`are_lens.baselines`); not trainable by `edit()` ---------------


class Steering(Adapter):
    """A fixed steering vector (ActAdd / CAA, contrast vector): `h + scale * v` at every position."""

    kind = "steering"

    def __init__(self, d_model: int, vector: Tensor | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        self.register_buffer("vector", torch.zeros(d_model) if vector is None else vector.detach().float().clone())
        if self.vector.shape != (d_model,):
            raise ValueError(f"vector= must have shape ({d_model},); got {tuple(self.vector.shape)}")

    def delta(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.vector.expand_as(h)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model}


class Ablation(Adapter):
    """Directional ablation (Arditi et al. 2024): `h - scale * (h·r̂) r̂`, r̂ a unit direction.

    Scale 1 removes the component along r̂ exactly; values in (0, 1) interpolate, 0 is the base model.
    """

    kind = "ablation"

    def __init__(self, d_model: int, direction: Tensor | None = None) -> None:
        super().__init__()
        self.d_model = d_model
        r = torch.zeros(d_model) if direction is None else direction.detach().float().clone()
        if r.shape != (d_model,):
            raise ValueError(f"direction= must have shape ({d_model},); got {tuple(r.shape)}")
        if direction is not None:
            if not torch.isfinite(r).all() or r.norm() == 0:
                raise ValueError("direction= must be a finite, non-zero vector")
            r = r / r.norm()
        self.register_buffer("direction", r)

    def delta(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return -(h @ self.direction)[..., None] * self.direction

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_model": self.d_model}


class LoRARead(Adapter):
    """The read half of a hook-pair LoRA: hands the activation at the read hook to its `LoRAWrite`,
    and returns it unchanged."""

    kind = "lora_read"

    def __init__(self, read_hook: str, write_hook: str, writer: LoRAWrite | None = None) -> None:
        super().__init__()
        self.read_hook, self.write_hook = read_hook, write_hook
        # A plain reference (not a registered submodule): the weights belong to the writer alone.
        object.__setattr__(self, "writer", writer)

    def forward(self, h: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        if self.writer is None:
            raise RuntimeError(f"the LoRA reader at {self.read_hook!r} is not tied to a writer")
        self.writer.stored = h
        return h

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "read_hook": self.read_hook, "write_hook": self.write_hook}

    def __deepcopy__(self, memo: dict) -> LoRARead:
        if self.writer is None:
            return LoRARead(self.read_hook, self.write_hook)
        return copy.deepcopy(self.writer, memo).reader  # copy the pair as one


class LoRAWrite(Adapter):
    """A LoRA on the linear map from `read_hook` to `write_hook`: adds `scale * B·A·x` at `write_hook`,
    where x is the activation its `LoRARead` stored at `read_hook` earlier in the same forward.

    When `write_hook` is exactly the map's output (e.g. `mlp.hook_post` → `hook_mlp_out`: the MLP's down
    projection W_out on Llama, Qwen2, Mistral, GPT-2), the edit equals the weight change
    `W_out += scale * B @ A` (nn.Linear layout, [d_out, d_in]); `merged_weight` computes it.
    """

    kind = "lora_write"

    def __init__(self, d_in: int, d_out: int, rank: int, read_hook: str, write_hook: str) -> None:
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= min(d_in, d_out):
            raise ValueError(f"rank= must be an int in 1..{min(d_in, d_out)}; got {rank!r}")
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.read_hook, self.write_hook = read_hook, write_hook
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.stored: Tensor | None = None  # set by the reader, consumed by `delta`
        # a plain reference, like the reader's to us (no module cycle)
        object.__setattr__(self, "reader", LoRARead(read_hook, write_hook, self))

    def delta(self, h: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        x, self.stored = self.stored, None
        if x is None:
            raise RuntimeError(
                f"the LoRA writing at {self.write_hook!r} ran without its reader at {self.read_hook!r}: apply "
                "both halves, read hook first (Edit.only/without keep the pair together)"
            )
        if x.shape[:-1] != h.shape[:-1] or x.shape[-1] != self.d_in:
            raise RuntimeError(
                f"the LoRA reader at {self.read_hook!r} stored shape {tuple(x.shape)}, but the writer at "
                f"{self.write_hook!r} needs [{', '.join(map(str, h.shape[:-1]))}, {self.d_in}]"
            )
        return (x.float() @ self.A.T) @ self.B.T

    def merged_weight(self, weight: Float[Tensor, "d_out d_in"]) -> Float[Tensor, "d_out d_in"]:
        """The linear map's weight with this LoRA folded in (exact when the hooks bracket that map)."""
        return (weight.float() + self.scale * (self.B @ self.A).to(weight.device)).to(weight.dtype)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "d_in": self.d_in, "d_out": self.d_out, "rank": self.rank,
                "read_hook": self.read_hook, "write_hook": self.write_hook}

    def __deepcopy__(self, memo: dict) -> LoRAWrite:
        if id(self) in memo:
            return memo[id(self)]
        twin = LoRAWrite(self.d_in, self.d_out, self.rank, self.read_hook, self.write_hook)
        memo[id(self)] = twin
        with torch.no_grad():
            twin.A.copy_(self.A)
            twin.B.copy_(self.B)
        twin.A.requires_grad_(self.A.requires_grad)
        twin.B.requires_grad_(self.B.requires_grad)
        twin.scale = self.scale
        twin.to(self.A.device)
        return twin


def lora_pair(d_in: int, d_out: int, rank: int, read_hook: str, write_hook: str) -> list[tuple[str, Adapter]]:
    """A hook-pair LoRA as the two interventions that apply it: (read_hook, reader), (write_hook, writer)."""
    writer = LoRAWrite(d_in, d_out, rank, read_hook, write_hook)
    return [(read_hook, writer.reader), (write_hook, writer)]


def link_pairs(interventions: list[tuple[str, Adapter]]) -> None:
    """Tie each rebuilt `LoRARead` to the first not-yet-tied `LoRAWrite` after it with the same two hooks."""
    taken: set[int] = set()
    for i, (_, adapter) in enumerate(interventions):
        if not isinstance(adapter, LoRARead):
            continue
        want = (adapter.read_hook, adapter.write_hook)
        for j in range(i + 1, len(interventions)):
            other = interventions[j][1]
            if j not in taken and isinstance(other, LoRAWrite) and (other.read_hook, other.write_hook) == want:
                object.__setattr__(adapter, "writer", other)
                object.__setattr__(other, "reader", adapter)
                taken.add(j)
                break
        else:
            raise ValueError(f"saved edit has a LoRA reader at {want[0]!r} with no writer at {want[1]!r} after it")


def partners(interventions: list[tuple[str, Adapter]], chosen: set[int]) -> set[int]:
    """`chosen` plus the other half of every hook-pair LoRA it touches (the halves only work together)."""
    out = set(chosen)
    for i in chosen:
        adapter = interventions[i][1]
        mate = adapter.writer if isinstance(adapter, LoRARead) else getattr(adapter, "reader", None)
        if isinstance(adapter, (LoRARead, LoRAWrite)):
            out |= {j for j, (_, other) in enumerate(interventions) if other is mate}
    return out
