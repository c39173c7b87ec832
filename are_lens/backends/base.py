"""The protocol every backend implements: tokenize, read named streams, run logits, generate.

Everything above this layer (rounds, edits, evaluation) speaks TransformerLens hook names and
`Batch`es; a backend turns them into calls on its host library. Interventions are (hook name, module)
pairs; each module is applied to the activation at its hook (`h -> module(h)`).
"""

from __future__ import annotations

import hashlib
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

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


SHARED_TOKENS_MIN = 8
"""Leading tokens that every row of a batch shares (a chat template's system prompt) run once, as one row
whose keys and values the rows attend to, when there are at least this many (see `Backend.read`'s `last`)."""


@dataclass
class _Prefix:
    """The input of block `start` for one batch, and the other arguments the model passed blocks
    `start`…`stop - 1` (attention mask, rotary embeddings, positions), captured from one forward.

    With `shared`, `hidden` and `calls` are the rows without their shared leading tokens, captured attending
    to them through a KV cache; `shared` holds the same for those tokens as one row, and `keys_before` their
    keys and values in the blocks before `start` (frozen, so fixed)."""

    hidden: Tensor
    calls: list[tuple[tuple, dict]]
    shared: _Prefix | None = None
    keys_before: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class _Captured(Exception):
    """Ends the capturing forward once the last needed block's arguments are known."""


def _same_call(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two blocks were called with the very same argument objects (besides their input)."""
    return (len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0])) and a[1].keys() == b[1].keys()
            and all(a[1][k] is b[1][k] for k in a[1]))


def first(value: object) -> Tensor:
    """The hidden states of a block's output (a tensor, or a tuple that starts with them)."""
    return value[0] if isinstance(value, tuple) else value


def _kv_cache(keys: Sequence[tuple[Tensor, Tensor]] = (), rows: int = 1) -> Any:
    """An HF `DynamicCache` holding one row's keys and values per block, seen by each of `rows` rows (not
    copied); empty without `keys`, to be filled by the blocks a forward runs."""
    from transformers import DynamicCache  # imported here: `import are_lens` does not load transformers

    return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in keys])


def _without_cache(calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    return [(args, {**kwargs, "past_key_values": None}) for args, kwargs in calls]


def shared_length(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `rows` have in common."""
    first, n = rows[0], min(len(row) for row in rows)
    for row in rows[1:]:
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n


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
    _same_calls: bool | None = None  # whether the model passes every block the same arguments (`_capture`)

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
    def forward_for_capture(self, input_ids: Tensor, attention_mask: Tensor, past: object | None) -> None:
        """One forward of left-padded `input_ids` for hooks on `blocks()` to capture its arguments: without a
        KV cache, or attending to the HF cache `past` (then `attention_mask` covers its positions too)."""

    @contextmanager
    def reusing_prefix(self, start: int) -> Iterator[bool]:
        """While open, `read` may keep the input of block `start` per batch (`Batch.key`) and run only the
        blocks from `start` on when every intervention and read stream lies at or after it: the frozen
        blocks before it give the same output every time. Yields whether it does (not for `start` 0);
        the model must stay frozen while the block is open."""
        if start <= 0:
            yield False
            return
        self._prefixes, self._prefix_start, self._same_calls = {}, start, None
        try:
            yield True
        finally:
            self._prefixes, self._same_calls = None, None

    def from_prefix(self, batch: Batch, names: Sequence[str]) -> bool:
        """Whether a `read` of `batch` touching only the hooks `names` may run from the cached prefix."""
        layers = [hook_names.layer_of(name) for name in names]
        return (self._prefixes is not None and batch.key is not None
                and all(layer is not None and layer >= self._prefix_start for layer in layers))

    def run_from_prefix(self, batch: Batch, stop: int, hooks: Callable[[bool], AbstractContextManager],
                        last: int | None = None) -> None:
        """Blocks `start`…`stop - 1` on the cached input of block `start`, inside `hooks(True)` (the caller's
        interventions and reads; entered only after the prefix is captured, so its forward runs without them).

        With `last` (only the last `last` positions are wanted) and at least `SHARED_TOKENS_MIN` leading
        tokens shared by every row before them, those tokens run once per block as one row, inside
        `hooks(False)` (the interventions without the reads: the edit applies to them too), and every row
        attends to their keys and values: the same arithmetic for the positions read, on fewer tokens.
        The hooks then see the rows without the shared tokens, so a read holds only later positions."""
        prefix = self._prefix(batch, stop, last)
        if prefix.shared is None:
            with hooks(True):
                self._run_blocks(prefix, stop)
            return
        collected = _kv_cache()
        with hooks(False):
            self._run_blocks(prefix.shared, stop, collected)
        keys = prefix.keys_before + [(layer.keys, layer.values) for layer in collected.layers[self._prefix_start:stop]]
        with hooks(True):
            self._run_blocks(prefix, stop, _kv_cache(keys, len(prefix.hidden)))

    def _run_blocks(self, prefix: _Prefix, stop: int, past: Any = None) -> None:
        blocks = self.blocks()
        hidden = prefix.hidden
        for layer, (args, kwargs) in zip(range(self._prefix_start, stop), prefix.calls):
            kwargs = kwargs if past is None else {**kwargs, "past_key_values": past}
            hidden = first(blocks[layer](hidden, *args, **kwargs))

    def _prefix(self, batch: Batch, stop: int, last: int | None) -> _Prefix:
        """Block `start`'s input and the arguments of blocks `start`…`stop - 1`, from one forward (cached);
        the shared leading tokens apart when `last` allows it (`run_from_prefix`)."""
        rows, key = batch.key, (batch.key, stop, last)
        if key not in self._prefixes:
            shared = 0 if last is None or len(rows) < 2 else min(shared_length(rows), min(map(len, rows)) - last)
            split = self._split_prefix(rows, stop, shared) if shared >= SHARED_TOKENS_MIN else None
            self._prefixes[key] = split or _Prefix(*self._capture(batch.input_ids, batch.attention_mask, stop))
        return self._prefixes[key]

    def _split_prefix(self, rows: tuple, stop: int, shared: int) -> _Prefix | None:
        """The `_Prefix` with the first `shared` tokens apart, or None when the model's blocks do not take
        their KV cache as the keyword `past_key_values` (then it cannot be swapped in)."""
        head = torch.tensor([rows[0][:shared]], device=self.device)
        collected = _kv_cache()
        head_prefix = _Prefix(*self._capture(head, torch.ones_like(head), stop, collected))
        tail = self.batch([row[shared:] for row in rows])
        mask = torch.cat([torch.ones((len(rows), shared), dtype=tail.attention_mask.dtype, device=self.device),
                          tail.attention_mask], dim=1)
        filled = [layer for layer in collected.layers if getattr(layer, "is_initialized", False)]
        past = _kv_cache([(layer.keys, layer.values) for layer in filled], len(rows))
        hidden, calls = self._capture(tail.input_ids, mask, stop, past)
        takes_cache = all(kwargs.get("past_key_values") is collected for _, kwargs in head_prefix.calls) and all(
            kwargs.get("past_key_values") is past for _, kwargs in calls)
        if not takes_cache:
            return None
        before = [(layer.keys, layer.values) for layer in filled[: self._prefix_start]]
        head_prefix.calls = _without_cache(head_prefix.calls)  # swapped in per run; the capture's is dropped
        return _Prefix(hidden, _without_cache(calls), head_prefix, before)

    def _capture(self, input_ids: Tensor, attention_mask: Tensor, stop: int, past: object | None = None
                 ) -> tuple[Tensor, list[tuple[tuple, dict]]]:
        """Block `start`'s input and the arguments of blocks `start`…`stop - 1`, from one gradient-free
        forward of `input_ids` (attending to `past`'s keys when given) that ends before block `stop - 1` runs
        — or before block `start` runs, once a capture has shown the model passing every block the same
        arguments (computed once before its block loop, as Llama does; not so where blocks alternate masks)."""
        start, blocks = self._prefix_start, self.blocks()
        needed = 1 if self._same_calls else stop - start
        calls: list[tuple[tuple, dict]] = []
        hidden: list[Tensor] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rest = dict(kwargs)
            hidden.append(args[0] if args else rest.pop("hidden_states"))
            calls.append((tuple(args[1:]), rest))
            if len(calls) == needed:
                raise _Captured

        handles = [blocks[i].register_forward_pre_hook(capture, with_kwargs=True) for i in range(start, start + needed)]
        try:
            with torch.no_grad():
                self.forward_for_capture(input_ids, attention_mask, past)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if needed > 1:
            self._same_calls = all(_same_call(call, calls[0]) for call in calls[1:])
        return hidden[0], calls * (stop - start) if needed == 1 else calls

    @abstractmethod
    def intervene(self, interventions: Interventions) -> AbstractContextManager[None]:
        """Install the interventions for the duration of a `with` block; removed on every exit."""

    @abstractmethod
    def read(
        self, batch: Batch, streams: Sequence[str], interventions: Interventions = (), last: int | None = None
    ) -> dict[str, Float[Tensor, "batch pos d"]]:
        """The named streams under the interventions; the forward stops after the last one.

        Gradients flow to the interventions when grad mode is on; the LM head never runs. `last`: only the
        last `last` positions are returned (inside `reusing_prefix`, tokens every row shares before them may
        then run once for the batch).
        """

    @abstractmethod
    def logits(self, batch: Batch, interventions: Interventions = (), last: int | None = None
               ) -> Float[Tensor, "batch pos vocab"]:
        """Full forward to the LM head under the interventions; with `last`, the LM head runs on (and the
        result holds) only the last `last` positions (HF's `logits_to_keep`)."""

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
