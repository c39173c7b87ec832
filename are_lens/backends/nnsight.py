"""nnsight 0.8 backend: a `TransformersModel` (or the deprecated `LanguageModel`) over any HF causal LM.

Hook names are TransformerLens ones, translated to module paths by `families`. `read` runs one
`model.trace`: each intervention is written into the module it names, each read stream is saved, and
`tracer.stop()` ends the forward right after the last one, so later blocks and the LM head never run.

`intervene` (what `Edit.applied` uses) installs plain torch hooks on the HF modules instead, registered
and removed in try/finally. Torch hooks act on every forward the HF model runs while the block is open —
the user's own `model.trace` and `model.generate`, and HF's `generate` with its KV cache — and need no
nnsight state that could outlive the block. One consequence: nnsight hands a trace a module's output
before torch's forward hooks run, so a trace inside `applied` that reads `.output` of the very module an
edit writes sees the value before the edit; inputs, and every module downstream, see it edited.

Positions count real tokens only (`cumsum(mask) - 1`, pads at 0), which is what the TransformerLens
bridge passes for left-padded rows: on absolute-position models (GPT-2) a left-padded prompt reads
exactly as it would unpadded, and both backends agree on every position, pads included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .. import hook_names
from .base import Backend, Batch, Interventions, first
from .families import Side, Site, family_of


@dataclass
class _Op:
    """Write `module(h)` at a hook, or (module None) save the tensor found there."""

    name: str
    site: Site
    module: nn.Module | None


@dataclass
class _Step:
    """Every op on one side of one module, in the order they apply."""

    path: str
    side: Side
    ops: list[_Op] = field(default_factory=list)

    @property
    def writes(self) -> bool:
        return any(op.module is not None for op in self.ops)

    @property
    def reads(self) -> bool:
        return any(op.module is None for op in self.ops)


def _run(step: _Step, value: Tensor, seen: dict[tuple[str, Side], Tensor], saved: dict[str, Tensor]) -> Tensor:
    """Apply a step's ops to the tensor at its site; return the tensor the model should carry on with."""
    for op in step.ops:
        base = seen[op.site.plus] if op.site.plus is not None else None
        x = value if base is None else base + value
        if op.module is None:
            saved[op.name] = x
            continue
        x = op.module(x)
        value = x if base is None else x - base
    seen[(step.path, step.side)] = value
    return value


def _with_first(original: Any, value: Tensor) -> Any:
    return (value, *original[1:]) if isinstance(original, tuple) else value


def _input_hook(step: _Step, seen: dict, saved: dict) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (_run(step, args[0], seen, saved), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: _run(step, kwargs[key], seen, saved)}

    return hook


def _output_hook(step: _Step, seen: dict, saved: dict) -> Callable:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _with_first(output, _run(step, first(output), seen, saved))

    return hook


def positions(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Index of each real token among the real tokens of its row; pads get 0 (as the TL bridge does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class NNsightBackend(Backend):
    def __init__(self, model: Any) -> None:
        self.model = model
        self.module = model._module
        self.tokenizer = model.tokenizer
        self.family = family_of(self.module)
        config = self.module.config
        self.n_layers = len(self.module.get_submodule(self.family.blocks))
        self.d_model = int(self.input_embeddings().shape[1])
        n_ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.n_ctx = int(n_ctx) if n_ctx else None
        self._sites = self.family.all_sites(self.n_layers, config)

    def hook_names(self) -> list[str]:
        return list(self._sites)

    def input_embeddings(self) -> Tensor:
        return self.module.get_input_embeddings().weight

    def hf_module(self, path: str) -> nn.Module:
        return self.module.get_submodule(path)

    def architecture(self) -> str:
        return type(self.module).__name__

    # -- planning ----------------------------------------------------------------------------
    def _site(self, name: str) -> Site:
        if name not in self._sites:
            examples = [n for n in ("blocks.0.hook_resid_post", "blocks.0.hook_mlp_out", "blocks.0.mlp.hook_post")
                        if n in self._sites]
            raise ValueError(
                f"{name!r} is not a hook the nnsight backend knows for {self.architecture()} "
                f"({self.family.name} family, {self.n_layers} layers); valid names look like {examples}"
            )
        return self._sites[name]

    def _plan(self, interventions: Interventions, reads: Sequence[str] = ()) -> list[_Step]:
        """Ops grouped by the module side they touch, in forward order (nnsight requires that order).

        At one hook, interventions apply before reads, in the order given (as TransformerLens does).
        """
        ops = [_Op(name, self._site(name), module) for name, module in interventions]
        ops += [_Op(name, self._site(name), None) for name in reads]
        keyed = sorted(((hook_names.position(op.name, self.n_layers), op.module is None, i), op)
                       for i, op in enumerate(ops))
        steps: dict[tuple[str, Side], _Step] = {}
        keys: dict[tuple[str, Side], tuple] = {}

        def step_at(where: tuple[str, Side], key: tuple) -> _Step:
            keys[where] = min(keys.get(where, key), key)
            return steps.setdefault(where, _Step(*where))

        for key, op in keyed:
            if op.site.plus is not None:  # hook_resid_mid needs the block's input first
                block_start = hook_names.position(f"blocks.{hook_names.layer_of(op.name)}.hook_resid_pre",
                                                  self.n_layers)
                step_at(op.site.plus, (block_start, False, -1))
            step_at((op.site.path, op.site.side), key).ops.append(op)
        return [steps[where] for where in sorted(steps, key=keys.__getitem__)]

    def _inputs(self, batch: Batch) -> dict[str, Tensor]:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "position_ids": positions(batch.attention_mask)}

    # -- running -----------------------------------------------------------------------------
    @contextmanager
    def intervene(self, interventions: Interventions) -> Iterator[None]:
        """Torch hooks on the HF modules for the block's duration (see the module docstring for why)."""
        with self._hooks(self._plan(interventions), {}):
            yield

    @contextmanager
    def _hooks(self, steps: list[_Step], saved: dict[str, Tensor]) -> Iterator[None]:
        """The steps as torch hooks (writes applied, reads saved into `saved`), removed on every exit."""
        seen: dict[tuple[str, Side], Tensor] = {}
        handles = []
        try:
            for step in steps:
                module = self.module.get_submodule(step.path)
                if step.side == "input":
                    handles.append(module.register_forward_pre_hook(_input_hook(step, seen, saved),
                                                                    with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(_output_hook(step, seen, saved)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            seen.clear()

    def blocks(self) -> nn.ModuleList:
        return self.module.get_submodule(self.family.blocks)

    def forward_for_capture(self, input_ids: Tensor, attention_mask: Tensor, past: object | None) -> None:
        self.module(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past,
                    position_ids=positions(attention_mask)[:, -input_ids.shape[1]:], use_cache=past is not None)

    def read(
        self, batch: Batch, streams: Sequence[str], interventions: Interventions = (), last: int | None = None
    ) -> dict[str, Float[Tensor, "batch pos d"]]:
        if not streams:
            raise ValueError("streams= is empty; name at least one hook to read")
        steps = self._plan(interventions, streams)
        if self.from_prefix(batch, [*streams, *(name for name, _ in interventions)]):
            saved: dict[str, Tensor] = {}
            writes = self._plan(interventions)
            self.run_from_prefix(batch, self.stop_layer(streams) or self.n_layers,
                                 lambda reading: self._hooks(steps if reading else writes, saved), last)
            return {name: saved[name][:, -(last or 0):] for name in streams}
        final = max(i for i, step in enumerate(steps) if step.reads)
        steps = steps[: final + 1]  # interventions past the last read cannot change it
        seen: dict[tuple[str, Side], Tensor] = {}
        saved: dict[str, Tensor] = {}
        with self.model.trace(**self._inputs(batch)) as tracer:
            for step in steps:
                envoy = _envoy(self.model, step.path)
                raw = envoy.input if step.side == "input" else envoy.output
                value = _run(step, first(raw), seen, saved)
                if step.writes and step.side == "input":
                    envoy.input = value
                elif step.writes:
                    envoy.output = _with_first(raw, value)
            tracer.stop()
        return {name: saved[name][:, -(last or 0):] for name in streams}

    def logits(self, batch: Batch, interventions: Interventions = (), last: int | None = None
               ) -> Float[Tensor, "batch pos vocab"]:
        with self.intervene(interventions):
            keep = {} if last is None else {"logits_to_keep": last}
            return self.module(**self._inputs(batch), use_cache=False, **keep).logits

    def generate(
        self, batch: Batch, interventions: Interventions, max_new_tokens: int, do_sample: bool = False
    ) -> Int[Tensor, "batch new"]:
        """HF `generate` (KV cache) on the wrapped model under torch hooks; new tokens only."""
        with self.intervene(interventions), torch.no_grad():
            tokens = self.module.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                use_cache=True,
                pad_token_id=self.pad_id,
            )
        return tokens[:, batch.input_ids.shape[1] :]


def _envoy(root: Any, path: str) -> Any:
    """The nnsight envoy at a dotted module path (digits index into module lists)."""
    envoy = root
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy
