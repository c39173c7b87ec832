"""The adversarial loop of ARE: extract → fresh discriminator → stop test → adapter steps.

Each round (Zhang et al. 2024, §3) reads the streams under the current edit for source and target
prompts, trains a *fresh* discriminator on the training split, measures it on the held-out split and
stops when that accuracy lies in the stop band. Otherwise the adapters train. Two schedules:

* ``paper``: the adapters take `adapter_epochs` passes of cross-entropy toward "target" against the
  frozen fresh discriminator, at the last prompt token only.
* ``matched`` (default): the adapters take `steps_per_round` steps against a *warm* discriminator
  (dropout, weight decay, label smoothing; one update per adapter step) plus matching terms, at the last
  prompt token and at `reply_tokens` teacher-forced positions of the model's own replies to the target
  prompts (`source_replies="own"`: source rows get the replies to the source prompts instead). Each term
  is a squared distance in standardised features (each divided by its round-0 spread: `mean_metric`) over
  the initial gap. The mean term matches the source batch's shift from round 0 to the round-0 gap at every
  window position (`anchor="start"`, `mean_positions="each"`); the pair term (`pair_weight`, paired
  concepts) matches each source row to its own target twin — same instruction, same reply — position by
  position, since a mean can match while every pair stays apart. Measured on SmolLM2 (benchmarks/
  RESULTS.md): with reads reaching the last blocks this moves both tone directions fluently on two seeds;
  the earlier default (`anchor="edited"`, `mean_positions="pooled"`, no pair term: matched to the target
  rows *as the edit leaves them*) carried the target prompts 3–4 gaps along and its cheerful replies
  repeated. `hold_weight` > 0 adds a term keeping the target rows' mean where round 0 found them;
  `preserve_weight` > 0 adds `preserve_weight · KL(base ‖ edited)` of the next-token distributions on a
  batch of target training rows (`preservation_gradients`). The fresh discriminators compare the edited
  source rows with the target rows the edit is matched to (`compared`). Standardising matters: in raw
  coordinates the high-variance features (spread up to 8× the median one at SmolLM2's blocks 10–14)
  dominate, and a gloomy edit matched there made replies *more* positive. The paper's schedule does not
  converge on small models (fresh D stays at 0.95–1.0 while adapters overshoot).

Every round's record also holds `kl_to_base`: the mean KL(base ‖ edited) of the next-token distributions
over the window's real positions of the held-out target rows, measured with the other figures at the
start of the round (so under the edit as all earlier rounds left it, at training strength 1; round 0 of a
zero-initialised adapter gives 0, and the last record describes the returned edit), and
`adapter_seconds`, the part of the round's `seconds` its adapter steps took (None when none ran): the rest
is the round's measurement.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from . import discriminators, hook_names, layers
from .adapters import Adapter
from .backends import Backend
from .discriminators import SOURCE, TARGET, Discriminator

Interventions = Sequence[tuple[str, Adapter]]
T = TypeVar("T")


@dataclass(frozen=True)
class RoundsConfig:
    """Hyper-parameters of the loop. `preset(schedule)` gives each schedule's defaults."""

    schedule: str = "matched"
    rounds: int = 6
    stop_band: tuple[float, float] = (0.45, 0.70)
    discriminator: str = "mlp"
    hidden: int = 512
    d_epochs: int = 30
    d_batch_size: int = 64
    d_lr: float = 1e-3
    lr: float = 1e-3
    batch_size: int = 16
    adapter_epochs: int = 2
    steps_per_round: int = 25
    reply_tokens: int = 16
    mean_weight: float = 1.0
    adversarial_weight: float = 1.0
    warm_dropout: float = 0.2
    warm_weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    preserve_weight: float = 0.0  # matched only: weight of KL(base ‖ edited) on target rows; 0 = off
    anchor: str = "start"  # matched only: target features the source rows are matched to: "start" or "edited"
    hold_weight: float = 0.0  # matched only: weight of the term keeping the target rows' mean where it was
    source_replies: str = "target"  # teacher-forced replies: "target" (both rows) or "own" (each set its own)
    mean_metric: str = "standardized"  # matched only: "standardized" (features over round 0's std) or "raw"
    mean_positions: str = "each"  # matched only: every window position's own mean, or one "pooled" over them
    pair_weight: float = 1.0  # matched only: weight of each source row's distance to its own target row (paired)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCHEDULES = ("matched", "paper")
POOL_STRIDE = 4
"""The pooled fresh discriminator reads window positions 0, 4, 8, … (5 of 17 by default)."""


MATCHED_ONLY = {"preserve_weight": ("a KL term in its adapter steps", 0.0),
                "hold_weight": ("a term in its adapter steps", 0.0),
                "pair_weight": ("a term in its adapter steps", 0.0),
                "anchor": ("what its mean term matches", "edited")}
"""Options only the matched schedule uses: why, and the value that leaves it off."""


def check_matched_only(cfg: RoundsConfig) -> None:
    """A `MATCHED_ONLY` option set away from its off value only where the matched schedule uses it."""
    for name, (why, off) in MATCHED_ONLY.items():
        value = getattr(cfg, name)
        if value != off and cfg.schedule != "matched":
            raise ValueError(f"{name}= is used only by schedule='matched' ({why}); got {name}={value!r} with "
                             f"schedule={cfg.schedule!r}")


def preset(schedule: str) -> RoundsConfig:
    """The defaults of a named schedule: the paper's (Adam 1e-4, 2 passes, last token) or ours."""
    if schedule == "paper":
        off = {name: value for name, (_, value) in MATCHED_ONLY.items()}  # the matched schedule's terms
        return RoundsConfig(schedule="paper", rounds=20, lr=1e-4, reply_tokens=0, mean_positions="pooled", **off)
    if schedule == "matched":
        return RoundsConfig()
    raise ValueError(f"schedule= must be one of {SCHEDULES}; got {schedule!r}")


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the device running out of memory (CUDA's own class or a RuntimeError saying so)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


class BatchSize:
    """How many rows one forward may carry: `batch_size` until the device runs out of memory, then half of
    it for the rest of the edit. Work sized by it (`run`, `map`) is retried at the smaller size, so an edit
    started with too large a batch finishes with the same mathematics instead of failing.
    """

    def __init__(self, size: int, device: torch.device | None = None) -> None:
        self.size, self.device = int(size), device

    def run(self, work: Callable[[int], T]) -> T:
        """`work(size)`, called again with half the size after each out-of-memory error."""
        while True:
            try:
                return work(self.size)
            except RuntimeError as error:  # torch.OutOfMemoryError is one
                if not out_of_memory(error):
                    raise
                message = str(error)
            self._halve(message)  # outside the except block, so the failed frames' tensors are freed first

    def map(self, items: Sequence[Any], work: Callable[[Sequence[Any]], T]) -> list[tuple[Sequence[Any], T]]:
        """(chunk, `work(chunk)`) over consecutive chunks of `items`, each at most the current size; a chunk
        that runs out of memory is redone in halves (chunks already done are kept)."""
        out: list[tuple[Sequence[Any], T]] = []
        start = 0
        while start < len(items):

            def attempt(size: int, start: int = start) -> tuple[Sequence[Any], T]:
                chunk = items[start : start + size]
                return chunk, work(chunk)

            out.append(self.run(attempt))
            start += len(out[-1][0])
        return out

    def _halve(self, message: str) -> None:
        if self.size <= 1:
            raise MemoryError(f"a batch of 1 row does not fit in the device's memory ({message.strip()[:200]}); "
                              "use shorter prompts, fewer read layers or a larger device") from None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.size //= 2


def sized(batch_size: int | BatchSize, device: torch.device | None = None) -> BatchSize:
    """A `BatchSize` from an int (a fresh one) or the shared one the loop carries."""
    return batch_size if isinstance(batch_size, BatchSize) else BatchSize(batch_size, device)


@dataclass(frozen=True)
class Rows:
    """Token ids of the four prompt sets, each with the same number of trailing reply tokens appended."""

    train_source: list[list[int]]
    train_target: list[list[int]]
    test_source: list[list[int]]
    test_target: list[list[int]]
    window: int = 1  # trailing positions read per row: the last prompt token plus the reply tokens


def buckets(rows: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so left padding wastes little compute."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def window_features(
    backend: Backend, rows: Sequence[Sequence[int]], read: Sequence[str], interventions: Interventions,
    window: int,
) -> Float[Tensor, "batch window features"]:
    """R(x) at the last `window` positions: the read streams concatenated in `read` order."""
    streams = backend.read(backend.batch(rows), read, interventions, last=window)
    return torch.cat([streams[name] for name in read], dim=-1)


@torch.no_grad()
def extract(
    backend: Backend, rows: Sequence[Sequence[int]], streams: Sequence[str], interventions: Interventions,
    window: int, batch_size: int | BatchSize,
) -> dict[str, Float[Tensor, "n window d"]]:
    """Each stream's last `window` positions for every row, in length buckets, in the rows' order (fp32)."""
    sizer = sized(batch_size, backend.device)
    out = {name: [None] * len(rows) for name in streams}

    def read(idx: Sequence[int]) -> dict[str, Tensor]:
        values = backend.read(backend.batch([rows[i] for i in idx]), streams, interventions, last=window)
        return {name: values[name].float() for name in streams}

    for bucket in buckets(rows, sizer.size):
        for idx, values in sizer.map(bucket, read):
            for name in streams:
                for j, i in enumerate(idx):
                    out[name][i] = values[name][j]
    return {name: torch.stack(parts) for name, parts in out.items()}


def joined(streams: dict[str, Tensor], read: Sequence[str]) -> Tensor:
    """R(x): the read streams concatenated along features, in `read` order."""
    return torch.cat([streams[name] for name in read], dim=-1)


@torch.no_grad()
def teacher_replies(
    backend: Backend, rows: Sequence[Sequence[int]], n_tokens: int, batch_size: int | BatchSize
) -> list[list[int]]:
    """The base model's greedy replies, exactly `n_tokens` long (padded with EOS after an early stop)."""
    sizer = sized(batch_size, backend.device)
    eos = backend.tokenizer.eos_token_id
    fill = backend.pad_id if eos is None else int(eos)
    replies: list[list[int]] = [[] for _ in rows]

    def generate(idx: Sequence[int]) -> list[list[int]]:
        return backend.generate(backend.batch([rows[i] for i in idx]), (), n_tokens).tolist()

    for bucket in buckets(rows, sizer.size):
        for idx, new in sizer.map(bucket, generate):
            for j, i in enumerate(idx):
                replies[i] = (new[j] + [fill] * n_tokens)[:n_tokens]
    return replies


def fresh_accuracy(
    cfg: RoundsConfig, generator: torch.Generator, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> tuple[float, float, Discriminator]:
    """Train a fresh discriminator on `train` (source, target); (held-out accuracy, loss, model)."""
    disc = discriminators.make(cfg.discriminator, train[0].shape[-1], cfg.hidden)
    loss = discriminators.fit(disc, *train, epochs=cfg.d_epochs, batch_size=cfg.d_batch_size, lr=cfg.d_lr,
                              generator=generator)
    return discriminators.accuracy(disc, *test), loss, disc


def _last(x: Tensor) -> Tensor:
    return x[:, 0, :]  # the window starts at the last prompt token


def _pooled(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def adapter_gradients(
    backend: Backend, rows: Sequence[Sequence[int]], read: Sequence[str], interventions: Interventions,
    window: int, optimizer: torch.optim.Optimizer, sizer: BatchSize,
    loss_of: Callable[[Tensor], tuple[Tensor, ...]],
) -> tuple[Tensor, ...]:
    """Fill the adapters' gradients of `loss_of(window_features(rows))[0]`; returns `loss_of`'s values.

    When the rows do not fit in one forward, the step keeps its mathematics: the features of every chunk
    are read without gradients, the loss and its gradient with respect to the features are taken over the
    whole batch (so a batch mean, as in the mean-matching term, is the full batch's), and each chunk is run
    again with gradients and back-propagated with its slice of that gradient. The adapters' gradient is
    then the full batch's (up to float rounding), at the price of one extra gradient-free forward.
    """

    def attempt(size: int) -> tuple[Tensor, ...]:
        optimizer.zero_grad(set_to_none=True)
        if size >= len(rows):
            values = loss_of(window_features(backend, rows, read, interventions, window))
            values[0].backward()
            return values
        starts = range(0, len(rows), size)
        with torch.no_grad():
            feats = torch.cat([window_features(backend, rows[i : i + size], read, interventions, window)
                               for i in starts])
        feats.requires_grad_(True)
        values = loss_of(feats)
        (grad,) = torch.autograd.grad(values[0], feats)
        for i in starts:
            window_features(backend, rows[i : i + size], read, interventions, window).backward(grad[i : i + size])
        return values

    return sizer.run(attempt)


CACHE_BYTES = 512 * 2**20
"""At most this much memory (on the model's device) holds the base model's cached log-probabilities."""


def window_logprobs(
    backend: Backend, rows: Sequence[Sequence[int]], interventions: Interventions, window: int
) -> tuple[Float[Tensor, "batch window vocab"], Bool[Tensor, "batch window"]]:
    """Next-token log-probabilities (fp32) at the last `window` positions, and which of them are real tokens."""
    batch = backend.batch(rows)
    logits = backend.logits(batch, interventions, last=window)
    return logits.float().log_softmax(-1), batch.attention_mask[:, -window:].bool()


class BaseLogProbs:
    """The base model's (no interventions) `window_logprobs` per batch of rows, computed without gradients
    and cached while the cache stays under `budget` bytes (a batch beyond it is recomputed each time).
    Keyed by the exact rows, so a batch split after an out-of-memory error gets its own, equally padded,
    base forward."""

    def __init__(self, backend: Backend, window: int, budget: int = CACHE_BYTES) -> None:
        self.backend, self.window, self.budget, self.used = backend, window, budget, 0
        self.cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def __call__(self, rows: Sequence[Sequence[int]]) -> tuple[Float[Tensor, "batch window vocab"],
                                                               Bool[Tensor, "batch window"]]:
        key = tuple(map(tuple, rows))
        if key in self.cache:
            return self.cache[key]
        value = window_logprobs(self.backend, rows, (), self.window)
        size = value[0].numel() * value[0].element_size()
        if self.used + size <= self.budget:
            self.cache[key], self.used = value, self.used + size
        return value


def kl_sum(
    base: Float[Tensor, "batch window vocab"], edited: Float[Tensor, "batch window vocab"],
    real: Bool[Tensor, "batch window"],
) -> Float[Tensor, ""]:
    """Σ over the real positions of KL(base ‖ edited) = Σ_v p_base·(log p_base − log p_edited), in nats
    (tokens the base model gives probability 0 contribute 0)."""
    p = base.exp()
    kl = torch.where(p > 0, p * (base - edited), 0.0).sum(-1)
    return torch.where(real, kl, torch.zeros((), device=kl.device)).sum()  # pad positions count for nothing


def real_positions(rows: Sequence[Sequence[int]], window: int) -> int:
    """How many of the last `window` positions of left-padded `rows` hold tokens."""
    return sum(min(len(row), window) for row in rows)


def preservation_gradients(
    backend: Backend, rows: Sequence[Sequence[int]], interventions: Interventions, window: int,
    weight: float, base: BaseLogProbs, sizer: BatchSize,
) -> Float[Tensor, ""]:
    """Add the gradient of `weight` · mean KL(base ‖ edited) over the real window positions of `rows` to
    the adapters' gradients (after `adapter_gradients` filled them); returns that mean KL (detached).

    Its own forward/backward per chunk of `sizer.size` rows; the chunks' gradients are summed aside and
    added only once every chunk has run, so a chunk that runs out of memory redoes the term at half the
    size without counting any chunk twice. The mean is the whole batch's (each chunk's KL sum / all its
    real positions)."""
    params = [p for _, adapter in interventions for p in adapter.parameters() if p.requires_grad]
    count = max(real_positions(rows, window), 1)

    def attempt(size: int) -> tuple[Tensor, list[Tensor | None]]:
        total = torch.zeros((), device=backend.device)
        grads: list[Tensor | None] = [None] * len(params)
        for i in range(0, len(rows), size):
            chunk = rows[i : i + size]
            reference, real = base(chunk)
            term = kl_sum(reference, window_logprobs(backend, chunk, interventions, window)[0], real) / count
            parts = torch.autograd.grad(weight * term, params, allow_unused=True)
            grads = [old if new is None else new if old is None else old + new for old, new in zip(grads, parts)]
            total = total + term.detach()
        return total, grads

    total, grads = sizer.run(attempt)
    for param, grad in zip(params, grads):
        if grad is not None:
            param.grad = grad if param.grad is None else param.grad + grad
    return total


@torch.no_grad()
def kl_to_base(
    backend: Backend, rows: Sequence[Sequence[int]], interventions: Interventions, window: int,
    sizer: BatchSize, base: BaseLogProbs | None = None,
) -> float:
    """Mean KL(base ‖ edited) of the next-token distributions over the real positions of the last `window`
    positions of `rows`: one forward per batch with the interventions (the base one is cached in `base`)."""
    base = BaseLogProbs(backend, window) if base is None else base
    total = torch.zeros((), device=backend.device)

    def kl(chunk: Sequence[Sequence[int]]) -> Tensor:
        reference, real = base(chunk)
        return kl_sum(reference, window_logprobs(backend, chunk, interventions, window)[0], real)

    for bucket in buckets(rows, sizer.size):
        for _, value in sizer.map([rows[i] for i in bucket], kl):
            total = total + value
    return float(total / max(real_positions(rows, window), 1))


def paper_phase(backend: Backend, rows: Rows, read: Sequence[str], interventions: Interventions,
                disc: Discriminator, optimizer: torch.optim.Optimizer, cfg: RoundsConfig,
                generator: torch.Generator, sizer: BatchSize | None = None) -> dict[str, float]:
    """`adapter_epochs` passes over the source prompts, cross-entropy toward the target label.

    Batches are `cfg.batch_size` rows; `sizer` splits a step that does not fit (`adapter_gradients`).
    """
    sizer = sized(cfg.batch_size, backend.device) if sizer is None else sizer
    total, count = torch.zeros((), device=backend.device), 0

    def loss_of(feats: Tensor) -> tuple[Tensor]:
        logits = disc(_last(feats))
        return (F.cross_entropy(logits, torch.full((len(logits),), TARGET, device=logits.device)),)

    batches = buckets(rows.train_source, cfg.batch_size)
    for _ in range(cfg.adapter_epochs):
        for b in torch.randperm(len(batches), generator=generator).tolist():
            (loss,) = adapter_gradients(backend, [rows.train_source[i] for i in batches[b]], read, interventions,
                                        rows.window, optimizer, sizer, loss_of)
            optimizer.step()
            total, count = total + loss.detach() * len(batches[b]), count + len(batches[b])
    return {"adapter_loss": float(total / max(count, 1))}


def matched_phase(backend: Backend, rows: Rows, read: Sequence[str], interventions: Interventions,
                  warm: Discriminator, warm_optimizer: torch.optim.Optimizer, optimizer: torch.optim.Optimizer,
                  start: dict[str, Tensor], target_now: Tensor, gap_scale: Tensor, cfg: RoundsConfig,
                  generator: torch.Generator, sizer: BatchSize | None = None, round_: int = 0,
                  base: BaseLogProbs | None = None) -> dict[str, float | None]:
    """`steps_per_round` adapter steps (warm-D cross-entropy + mean matching, + hold), each followed by one
    warm-D step.

    `start` holds round 0's window features of the training rows ("train_source", "train_target");
    `target_now` the target rows' as this round read them. `cfg.anchor` says what the source rows are
    matched to: "edited" — the target rows as the edit leaves them (`target_now`: the warm discriminator
    learns against them and the mean term is the batch mean's distance to their mean); "start" — the
    target rows' round-0 features, and the mean term compares the batch's *shift* (its edited features
    minus the same rows' round-0 features) with the round-0 gap, so the rows' own spread cancels from the
    estimate. The edit applies to every prompt: matched to the edited target rows it can carry them
    along (`gap_figures`' `target_drift`). With `cfg.hold_weight` > 0 each step also runs a target batch
    and adds the same measure of *its* shift from round 0, which should stay 0. `cfg.mean_positions`:
    "pooled" takes these means over all window positions at once, "each" per position and averages the
    positions' squared distances. With `cfg.pair_weight` > 0 each source row is also matched to its own
    target twin (same instruction, same teacher-forced reply; `pair_loss`), position by position in the
    same standardised metric — for a paired concept; a mean can match while every pair stays apart.

    Batches are `cfg.batch_size` rows; `sizer` splits a step that does not fit (`adapter_gradients`: the
    batch means stay the whole batch's). The target batch (hold and preservation) is the target training
    bucket `(round_ · steps_per_round + step) mod` their number (a fixed cycle: the shared `generator` is
    not drawn from). With `cfg.preserve_weight` > 0 each step adds `preservation_gradients` on it;
    `preserve_loss` is its mean KL over the round's steps and `adapter_loss` includes
    `preserve_weight · preserve_loss`. A weight of 0 runs no extra forward and reports None.
    `base` caches the base log-probabilities.
    """
    sizer = sized(cfg.batch_size, backend.device) if sizer is None else sizer
    preserving, holding, from_start = cfg.preserve_weight > 0, cfg.hold_weight > 0, cfg.anchor == "start"
    pairing = cfg.pair_weight > 0
    target_batches = buckets(rows.train_target, cfg.batch_size)
    if preserving and base is None:
        base = BaseLogProbs(backend, rows.window)
    target_rows = start["train_target"] if from_start else target_now
    target_pool = _pooled(target_rows)
    means = _pooled if cfg.mean_positions == "pooled" else (lambda x: x)  # rows, then mean over them
    wanted = means(target_rows).mean(0) - (means(start["train_source"]).mean(0) if from_start else 0.0)
    feature_scale = mean_scale(warm, cfg)
    batches = buckets(rows.train_source, cfg.batch_size)
    keys = ("adapter_loss", "adversarial", "mean", "hold", "pair", "warm", "margin", "preserve")
    sums = {k: torch.zeros((), device=backend.device) for k in keys}

    def squared(difference: Tensor) -> Tensor:
        """A difference's squared length in standardised features, averaged over what precedes the feature
        axis, over the initial gap: the metric every matching term uses."""
        return (difference / feature_scale).pow(2).sum(-1).mean() / gap_scale

    def shift_term(window: Tensor, anchor: Tensor | None, wanted: Tensor | float) -> Tensor:
        """(mean of `window` − mean of `anchor`) − `wanted`, squared."""
        shift = means(window).float().mean(0)
        if anchor is not None:
            shift = shift - means(anchor).mean(0)
        return squared(shift - wanted)

    def loss_of(window: Tensor, source_anchor: Tensor | None, target_anchor: Tensor | None,
                partners: Tensor | None) -> tuple[Tensor, ...]:
        """The window holds the source batch, then (when holding) the target batch of `target_anchor`'s rows."""
        n_source = len(window) - (0 if target_anchor is None else len(target_anchor))
        feats = _pooled(window[:n_source]).float()
        logits = warm(feats)
        adversarial = F.cross_entropy(logits, torch.full((len(feats),), TARGET, device=feats.device))
        mean_term = shift_term(window[:n_source], source_anchor, wanted)
        hold = (torch.zeros_like(mean_term) if target_anchor is None
                else shift_term(window[n_source:], target_anchor, 0.0))
        # each source row against its own target twin (same instruction, same reply), position by position
        pair = torch.zeros_like(mean_term) if partners is None else squared(window[:n_source].float() - partners)
        loss = (cfg.adversarial_weight * adversarial + cfg.mean_weight * mean_term + cfg.hold_weight * hold
                + cfg.pair_weight * pair)
        return loss, adversarial, mean_term, hold, pair, logits.detach(), feats.detach()

    for step in range(cfg.steps_per_round):
        if step % len(batches) == 0:
            order = torch.randperm(len(batches), generator=generator).tolist()
        idx = batches[order[step % len(batches)]]
        pick = target_batches[(round_ * cfg.steps_per_round + step) % len(target_batches)]
        held = pick if holding else []
        warm.eval()
        loss, adversarial, mean_term, hold, pair, logits, feats = adapter_gradients(
            backend, [rows.train_source[i] for i in idx] + [rows.train_target[i] for i in held], read,
            interventions, rows.window, optimizer, sizer,
            functools.partial(loss_of, source_anchor=start["train_source"][idx] if from_start else None,
                              target_anchor=start["train_target"][held] if holding else None,
                              partners=target_rows[idx] if pairing else None))
        if preserving:
            preserve = preservation_gradients(backend, [rows.train_target[i] for i in pick], interventions,
                                              rows.window, cfg.preserve_weight, base, sizer)
            sums["preserve"] = sums["preserve"] + preserve
            loss = loss + cfg.preserve_weight * preserve
        optimizer.step()

        warm.train()
        draw = discriminators.to_device(torch.randint(len(target_pool), (len(feats),), generator=generator),
                                        feats.device)
        x = torch.cat([feats, target_pool[draw]])
        y = torch.cat([torch.full((len(feats),), SOURCE, device=feats.device),
                       torch.full((len(feats),), TARGET, device=feats.device)])
        warm_loss = F.cross_entropy(warm(x), y, label_smoothing=cfg.label_smoothing)
        warm_optimizer.zero_grad(set_to_none=True)
        warm_loss.backward()
        warm_optimizer.step()

        margin = (logits[:, TARGET] - logits[:, SOURCE]).mean()
        for key, value in (("adapter_loss", loss), ("adversarial", adversarial), ("mean", mean_term),
                           ("hold", hold), ("pair", pair), ("warm", warm_loss), ("margin", margin)):
            sums[key] = sums[key] + value.detach()
    out = {k: float(v / cfg.steps_per_round) for k, v in sums.items()}
    return {"adapter_loss": out["adapter_loss"], "adversarial_loss": out["adversarial"],
            "mean_loss": out["mean"], "hold_loss": out["hold"] if holding else None,
            "pair_loss": out["pair"] if pairing else None,
            "warm_d_loss": out["warm"], "warm_d_margin": out["margin"],
            "preserve_loss": out["preserve"] if preserving else None}


def gap_figures(
    base_source: Tensor, base_target: Tensor, source: Tensor, target: Tensor, reference: Tensor | None = None
) -> dict[str, float]:
    """Where the edited means lie, in units of the base gap mean(base target) − mean(base source).

    projection and cosine: the edited source mean's shift along that gap (1 and 1: exactly onto the base
    target mean). mean_gap_left: the distance still between the edited source mean and the `reference`
    target rows' mean — the target the edit is matched to and its fresh discriminators see (`compared`):
    the edited `target` rows by default, the base ones for `anchor="start"` (1 before any edit).
    target_drift: how far the edit moved the target mean itself — an edit that shifts every prompt alike
    moves both and leaves the gap between them.
    """
    reference = target if reference is None else reference
    gap = base_target.mean(0) - base_source.mean(0)
    shift = source.mean(0) - base_source.mean(0)
    gap_norm = gap.norm().clamp_min(1e-12)
    return {
        "projection": float(shift @ gap / gap_norm**2),
        "cosine": float(F.cosine_similarity(shift, gap, dim=0)) if shift.norm() > 0 else 0.0,
        "mean_gap_left": float((reference.mean(0) - source.mean(0)).norm() / gap_norm),
        "target_drift": float((target.mean(0) - base_target.mean(0)).norm() / gap_norm),
    }


def compared(cfg: RoundsConfig, edited: dict[str, Tensor], base: dict[str, Tensor]) -> dict[str, Tensor]:
    """The feature sets a fresh discriminator compares: the edited source rows against the target rows
    the edit is matched to — as the edit leaves them (`anchor="edited"`) or as round 0 read them
    ("start"). Keys as in `edited` (``train_source``, ``train_target``, ``test_source``, ``test_target``)."""
    if cfg.anchor != "start":
        return dict(edited)
    return {**edited, "train_target": base["train_target"], "test_target": base["test_target"]}


class NumericsError(ValueError):
    """A loss became NaN or infinite; the round stops and the last complete checkpoint stays as it was."""


def _finite(value: float, round_: int, phase: str) -> float:
    """One host-side check per phase: the phase accumulated its losses on device, so one NaN or Inf shows."""
    if not math.isfinite(value):
        raise NumericsError(
            f"round {round_}, {phase} phase: the loss is {value} (NaN or infinite); lower lr=, check the "
            "model's dtype and the prompts; a checkpoint_dir= keeps the last complete round"
        )
    return value


@dataclass
class LoopState:
    """Everything the loop carries from one round to the next: what a checkpoint holds (`checkpoint`).

    `base`/`base_source` are round 0's features (the mean-gap reference); `warm` and its optimizer exist
    once the matched schedule has trained; `disc` is the latest fresh discriminator.
    """

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    next_round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    snapshots: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    base: dict[str, Tensor] = field(default_factory=dict)
    base_source: dict[str, Tensor] = field(default_factory=dict)
    disc: Discriminator | None = None
    warm: Discriminator | None = None
    warm_optimizer: torch.optim.Optimizer | None = None
    gap_scale: Tensor | None = None


def initial_state(interventions: Interventions, cfg: RoundsConfig) -> LoopState:
    """The state before round 0: Adam over the adapters' parameters and the seeded data generator."""
    params = [p for _, adapter in interventions for p in adapter.parameters()]
    return LoopState(torch.optim.Adam(params, lr=cfg.lr), torch.Generator().manual_seed(cfg.seed))


def warm_optimizer(warm: Discriminator, cfg: RoundsConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(warm.parameters(), lr=cfg.d_lr, weight_decay=cfg.warm_weight_decay)


def _start_warm(state: LoopState, cfg: RoundsConfig, in_features: int) -> None:
    """The matched schedule's warm discriminator, standardised on round 0's features, and the gap scale."""
    source, target = _pooled(state.base["train_source"]), _pooled(state.base["train_target"])
    state.warm = discriminators.make(cfg.discriminator, in_features, cfg.hidden, cfg.warm_dropout)
    state.warm.standardize_on(torch.cat([source, target]))
    state.warm_optimizer = warm_optimizer(state.warm, cfg)
    gap = (target.mean(0) - source.mean(0)) / mean_scale(state.warm, cfg)
    state.gap_scale = gap.pow(2).sum().clamp_min(1e-12)


def mean_scale(warm: Discriminator, cfg: RoundsConfig) -> Float[Tensor, " features"]:
    """Per-feature divisor of the mean-matching term: round 0's pooled std, which the warm discriminator
    standardises by ("standardized"), or 1 ("raw": the high-variance features dominate the term)."""
    return warm.std if cfg.mean_metric == "standardized" else torch.ones_like(warm.std)


def _first_block(names: Sequence[str]) -> int:
    """The first block any of the hooks lies in (0 when one lies outside the blocks)."""
    layers = [hook_names.layer_of(name) for name in names]
    return 0 if any(layer is None for layer in layers) else min(layers)


def run_rounds(
    backend: Backend, interventions: Interventions, read: Sequence[str], rows: Rows, cfg: RoundsConfig,
    progress: bool = True, state: LoopState | None = None, on_round: Callable[[LoopState], None] | None = None,
    sizer: BatchSize | None = None,
) -> tuple[list[dict[str, Any]], Discriminator, dict[int, dict[str, Tensor]]]:
    """At most `cfg.rounds` adapter phases, a fresh discriminator measured before each and after the last.

    `state` resumes a loop (from `checkpoint.load`); `on_round(state)` runs after every complete round
    (`checkpoint.save`). Returns the per-round history, the last fresh discriminator, and per round the
    last-token read features of the training split (`{"source", "target"}`) for projections.
    `sizer` (shared with the teacher replies) halves the rows per forward after an out-of-memory error;
    each record's `batch_size_used` is the size its round ended with; `kl_to_base` is the held-out target
    rows' mean KL(base ‖ edited) under the edit as the round starts (`kl_to_base`).
    """
    check_matched_only(cfg)
    state = initial_state(interventions, cfg) if state is None else state
    base = BaseLogProbs(backend, rows.window)  # the base model's log-probs, cached across rounds
    sizer = sized(cfg.batch_size, backend.device) if sizer is None else sizer
    low, high = cfg.stop_band
    streams = list(read) + [name for name, _ in interventions if name not in read]
    parts = ("train_source", "train_target", "test_source", "test_target")
    todo = [] if state.history and state.history[-1]["converged"] else range(state.next_round, cfg.rounds + 1)
    bar = tqdm(todo, desc="ARE rounds", disable=not progress, leave=False)
    with backend.reusing_prefix(_first_block(streams)):  # blocks before the first edited/read one are frozen
        for r in bar:
            start = time.perf_counter()
            values = {part: extract(backend, getattr(rows, part), streams, interventions, rows.window, sizer)
                      for part in parts}
            sets = {part: joined(values[part], read) for part in parts}
            if r == 0:
                state.base = dict(sets)
                state.base_source = {name: _last(v) for name, v in values["train_source"].items()}
            seen = compared(cfg, sets, state.base)
            last = {k: _last(v) for k, v in seen.items()}
            accuracy, d_loss, state.disc = fresh_accuracy(
                cfg, state.generator, (last["train_source"], last["train_target"]),
                (last["test_source"], last["test_target"]))
            record: dict[str, Any] = {"round": r, "fresh_d_accuracy": accuracy,
                                      "d_loss": _finite(d_loss, r, "discriminator"),
                                      "adapter_loss": None, "converged": low <= accuracy <= high}
            edited_target = _last(sets["train_target"])
            record.update(gap_figures(_last(state.base["train_source"]), _last(state.base["train_target"]),
                                      last["train_source"], edited_target, last["train_target"]))
            if rows.window > 1:  # every POOL_STRIDE-th window position keeps this measurement cheap
                pooled = {k: _pooled(v[:, ::POOL_STRIDE]) for k, v in seen.items()}
                record["fresh_d_accuracy_pooled"] = fresh_accuracy(
                    cfg, state.generator, (pooled["train_source"], pooled["train_target"]),
                    (pooled["test_source"], pooled["test_target"]))[0]
            if r == 0:
                shift = last["train_target"].mean(0) - last["train_source"].mean(0)
                record["oracle_d_accuracy"] = fresh_accuracy(
                    cfg, state.generator, (last["train_source"] + shift, last["train_target"]),
                    (last["test_source"] + shift, last["test_target"]))[0]
            widths = [values["train_source"][name].shape[-1] for name in read]
            per_stream = {part: {name: _last(v) for name, v in values[part].items()}
                          for part in ("train_source", "test_source")}
            per_stream.update({part: dict(zip(read, torch.split(_last(seen[part]), widths, dim=-1)))
                               for part in ("train_target", "test_target")})  # as the fresh discriminators
            record["probe_accuracy"] = layers.probe_accuracies(
                (per_stream["train_source"], per_stream["train_target"]),
                (per_stream["test_source"], per_stream["test_target"]), read, state.generator)
            record["adapters"] = layers.adapter_effects(interventions, state.base_source, per_stream["train_source"])
            record["kl_to_base"] = kl_to_base(backend, rows.test_target, interventions, rows.window, sizer, base)
            state.snapshots[r] = {"source": last["train_source"].cpu(), "target": edited_target.cpu()}
            record["adapter_seconds"] = None
            if not record["converged"] and r < cfg.rounds:
                phase_start = time.perf_counter()
                if cfg.schedule == "paper":
                    record.update(paper_phase(backend, rows, read, interventions, state.disc, state.optimizer, cfg,
                                              state.generator, sizer))
                else:
                    if state.warm is None:
                        _start_warm(state, cfg, state.disc.in_features)
                    record.update(matched_phase(backend, rows, read, interventions, state.warm, state.warm_optimizer,
                                                state.optimizer, state.base, sets["train_target"],
                                                state.gap_scale, cfg,
                                                state.generator, sizer, r, base))
                _finite(record["adapter_loss"], r, "adapter")
                if "warm_d_loss" in record:
                    _finite(record["warm_d_loss"], r, "warm discriminator")
                record["adapter_seconds"] = time.perf_counter() - phase_start
            record["batch_size_used"] = sizer.size
            record["seconds"] = time.perf_counter() - start
            state.history.append(record)
            state.next_round = r + 1
            if on_round is not None:
                on_round(state)
            bar.set_postfix(acc=f"{accuracy:.2f}")
            if record["converged"]:
                break
    return state.history, state.disc, state.snapshots
