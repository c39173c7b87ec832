"""TransformerLens 4.x backend: a `TransformerBridge`, hooks by name.

`read` ends the forward as soon as every read stream is captured (a private exception from the last
capture hook), so later blocks, the final norm and the LM head never run — the bridge's `stop_at_layer`
cannot stop after the last block. It runs without a KV cache, which the bridge would otherwise build on
every forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .base import Backend, Batch, Interventions


class _AllRead(Exception):
    """Ends a `read` forward once every stream is captured."""


def _apply(module: nn.Module):
    def hook(activation: Tensor, hook: object) -> Tensor:
        return module(activation)

    return hook


def _writes(interventions: Interventions) -> list[tuple[str, Any]]:
    """TransformerLens hooks that apply the interventions, refusing hooks where a write would be lost.

    In TransformerLens 4.3 the bridge's `hook_resid_mid` is the input of ln2: a write there reaches the
    MLP but not the residual carried past it, unlike HookedTransformer and our nnsight backend.
    """
    for name, _ in interventions:
        if name.endswith("hook_resid_mid"):
            raise ValueError(
                f"at= hook {name!r}: the TransformerLens 4.3 bridge does not carry a write at hook_resid_mid "
                "into the residual stream; edit hook_attn_out or hook_resid_pre/post instead"
            )
    return [(name, _apply(m)) for name, m in interventions]


class TransformerLensBackend(Backend):
    def __init__(self, bridge: object) -> None:
        self.model = bridge
        self.module = bridge
        self.tokenizer = bridge.tokenizer
        self.n_layers = int(bridge.cfg.n_layers)
        self.d_model = int(bridge.cfg.d_model)
        self.n_ctx = int(bridge.cfg.n_ctx) if bridge.cfg.n_ctx else None

    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)

    def input_embeddings(self) -> Tensor:
        return self.model.original_model.get_input_embeddings().weight

    def hf_module(self, path: str) -> nn.Module:
        """The bridge wraps each HF module in a component that keeps it as `_original_component`."""
        module = self.model.original_model.get_submodule(path)
        return getattr(module, "_original_component", module)

    def architecture(self) -> str:
        return str(self.model.cfg.architecture)

    def blocks(self) -> nn.ModuleList:
        """The bridge's block components (they stand in the HF model's layer list and run its hooks)."""
        return self.model.blocks

    def forward_for_capture(self, input_ids: Tensor, attention_mask: Tensor, past: object | None) -> None:
        self.model(input_ids, attention_mask=attention_mask, past_key_values=past, use_cache=past is not None)

    @contextmanager
    def intervene(self, interventions: Interventions) -> Iterator[None]:
        """Install the interventions as TransformerLens hooks; `bridge.hooks` removes them on any exit."""
        with self.model.hooks(fwd_hooks=_writes(interventions)):
            yield

    def read(
        self, batch: Batch, streams: Sequence[str], interventions: Interventions = (), last: int | None = None
    ) -> dict[str, Float[Tensor, "batch pos d"]]:
        wanted = list(dict.fromkeys(streams))
        captured: dict[str, Tensor] = {}

        def capture(name: str):
            def hook(activation: Tensor, hook: object) -> None:
                captured[name] = activation
                if len(captured) == len(wanted):
                    raise _AllRead

            return hook

        def hooks(reading: bool) -> AbstractContextManager:
            return self.model.hooks(fwd_hooks=_writes(interventions) + (
                [(name, capture(name)) for name in wanted] if reading else []))

        try:
            if self.from_prefix(batch, [*wanted, *(name for name, _ in interventions)]):
                self.run_from_prefix(batch, self.stop_layer(wanted) or self.n_layers, hooks, last)
            else:
                with hooks(True):
                    self.model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        except _AllRead:
            pass
        return {name: captured[name][:, -(last or 0):] for name in streams}

    def logits(self, batch: Batch, interventions: Interventions = (), last: int | None = None
               ) -> Float[Tensor, "batch pos vocab"]:
        with self.intervene(interventions):
            keep = {} if last is None else {"logits_to_keep": last}
            return self.model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **keep)

    def generate(
        self, batch: Batch, interventions: Interventions, max_new_tokens: int, do_sample: bool = False
    ) -> Int[Tensor, "batch new"]:
        with self.intervene(interventions), torch.no_grad():
            tokens = self.model.generate(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                use_past_kv_cache=True,
                return_type="tokens",
                verbose=False,
            )
        return tokens[:, batch.input_ids.shape[1] :]
