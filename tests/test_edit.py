"""edit() on a random-weight Llama: mechanics, model hygiene, artifacts, determinism, bad input."""

import pytest
import torch
from transformer_lens.hook_points import HookPoint

from are_lens import Concept, Edit, edit, rounds
from are_lens.backends import backend_for
from conftest import sentences

FAST = dict(rounds=2, steps_per_round=4, reply_tokens=2, d_epochs=5, progress=False)


@pytest.fixture(scope="module")
def concept():
    return Concept(sentences("sad", 16), sentences("happy", 16))


@pytest.fixture(scope="module")
def trained(random_bridge, concept):
    return edit(random_bridge, concept, at=[1], read=[2, 3], **FAST)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def hooks_left(model):
    """Hooks on TransformerLens hook points (the bridge adds its own pre-hooks to norms on first use)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()
               if isinstance(m, HookPoint))


def logits(model, text="once upon a time the cat sat"):
    tokens = model.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(tokens)


def test_history_records_every_round(trained):
    assert [r["round"] for r in trained.history] == [0, 1, 2]
    for record in trained.history:
        assert 0.0 <= record["fresh_d_accuracy"] <= 1.0
        assert record["d_loss"] >= 0 and record["seconds"] > 0
    assert all(r["adapter_loss"] is not None for r in trained.history[:-1])
    assert all(0 < r["adapter_seconds"] < r["seconds"] for r in trained.history[:-1])  # steps within the round
    assert trained.history[-1]["adapter_loss"] is None  # the last round only measures
    assert trained.history[-1]["adapter_seconds"] is None
    assert trained.hooks == ["blocks.1.hook_resid_post"]
    assert trained.config["read"] == ["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]


def test_model_is_handed_back_unchanged(random_bridge, concept):
    random_bridge.train()
    before, flags = state(random_bridge), [p.requires_grad for p in random_bridge.parameters()]
    edit(random_bridge, concept, at=[0], read=[1], **FAST)
    after = state(random_bridge)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in random_bridge.parameters()] == flags
    assert random_bridge.training
    assert hooks_left(random_bridge) == 0
    random_bridge.eval()


def test_applied_changes_logits_and_always_removes_its_hooks(random_bridge, trained):
    base = logits(random_bridge)
    with trained.applied(random_bridge):
        edited = logits(random_bridge)
    assert not torch.allclose(base, edited)
    assert torch.equal(logits(random_bridge), base)
    with pytest.raises(RuntimeError, match="boom"):
        with trained.applied(random_bridge):
            raise RuntimeError("boom")
    assert hooks_left(random_bridge) == 0
    assert torch.equal(logits(random_bridge), base)


def test_scaled_zero_is_the_base_model(random_bridge, trained):
    base = logits(random_bridge)
    with trained.scaled(0.0).applied(random_bridge):
        assert torch.equal(logits(random_bridge), base)


def test_save_load_round_trip(tmp_path, random_bridge, trained):
    trained.save(tmp_path / "e")
    loaded = Edit.load(tmp_path / "e")
    assert loaded.hooks == trained.hooks and loaded.history == trained.history
    assert loaded.fingerprint == trained.fingerprint and loaded.config["at"] == trained.config["at"]
    with trained.applied(random_bridge):
        want = logits(random_bridge)
    with loaded.applied(random_bridge):
        assert torch.equal(logits(random_bridge), want)
    assert not list(tmp_path.glob("e/*.pt")) and not list(tmp_path.glob("e/*.pkl"))


def test_same_seed_same_edit(random_bridge, concept, trained):
    again = edit(random_bridge, concept, at=[1], read=[2, 3], **FAST)
    for (_, a), (_, b) in zip(trained.interventions, again.interventions):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    assert [r["fresh_d_accuracy"] for r in again.history] == [r["fresh_d_accuracy"] for r in trained.history]


def test_paper_schedule_trains_against_fresh_discriminators(random_bridge, concept):
    result = edit(random_bridge, concept, at=[1], read=[2], schedule="paper", rounds=2, d_epochs=5,
                  progress=False)
    assert result.config["schedule"] == "paper" and result.config["reply_tokens"] == 0
    assert result.history[0]["adapter_loss"] > 0
    assert "warm_d_loss" not in result.history[0]


def test_training_stops_after_the_last_read_layer_and_never_runs_the_head(random_bridge, concept, monkeypatch):
    measured = []  # kl_to_base, the one per-round measurement that needs the head, is left out here
    monkeypatch.setattr(rounds, "kl_to_base", lambda *args: measured.append(args) or 0.0)
    calls = {"late": 0, "head": 0}
    late = random_bridge.blocks[3].register_forward_hook(lambda *a: calls.__setitem__("late", calls["late"] + 1))
    head = random_bridge.unembed.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    try:
        edit(random_bridge, concept, at=[0], read=[1, 2], **dict(FAST, reply_tokens=0))
    finally:
        late.remove()
        head.remove()
    assert calls == {"late": 0, "head": 0} and measured


def test_any_hook_name_works(random_bridge, concept):
    result = edit(random_bridge, concept, at=["blocks.0.hook_mlp_out"], read=["blocks.1.hook_attn_out", 1],
                  adapter="bias", **FAST)
    assert result.hooks == ["blocks.0.hook_mlp_out"]


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(at=[9], read=[3]), ValueError, "at= names layer 9 .* the model has 4 layers"),
    (dict(at=["blocks.1.hook_nope"], read=[3]), ValueError, "unknown hook 'blocks.1.hook_nope'; valid names"),
    (dict(at=[2], read=[1]), ValueError, "read= stream 'blocks.1.hook_resid_post' lies before every adapter"),
    (dict(at=[1], read=[2], rank=0), ValueError, "rank= must be an int in 1..64"),
    (dict(at=[1], read=[2], rank=65), ValueError, "rank= must be an int in 1..64"),
    (dict(at=[1], read=[2], stop_band=(0.8, 0.4)), ValueError, "stop_band= must satisfy"),
    (dict(at=[1], read=[2], stop_band=(0.4, 1.2)), ValueError, "stop_band= must satisfy"),
    (dict(at=[1], read=[2], schedule="gan"), ValueError, "schedule= must be one of"),
    (dict(at=[1], read=[2], discriminator="svm"), ValueError, r"discriminator= must be one of \('mlp', 'linear'\)"),
    (dict(at=[1], read=[2], rounds=0), ValueError, "rounds= must be ≥ 1"),
    (dict(at=[1], read=[2], lr="fast"), TypeError, "lr= must be a number"),
    (dict(at=[1], read=[2], epochs=3), TypeError, "unknown option epochs="),
    (dict(at=[1], read=[2], adapter="lora"), ValueError, "adapter= must be one of"),
    (dict(at=["blocks.1.hook_resid_mid"], read=[2]), ValueError, "does not carry a write at hook_resid_mid"),
])
def test_bad_arguments_name_themselves(random_bridge, concept, kwargs, error, words):
    with pytest.raises(error, match=words):
        edit(random_bridge, concept, **dict(FAST, **kwargs))


def test_bad_concepts_and_models(random_bridge, concept):
    with pytest.raises(TypeError, match="concept= must be an are_lens.Concept"):
        edit(random_bridge, {"source": ["a"]}, at=[1], read=[2])
    with pytest.raises(ValueError, match="target= needs at least 2 prompts"):
        edit(random_bridge, Concept(["a b", "c d"], []), at=[1], read=[2])
    with pytest.raises(TypeError, match="model= must be a TransformerLens TransformerBridge .* got torch.nn"):
        edit(torch.nn.Linear(2, 2), concept, at=[1], read=[2])


def test_hooks_that_are_not_streams_are_refused(random_bridge, concept):
    with pytest.raises(ValueError, match="hook 'blocks.1.attn.hook_pattern' carries a tensor of shape"):
        edit(random_bridge, concept, at=[0], read=["blocks.1.attn.hook_pattern"], **FAST)


def test_backend_reads_left_padded_batches_like_single_prompts(random_bridge):
    backend = backend_for(random_bridge)
    rows = backend.tokenize(["once upon a time the cat sat", "the dog"])
    both = backend.read(backend.batch(rows), ["blocks.2.hook_resid_post"])["blocks.2.hook_resid_post"]
    alone = backend.read(backend.batch(rows[1:]), ["blocks.2.hook_resid_post"])["blocks.2.hook_resid_post"]
    torch.testing.assert_close(both[1, -1], alone[0, -1], atol=1e-5, rtol=1e-5)
