"""One test per row of docs/bad_inputs.md: every invalid input we handle, and the error it gets."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from are_lens import Concept, Edit, edit, evaluate
from are_lens.adapters import lora_pair
from are_lens.files import save_json
from are_lens.rounds import NumericsError
from conftest import SHARED, random_llama, sentences

FAST = dict(rounds=1, steps_per_round=2, reply_tokens=2, d_epochs=3, progress=False)
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
SAD, HAPPY = sentences("sad", 8), sentences("happy", 8)


@pytest.fixture(scope="module")
def trained(random_bridge):
    return edit(random_bridge, Concept(SAD, HAPPY), at=[1], read=[2], **FAST)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return random_llama(tmp_path_factory.mktemp("other"), seed=1)


@pytest.fixture
def ctx(random_bridge, trained, other_model, tmp_path):
    return SimpleNamespace(model=random_bridge, concept=Concept(SAD, HAPPY), trained=trained, other=other_model,
                           tmp=tmp_path, saved=trained.save(tmp_path / "saved"))


def run(c, concept=None, **kwargs):
    """edit() on the random model with fast settings; `kwargs` override at/read and the rest."""
    return edit(c.model, c.concept if concept is None else concept, **{"at": [1], "read": [2], **FAST, **kwargs})


def patched_meta(c, **changes):
    meta = json.loads((c.saved / "edit.json").read_text())
    save_json(c.saved / "edit.json", {**meta, **changes})
    return Edit.load(c.saved)


def mismatched_tokenizer(c, monkeypatch):
    from transformers import AutoTokenizer

    folder = SHARED / "models" / "tinystories-656k"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    monkeypatch.setattr(c.model, "tokenizer", AutoTokenizer.from_pretrained(folder))
    run(c)


def applied_to(c, model, **kwargs):
    with c.trained.applied(model, **kwargs):
        pass


def other_run_checkpoint(c):
    run(c, checkpoint_dir=c.tmp / "ckpt")
    run(c, checkpoint_dir=c.tmp / "ckpt", lr=0.5)


def gemma_peft(c):
    lora = Edit(lora_pair(128, 64, 2, "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"),
                fingerprint={**c.trained.fingerprint, "architecture": "Gemma2ForCausalLM"})
    lora.to_peft(c.tmp / "peft")


ROWS = [
    ("model-type", lambda c: edit(torch.nn.Linear(2, 2), c.concept, at=[1], read=[2]), TypeError,
     "model= must be a TransformerLens TransformerBridge .* got torch.nn"),
    ("concept-type", lambda c: edit(c.model, {"source": SAD}, at=[1], read=[2]), TypeError,
     "concept= must be an are_lens.Concept"),
    ("prompts-a-string", lambda c: Concept("a sad cat", HAPPY), TypeError, "source= must be a list of strings"),
    ("prompt-not-a-string", lambda c: Concept(["a cat", 3], HAPPY), TypeError, r"source\[1\] must be a string"),
    ("prompt-empty", lambda c: Concept(SAD, ["the sun", "  "]), ValueError, r"target\[1\] is an empty prompt"),
    ("too-few-prompts", lambda c: Concept(["the cat"], HAPPY), ValueError, "source= needs at least 2 prompts"),
    ("duplicate-prompts", lambda c: Concept(SAD + SAD[:1], HAPPY), UserWarning, "source= repeats 1 prompt"),
    ("held-out-range", lambda c: Concept(SAD, HAPPY, held_out=1.5), ValueError,
     r"held_out= must be a float in \(0, 1\)"),
    ("prompt-too-long", lambda c: run(c, Concept(["the cat " * 80, "a dog"], HAPPY)), ValueError,
     "holds a prompt of 161 tokens; the model's context is 128"),
    ("mismatched-tokenizer", mismatched_tokenizer, ValueError, "token id .* embedding has only 52 rows"),
    ("at-type", lambda c: run(c, at=1.5), TypeError, "at= expects an int, a hook name, or a sequence"),
    ("at-item-type", lambda c: run(c, at=[1, None]), TypeError, "at= items must be ints .* got None"),
    ("reversed-range", lambda c: run(c, at=range(3, 1)), ValueError, "at= is empty"),
    ("hook-twice", lambda c: run(c, read=[2, 2]), ValueError, "read= names 'blocks.2.hook_resid_post' twice"),
    ("layer-out-of-range", lambda c: run(c, at=[9]), ValueError, "at= names layer 9 .* the model has 4 layers"),
    ("unknown-hook", lambda c: run(c, at=["blocks.1.hook_nope"]), ValueError, "unknown hook 'blocks.1.hook_nope'"),
    ("read-before-adapters", lambda c: run(c, at=[2], read=[1]), ValueError, "lies before every adapter"),
    ("adapter-after-reads", lambda c: run(c, at=[1, 3], read=[2]), ValueError, "lies after every read stream"),
    ("hook-not-a-stream", lambda c: run(c, at=[0], read=["blocks.1.attn.hook_pattern"]), ValueError,
     "carries a tensor of shape"),
    ("resid-mid-write", lambda c: run(c, at=["blocks.1.hook_resid_mid"]), ValueError,
     "does not carry a write at hook_resid_mid"),
    ("rank-zero", lambda c: run(c, rank=0), ValueError, r"rank= must be an int in 1\.\.64"),
    ("rank-above-width", lambda c: run(c, rank=65), ValueError, r"rank= must be an int in 1\.\.64"),
    ("rank-type", lambda c: run(c, rank=2.5), TypeError, "rank= must be an int"),
    ("adapter-kind", lambda c: run(c, adapter="lora"), ValueError, "adapter= must be one of"),
    ("schedule", lambda c: run(c, schedule="gan"), ValueError, "schedule= must be one of"),
    ("stop-band-inverted", lambda c: run(c, stop_band=(0.8, 0.4)), ValueError, "stop_band= must satisfy"),
    ("stop-band-outside", lambda c: run(c, stop_band=(0.4, 1.2)), ValueError, "stop_band= must satisfy"),
    ("stop-band-type", lambda c: run(c, stop_band=0.5), TypeError, "stop_band= must be a pair"),
    ("unknown-option", lambda c: run(c, epochs=3), TypeError, "unknown option epochs="),
    ("option-type", lambda c: run(c, lr="fast"), TypeError, "lr= must be a number"),
    ("option-below-minimum", lambda c: run(c, rounds=0), ValueError, "rounds= must be ≥ 1"),
    ("discriminator-kind", lambda c: run(c, discriminator="svm"), ValueError,
     r"discriminator= must be one of \('mlp', 'linear'\); got 'svm'"),
    ("mean-metric-kind", lambda c: run(c, mean_metric="cosine"), ValueError,
     r"mean_metric= must be one of \('standardized', 'raw'\); got 'cosine'"),
    ("source-replies-kind", lambda c: run(c, source_replies="mine"), ValueError,
     r"source_replies= must be one of \('target', 'own'\); got 'mine'"),
    ("anchor-kind", lambda c: run(c, anchor="base"), ValueError,
     r"anchor= must be one of \('edited', 'start'\); got 'base'"),
    ("mean-positions-kind", lambda c: run(c, mean_positions="last"), ValueError,
     r"mean_positions= must be one of \('pooled', 'each'\); got 'last'"),
    ("pair-weight-unpaired", lambda c: run(c, concept=Concept(SAD, HAPPY[:6]), pair_weight=1.0), ValueError,
     "pair_weight= needs a paired concept .*; got 8 source and 6 target prompts"),
    ("pair-weight-own-replies", lambda c: run(c, pair_weight=1.0, source_replies="own"), ValueError,
     "pair_weight= compares each source row with its target twin .*source_replies='target'; got 'own'"),
    ("hold-weight-not-finite", lambda c: run(c, hold_weight=float("nan")), ValueError,
     "hold_weight= must be a finite number ≥ 0; got nan"),
    ("preserve-weight-not-finite", lambda c: run(c, preserve_weight=float("inf")), ValueError,
     "preserve_weight= must be a finite number ≥ 0; got inf"),
    ("preserve-weight-paper", lambda c: run(c, schedule="paper", preserve_weight=0.5), ValueError,
     "preserve_weight= is used only by schedule='matched'.*got preserve_weight=0.5 with schedule='paper'"),
    ("seed-type", lambda c: run(c, seed="0"), TypeError, "seed= must be an int"),
    ("strength-negative", lambda c: run(c, strength=-1.0), TypeError, "strength= must be a number ≥ 0"),
    ("nan-loss", lambda c: run(c, lr=float("inf")), NumericsError, "round 0, adapter phase: the loss is nan"),
    ("checkpoint-dir-type", lambda c: run(c, checkpoint_dir=3), TypeError, "checkpoint_dir= must be a path"),
    ("checkpoint-dir-unwritable", lambda c: run(c, checkpoint_dir="/sys/are_lens_test"), OSError,
     "checkpoint_dir= '/sys/are_lens_test' cannot be created as a folder"),
    ("checkpoint-other-run", other_run_checkpoint, ValueError,
     "holds a checkpoint of a different run .*config.lr: checkpoint has 0.001, this run has 0.5"),
    ("save-folder-unwritable", lambda c: c.trained.save(c.saved / "edit.json" / "inner"), OSError,
     "path= .* cannot be created as a folder"),
    ("load-path-type", lambda c: Edit.load(3), TypeError, "path= must be a path"),
    ("load-not-a-folder", lambda c: Edit.load(c.tmp / "nowhere"), FileNotFoundError, "is not a folder"),
    ("load-missing-json", lambda c: ((c.saved / "edit.json").unlink(), Edit.load(c.saved)), FileNotFoundError,
     r"edit\.json is missing"),
    ("load-missing-tensors", lambda c: ((c.saved / "adapters.safetensors").unlink(), Edit.load(c.saved)),
     FileNotFoundError, r"adapters\.safetensors is missing"),
    ("load-truncated-json", lambda c: ((c.saved / "edit.json").write_text("{\"format_"), Edit.load(c.saved)),
     ValueError, r"edit\.json is not valid JSON"),
    ("load-corrupt-tensors", lambda c: ((c.saved / "adapters.safetensors").write_bytes(b"junk" * 9),
                                        Edit.load(c.saved)), ValueError, "not a readable safetensors file"),
    ("load-format-version", lambda c: patched_meta(c, format_version=1), ValueError,
     r"format_version 1; this are_lens reads version 2"),
    ("load-inconsistent", lambda c: patched_meta(c, interventions=[{"hook": "x"}]), ValueError,
     "does not hold a consistent edit"),
    ("wrong-fingerprint", lambda c: applied_to(c, c.other), ValueError, "not the base model .*weights_sha256"),
    ("load-onto-wrong-model", lambda c: Edit.load(c.saved, model=c.other), ValueError, "not the base model"),
    ("force-type", lambda c: applied_to(c, c.model, force="yes"), TypeError, "force= must be a bool"),
    ("scale-type", lambda c: c.trained.scaled("x"), TypeError, "alpha= must be a number"),
    ("select-missing-hook", lambda c: c.trained.only(at=[3]), ValueError, "which this edit has no adapter at"),
    ("merge-residual-adapter", lambda c: c.trained.merge_into(c.model), ValueError,
     "lowrank adapter .* cannot be merged into the weights exactly"),
    ("peft-gemma", gemma_peft, ValueError, "cannot merge exactly on the gemma family"),
    ("demonstrations-not-pairs", lambda c: evaluate.generate(c.model, ["a"], demonstrations=[("user only",)],
                                                             progress=False), TypeError,
     r"demonstrations\[0\] must be a \(user, assistant\) pair of strings"),
    ("demonstrations-without-chat", lambda c: evaluate.generate(c.model, ["a"], chat=False, progress=False,
                                                                demonstrations=[("u", "a")]), ValueError,
     "demonstrations= are chat turns and need chat=True"),
    ("truthfulqa-suffix-type", lambda c: evaluate.truthfulqa_mc1(c.model, suffix=1), TypeError,
     "suffix= must be a string"),
]


@pytest.mark.parametrize("action, error, words", [pytest.param(*row[1:], id=row[0]) for row in ROWS])
def test_bad_input(ctx, monkeypatch, action, error, words):
    call = (lambda: action(ctx, monkeypatch)) if action is mismatched_tokenizer else (lambda: action(ctx))
    if issubclass(error, Warning):
        with pytest.warns(error, match=words):
            call()
    else:
        with pytest.raises(error, match=words):
            call()


def test_the_table_lists_every_row():
    documented = re.findall(r"^\| `([a-z-]+)` \|", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert documented == [row[0] for row in ROWS]
