"""The protocol every backend implements: tokenize, read named streams, run logits, generate.

Everything above this layer (rounds, edits, evaluation) speaks TransformerLens hook names and
`Batch`es; a backend turns them into calls on its host library. Interventions are (hook name, module)
pairs; each module is applied to the activation at its hook (`h -> module(h)`).
"""

from __future__ import annotations

import hashlib
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .. import hook_names
from .families import FAMILIES, Family

FINGERPRINT_SAMPLE = 4096
_FINGERPRINTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]] = weakref.WeakKeyDictionary()
"""Per model: the hashed weights' (storage, version) and their fingerprint, so `Edit.applied` does not
rehash a 7B model's embedding on every call. In-place writes (copy_, load_state_dict, merge_into) bump
the version; a write through `.data` does not, and is not seen."""
Interventions = Sequence[tuple[str, nn.Module]]
"""(hook name, module) pairs in application order; a hook may appear more than once."""


@dataclass(frozen=True)
class Batch:
    """Left-padded token ids: the last prompt token of every row sits at index -1."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    key: tuple | None = field(default=None, compare=False)  # the rows it holds (`Backend.batch`), for caches

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.key)


def _digest(tensors: dict[str, Tensor]) -> str:
    """sha256 over names and fp32 values in name order (so a fp16 and a fp32 copy of one model agree)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return Batch(ids, mask)


@dataclass
class _Prefix:
    """The input of block `start` for one batch, and the other arguments the model passed blocks
    `start`…`stop - 1` (attention mask, rotary embeddings, positions), captured from one forward."""

    hidden: Tensor
    calls: list[tuple[tuple, dict]]


class _Captured(Exception):
    """Ends the capturing forward once the last needed block's arguments are known."""


class Backend(ABC):
    """One host library's way of running a causal LM with named interventions."""

    model: object
    tokenizer: object
    module: nn.Module  # the torch module whose parameters are the model's weights
    n_layers: int
    d_model: int
    n_ctx: int | None
    _prefixes: dict[tuple, _Prefix] | None = None  # see `reusing_prefix`
    _prefix_start: int = 0

    # -- what the model is -------------------------------------------------------------------
    @abstractmethod
    def hook_names(self) -> list[str]:
        """Every hook name this model accepts (TransformerLens spelling)."""

    @abstractmethod
    def input_embeddings(self) -> Tensor:
        """The token embedding matrix (used to fingerprint the weights)."""

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @abstractmethod
    def hf_module(self, path: str) -> nn.Module:
        """The Hugging Face module at `path` (e.g. ``model.layers.3.mlp.down_proj``), unwrapped."""

    def table_family(self) -> Family | None:
        """The hook-name table entry for this architecture (None for one the table lacks)."""
        return next((f for f in FAMILIES if self.architecture() in f.classes), None)

    def fingerprint_weights(self) -> dict[str, Tensor]:
        """The weights a fingerprint hashes, named alike on every backend: the embedding, the MLP down
        projection (where merged LoRAs land) of the first and last block, and an evenly strided sample of
        `FINGERPRINT_SAMPLE` entries of every other block's (a low-rank update changes nearly all of them).
        Fused projections that the TransformerLens bridge splits are left out, so both backends agree."""
        weights = {"embed.W_E": self.input_embeddings()}
        family = self.table_family()
        for layer in range(self.n_layers if family is not None else 0):
            weight = self.hf_module(f"{family.blocks}.{layer}.{family.mlp_post}").weight
            if layer in (0, self.n_layers - 1):
                weights[f"blocks.{layer}.mlp.W_out"] = weight
            else:
                stride = max(1, weight.numel() // FINGERPRINT_SAMPLE)
                weights[f"blocks.{layer}.mlp.W_out[::{stride}]"] = weight.reshape(-1)[::stride]
        return weights

    def fingerprint(self) -> dict:
        """Architecture, sizes and a hash of `fingerprint_weights`: enough to refuse a wrong base model,
        including a fine-tuned or merged copy of the right one."""
        weights = self.fingerprint_weights()
        state = tuple((w.data_ptr(), w._version) for w in weights.values())
        cached = _FINGERPRINTS.get(self.module)
        if cached is not None and cached[0] == state:
            return dict(cached[1])
        fingerprint = {
            "architecture": self.architecture(),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_vocab": int(weights["embed.W_E"].shape[0]),
            "weights_hashed": len(weights),
            "weights_sha256": _digest(weights),
        }
        _FINGERPRINTS[self.module] = (state, fingerprint)
        return dict(fingerprint)

    @abstractmethod
    def architecture(self) -> str:
        """The Hugging Face architecture name, e.g. ``LlamaForCausalLM``."""

    # -- running it --------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        encoded = self.tokenizer(list(prompts), add_special_tokens=add_special_tokens)
        return [list(ids) for ids in encoded["input_ids"]]

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def batch(self, rows: Sequence[Sequence[int]]) -> Batch:
        padded = left_pad(rows, self.pad_id)
        return Batch(padded.input_ids, padded.attention_mask, tuple(map(tuple, rows))).to(self.device)

    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The modules the model's forward calls once per block, in order (a cached prefix resumes there)."""

    @abstractmethod
    def forward_without_cache(self, batch: Batch) -> None:
        """One plain forward of `batch` (no KV cache), for hooks on `blocks()` to capture its arguments."""

    @contextmanager
    def reusing_prefix(self, start: int) -> Iterator[bool]:
        """While open, `read` may keep the input of block `start` per batch (`Batch.key`) and run only the
        blocks from `start` on when every intervention and read stream lies at or after it: the frozen
        blocks before it give the same output every time. Yields whether it does (not for `start` 0);
        the model must stay frozen while the block is open."""
        if start <= 0:
            yield False
            return
        self._prefixes, self._prefix_start = {}, start
        try:
            yield True
        finally:
            self._prefixes = None

    def from_prefix(self, batch: Batch, names: Sequence[str]) -> bool:
        """Whether a `read` of `batch` touching only the hooks `names` may run from the cached prefix."""
        layers = [hook_names.layer_of(name) for name in names]
        return (getattr(self, "_prefixes", None) is not None and batch.key is not None
                and all(layer is not None and layer >= self._prefix_start for layer in layers))

    def run_from_prefix(self, batch: Batch, stop: int, hooks: AbstractContextManager) -> None:
        """Blocks `start`…`stop - 1` on the cached input of block `start`, inside `hooks` (the caller's
        interventions and reads; entered only after the prefix is captured, so its forward runs without them)."""
        prefix = self._prefix(batch, stop)
        blocks = self.blocks()
        hidden = prefix.hidden
        with hooks:
            for layer, (args, kwargs) in zip(range(self._prefix_start, stop), prefix.calls):
                output = blocks[layer](hidden, *args, **kwargs)
                hidden = output[0] if isinstance(output, tuple) else output

    def _prefix(self, batch: Batch, stop: int) -> _Prefix:
        """Block `start`'s input and the arguments of blocks `start`…`stop - 1`, from one forward (cached)."""
        start, key = self._prefix_start, (batch.key, stop)
        if key not in self._prefixes:
            blocks = self.blocks()
            calls: list[tuple[tuple, dict]] = []
            hidden: list[Tensor] = []

            def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
                rest = dict(kwargs)
                hidden.append(args[0] if args else rest.pop("hidden_states"))
                calls.append((tuple(args[1:]), rest))
                if len(calls) == stop - start:
                    raise _Captured

            handles = [blocks[i].register_forward_pre_hook(capture, with_kwargs=True) for i in range(start, stop)]
            try:
                with torch.no_grad():
                    self.forward_without_cache(batch)
            except _Captured:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            self._prefixes[key] = _Prefix(hidden[0], calls)
        return self._prefixes[key]

    @abstractmethod
    def intervene(self, interventions: Interventions) -> AbstractContextManager[None]:
        """Install the interventions for the duration of a `with` block; removed on every exit."""

    @abstractmethod
    def read(
        self, batch: Batch, streams: Sequence[str], interventions: Interventions = ()
    ) -> dict[str, Float[Tensor, "batch pos d"]]:
        """The named streams under the interventions; the forward stops after the last one.

        Gradients flow to the interventions when grad mode is on; the LM head never runs.
        """

    @abstractmethod
    def logits(self, batch: Batch, interventions: Interventions = ()) -> Float[Tensor, "batch pos vocab"]:
        """Full forward to the LM head under the interventions."""

    @abstractmethod
    def generate(
        self, batch: Batch, interventions: Interventions, max_new_tokens: int, do_sample: bool = False
    ) -> Int[Tensor, "batch new"]:
        """New tokens only (the prompt is not repeated), under the interventions."""

    # -- shared helpers ----------------------------------------------------------------------
    def stop_layer(self, streams: Sequence[str]) -> int | None:
        """The block index to stop before, or None when a stream needs the whole model."""
        last = hook_names.last_layer(streams, self.n_layers)
        return None if last >= self.n_layers else last + 1

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Weights without gradients and in eval mode, restored exactly on exit."""
        params = list(self.module.parameters())
        flags = [p.requires_grad for p in params]
        modes = [(m, m.training) for m in self.module.modules()]
        try:
            for p in params:
                p.requires_grad_(False)
            self.module.eval()
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for m, mode in modes:
                m.training = mode
