"""Speed mechanics of edit(): the out-of-memory fallback, on-device discriminator steps, half-precision models."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import pytest
import torch
from nnsight import TransformersModel
from transformers import LlamaConfig, LlamaForCausalLM

from are_lens import Concept, discriminators, edit
from are_lens.adapters import LowRank
from are_lens.backends import Backend, backend_for
from are_lens.backends.base import shared_length
from are_lens.backends.transformer_lens import TransformerLensBackend
from are_lens.rounds import BatchSize, out_of_memory
from conftest import random_llama, sentences, word_tokenizer

FAST = dict(rounds=2, steps_per_round=3, d_epochs=4, hidden=32, progress=False)


@pytest.fixture(scope="module")
def concept():
    return Concept(sentences("sad", 16), sentences("happy", 16))


def limit_batches(monkeypatch, most: int, error=None) -> list[int]:
    """The backend's read and generate raise an out-of-memory error on batches over `most` rows."""
    seen: list[int] = []

    def limited(method):
        def run(self, batch, *args, **kwargs):
            seen.append(len(batch))
            if len(batch) > most:
                raise (error or torch.OutOfMemoryError)("CUDA out of memory. Tried to allocate 2.00 GiB")
            return method(self, batch, *args, **kwargs)

        return run

    monkeypatch.setattr(TransformerLensBackend, "read", limited(TransformerLensBackend.read))
    monkeypatch.setattr(TransformerLensBackend, "generate", limited(TransformerLensBackend.generate))
    return seen


def assert_same_edit(small, full):
    for (_, a), (_, b) in zip(small.interventions, full.interventions):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    for key in ("fresh_d_accuracy", "fresh_d_accuracy_pooled", "converged"):
        assert [r.get(key) for r in small.history] == [r.get(key) for r in full.history]


@pytest.mark.parametrize("schedule, options", [("paper", dict(lr=1e-2, adapter_epochs=1)),
                                               ("matched", dict(reply_tokens=2))])
def test_an_edit_that_runs_out_of_memory_ends_as_one_that_did_not(random_bridge, concept, monkeypatch,
                                                                   schedule, options):
    """Batches of 8 fail above 2 rows: the size halves twice and stays halved; every training step still
    takes its whole batch of 8 (gradients accumulated over chunks), so the edit is the unconstrained one."""
    run = dict(at=[1], read=[2, 3], schedule=schedule, batch_size=8, stop_band=(0.0, 0.01), **FAST, **options)
    full = edit(random_bridge, concept, **run)
    seen = limit_batches(monkeypatch, 2)
    small = edit(random_bridge, concept, **run)
    assert [r["batch_size_used"] for r in full.history] == [8] * len(full.history)
    assert [r["batch_size_used"] for r in small.history] == [2] * len(small.history)
    assert seen.count(8) == 1 and seen.count(4) == 1  # each larger size failed once, then was remembered
    assert_same_edit(small, full)


def test_a_batch_of_one_that_does_not_fit_is_a_clear_error(random_bridge, concept, monkeypatch):
    limit_batches(monkeypatch, 0, error=RuntimeError)  # a plain RuntimeError saying "out of memory" counts
    with pytest.raises(MemoryError, match="a batch of 1 row does not fit"):
        edit(random_bridge, concept, at=[1], read=[2], batch_size=4, **FAST)


def test_only_out_of_memory_errors_are_retried():
    calls = []

    def work(size):
        calls.append(size)
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes"):
        BatchSize(8).run(work)
    assert calls == [8]
    assert out_of_memory(torch.OutOfMemoryError("x")) and not out_of_memory(ValueError("out of memory"))


def test_map_keeps_finished_chunks_and_halves_the_rest():
    sizer, calls = BatchSize(4), []

    def work(chunk):
        calls.append(list(chunk))
        if len(chunk) > 2 and calls[0] != list(chunk):
            raise torch.OutOfMemoryError("out of memory")
        return sum(chunk)

    out = sizer.map(list(range(10)), work)
    assert [list(c) for c, _ in out] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert [v for _, v in out] == [6, 9, 13, 17] and sizer.size == 2


def test_discriminator_training_reads_nothing_back_per_step(monkeypatch):
    """No host synchronisation inside fit's loop: no .item(), float(), bool() or .tolist() on a tensor in
    are_lens code (Adam's own .item() is on its CPU step counter, which does not wait for the device)."""
    x = torch.randn(40, 6)
    synced = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original):
            if "are_lens" in sys._getframe(1).f_code.co_filename:
                synced.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    disc = discriminators.make("mlp", 6, 16)
    loss = discriminators.fit(disc, x[:20], x[20:] + 1, epochs=5, batch_size=8, generator=torch.Generator())
    monkeypatch.undo()
    assert synced == ["__float__"]  # the one number returned at the end
    assert loss > 0


def test_a_bf16_model_keeps_its_dtype_and_trains_fp32_adapters(tmp_path, concept):
    hf, model = nnsight_llama(tmp_path, n_layers=3, dtype=torch.bfloat16)
    before = hf.model.layers[0].mlp.down_proj.weight.clone()
    result = edit(model, concept, at=[1], read=[2], lr=1e-2, reply_tokens=2, **FAST)
    assert all(p.dtype == torch.bfloat16 for p in hf.parameters())
    assert torch.equal(hf.model.layers[0].mlp.down_proj.weight, before)
    adapters = [p for _, a in result.interventions for p in a.parameters()]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    assert any(p.abs().sum() > 0 for p in adapters)  # it trained


def nnsight_llama(folder, n_layers=4, dtype=torch.float32):
    tokenizer = word_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).to(dtype).eval()
    return hf, TransformersModel(hf, tokenizer=tokenizer)


def backend_over(kind: str, folder):
    """A 4-block random Llama behind the named backend, and its HF decoder layer list."""
    if kind == "nnsight":
        hf, model = nnsight_llama(folder)
        return backend_for(model), hf.model.layers
    bridge = random_llama(folder)
    return backend_for(bridge), bridge.original_model.model.layers


@pytest.mark.parametrize("kind", ["nnsight", "transformer_lens"])
def test_a_cached_frozen_prefix_reads_what_a_full_forward_reads(tmp_path, kind):
    """Blocks 0–1 run once per batch; reads and adapter gradients at blocks ≥ 2 match a full forward."""
    backend, hf_layers = backend_over(kind, tmp_path)
    rows = backend.tokenize(sentences("sad", 3) + ["the cat sat"])  # unequal lengths: left padding
    adapter = LowRank(64, 4)
    torch.nn.init.normal_(adapter.A)
    torch.nn.init.normal_(adapter.B, std=0.1)
    interventions = [("blocks.2.hook_resid_pre", adapter), ("blocks.2.hook_attn_out", LowRank(64, 2))]
    streams = ["blocks.2.hook_resid_pre", "blocks.2.hook_attn_out", "blocks.3.hook_resid_post"]

    def run():
        out = backend.read(backend.batch(rows), streams, interventions)
        adapter.B.grad = None
        sum(v.pow(2).sum() for v in out.values()).backward()
        return {k: v.detach() for k, v in out.items()}, adapter.B.grad.clone()

    full, full_grad = run()
    with torch.no_grad():
        other_full = backend.read(backend.batch(rows[:2]), streams, interventions)
    calls, later = [], []
    hf_layers[0].register_forward_pre_hook(lambda *a: calls.append(0))
    hf_layers[3].register_forward_pre_hook(lambda *a: later.append(0))
    with backend.reusing_prefix(2) as used:
        first, _ = run()
        second, grad = run()
        assert used and len(calls) == 1 and len(later) == 3  # block 0 ran for the first read only
        assert backend._same_calls  # Llama passes every block the same mask and rotary embeddings, so …
        with torch.no_grad():
            other = backend.read(backend.batch(rows[:2]), streams, interventions)
        assert len(calls) == 2 and len(later) == 4  # … a new batch's capture stops before block 2
        with torch.no_grad():  # a stream before the prefix falls back to a full forward
            early = backend.read(backend.batch(rows), ["blocks.1.hook_resid_post"])
    for name in streams:
        torch.testing.assert_close(other[name], other_full[name], rtol=0, atol=1e-5)
    for name in streams:
        torch.testing.assert_close(first[name], full[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(second[name], full[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-5)
    assert early["blocks.1.hook_resid_post"].shape == full[streams[0]].shape and len(calls) == 3
    assert backend._prefixes is None  # dropped when the block closes


@pytest.mark.parametrize("kind", ["nnsight", "transformer_lens"])
def test_tokens_every_row_shares_run_once_and_the_last_positions_read_the_same(tmp_path, kind):
    """A chat template's system prompt is in every row: with `last`, it runs as one row that the others
    attend to (through a KV cache), and the positions read and the adapters' gradients are a full forward's."""
    backend, hf_layers = backend_over(kind, tmp_path)
    preamble = "once upon a time the cat sat and was very "
    rows = backend.tokenize([preamble + s for s in sentences("sad", 3)] + [preamble + "happy"])
    assert shared_length(rows) == 11 and sorted(map(len, rows)) == [12, 22, 22, 22]
    adapter = LowRank(64, 4)
    torch.nn.init.normal_(adapter.A)
    torch.nn.init.normal_(adapter.B, std=0.1)
    interventions = [("blocks.2.hook_resid_pre", adapter), ("blocks.3.hook_attn_out", LowRank(64, 2))]
    streams = ["blocks.2.hook_resid_pre", "blocks.3.hook_resid_post"]

    def run():
        out = backend.read(backend.batch(rows), streams, interventions, last=3)
        adapter.B.grad = None
        sum(v.pow(2).sum() for v in out.values()).backward()
        return {k: v.detach() for k, v in out.items()}, adapter.B.grad.clone()

    full, full_grad = run()
    widths = []
    hf_layers[2].register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2])),
        with_kwargs=True)
    with backend.reusing_prefix(2):
        cached, grad = run()
    assert widths[-2:] == [(1, 9), (4, 13)]  # 9 shared tokens (3 are read from the shortest row), then the rest
    for name in streams:
        assert full[name].shape == (4, 3, 64)
        torch.testing.assert_close(cached[name], full[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nnsight", "transformer_lens"])
def test_logits_at_the_last_positions_are_the_full_logits_there(tmp_path, kind):
    backend, _ = backend_over(kind, tmp_path)
    batch = backend.batch(backend.tokenize(sentences("sad", 2) + ["the cat sat"]))
    adapter = LowRank(64, 4)
    torch.nn.init.normal_(adapter.A)
    torch.nn.init.normal_(adapter.B, std=0.1)
    with torch.no_grad():
        full = backend.logits(batch, [("blocks.1.hook_resid_post", adapter)])
        last = backend.logits(batch, [("blocks.1.hook_resid_post", adapter)], last=3)
    assert last.shape == (3, 3, full.shape[-1])
    torch.testing.assert_close(last, full[:, -3:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["nnsight", "transformer_lens"])
@pytest.mark.parametrize("prefix", [0, 2])
def test_reading_the_last_block_runs_neither_the_final_norm_nor_the_lm_head(tmp_path, kind, prefix):
    """The read ends with the last stream (the LM head is 8 blocks' worth of arithmetic on SmolLM2)."""
    backend, hf_layers = backend_over(kind, tmp_path)
    hf = backend.module if kind == "nnsight" else backend.model.original_model
    ran = []
    for module in (hf.model.norm, hf.lm_head, hf_layers[3]):
        module.register_forward_hook(lambda module, *a: ran.append(module))
    batch = backend.batch(backend.tokenize(sentences("sad", 2)))
    with backend.reusing_prefix(prefix), torch.no_grad():
        out = backend.read(batch, ["blocks.3.hook_resid_post", "blocks.2.hook_resid_post"])
        reference = backend.logits(batch)
    assert ran[0] is hf_layers[3] and ran.count(hf.lm_head) == 1  # once: the logits call
    assert out["blocks.3.hook_resid_post"].shape == (*batch.input_ids.shape, 64)
    assert reference.shape[-1] == hf.lm_head.out_features


@pytest.mark.parametrize("kind", ["nnsight", "transformer_lens"])
def test_an_edit_with_the_cached_prefix_is_the_edit_without_it(tmp_path, concept, monkeypatch, kind):
    backend, _ = backend_over(kind, tmp_path)
    run = dict(at=[2], read=[3], batch_size=8, stop_band=(0.0, 0.01), lr=1e-2, reply_tokens=2, **FAST)
    cached = edit(backend.model, concept, **run)
    used = []

    @contextmanager
    def no_reuse(self, start):
        used.append(start)
        yield False

    monkeypatch.setattr(Backend, "reusing_prefix", no_reuse)
    assert_same_edit(cached, edit(backend.model, concept, **run))
    assert used == [2]  # the edit asked for blocks 0-1 to be cached, and this run refused
