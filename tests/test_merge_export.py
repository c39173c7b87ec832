"""Edit.merge_into and Edit.to_peft: hook-pair LoRAs folded into weights exactly; everything else refused."""

import copy

import pytest
import torch
from nnsight import TransformersModel
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM

from are_lens import Edit
from are_lens.adapters import LowRank, lora_pair
from are_lens.backends import backend_for
from are_lens.backends.base import left_pad
from conftest import random_llama

TEXT = "once upon a time the cat sat on the mat and was very happy"


@pytest.fixture
def fresh(tmp_path):
    """A random Llama of its own (merging changes it): the bridge, and its weights saved for HF/nnsight."""
    folder = tmp_path / "model"
    return random_llama(folder), folder


def lora_edit(model, layers=(1, 2), rank=4, scale=1.5):
    backend = backend_for(model)
    torch.manual_seed(3)
    interventions = []
    for layer in layers:
        interventions += lora_pair(128, 64, rank, f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out")
    for _, adapter in interventions[1::2]:
        with torch.no_grad():
            adapter.B.normal_(0.0, 0.3)
        adapter.scale = scale
    return Edit(interventions, fingerprint=backend.fingerprint())


def tokens(model):
    return model.tokenizer(TEXT, return_tensors="pt").input_ids


def test_merge_into_bridge_matches_the_hooked_edit(fresh):
    bridge, _ = fresh
    edit = lora_edit(bridge)
    with torch.no_grad(), edit.applied(bridge):
        want = bridge(tokens(bridge))
    with torch.no_grad():
        base = bridge(tokens(bridge))
    assert edit.merge_into(bridge) is bridge
    with torch.no_grad():
        got = bridge(tokens(bridge))
    assert not torch.allclose(base, want, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="not the base model .*weights_sha256"):  # merged: no double edit
        with edit.applied(bridge):
            pass


def test_merge_into_nnsight_and_to_peft_match(fresh, tmp_path):
    bridge, folder = fresh
    edit = lora_edit(bridge)
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    batch = left_pad([tok(TEXT).input_ids], 3)
    with torch.no_grad():
        want = backend_for(bridge).logits(batch, edit.interventions)
    model = TransformersModel(copy.deepcopy(hf), tokenizer=tok)
    edit.merge_into(model)
    with torch.no_grad():
        torch.testing.assert_close(backend_for(model).logits(batch), want, atol=1e-4, rtol=1e-4)

    path = edit.to_peft(tmp_path / "peft")
    assert {p.name for p in path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(path)).eval()
    with torch.no_grad():
        got = peft_model(input_ids=batch.input_ids).logits
        base = hf(input_ids=batch.input_ids).logits
    assert not torch.allclose(base, want, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_merge_checks_everything_before_changing_anything(fresh):
    bridge, _ = fresh
    edit = lora_edit(bridge)
    steering = Edit([("blocks.0.hook_resid_post", LowRank(64, 2))], fingerprint=edit.fingerprint)
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    with pytest.raises(ValueError, match="lowrank adapter at 'blocks.0.hook_resid_post' cannot be merged .*residual"):
        (edit + steering).merge_into(bridge)
    assert all(torch.equal(v, bridge.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("architecture, words", [
    ("Gemma2ForCausalLM", "cannot merge exactly on the gemma family.*post_feedforward_layernorm"),
    ("OPTForCausalLM", "not in the family table"),
])
def test_unmergeable_families_are_refused(random_bridge, tmp_path, architecture, words):
    edit = lora_edit(random_bridge)
    edit.fingerprint = {**edit.fingerprint, "architecture": architecture}
    with pytest.raises(ValueError, match=words):
        edit.to_peft(tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_lora_on_other_hooks_is_refused(random_bridge, tmp_path):
    edit = Edit(lora_pair(64, 64, 2, "blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"),
                fingerprint=backend_for(random_bridge).fingerprint())
    with pytest.raises(ValueError, match="does not bracket one linear map"):
        edit.to_peft(tmp_path / "peft")


def test_merged_weight_lands_on_the_weights_device():
    """An edit loaded on CPU merges into a model on another device (the GPU in practice; `meta` here)."""
    (_, _), (_, writer) = lora_pair(6, 4, 2, "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out")
    with torch.no_grad():
        writer.B.normal_()
    weight = torch.zeros(4, 6)
    assert torch.equal(writer.merged_weight(weight), writer.scale * writer.B @ writer.A)
    assert writer.merged_weight(weight.to("meta")).device.type == "meta"
