"""checkpoint_dir=: a run killed with SIGKILL resumes to the same edit; other runs' checkpoints are refused;
NaN losses stop with a NumericsError and leave the last complete checkpoint in place."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from are_lens import Concept, edit, rounds
from are_lens.rounds import NumericsError
from conftest import sentences

KW = dict(at=[1], read=[2, 3], rounds=3, steps_per_round=4, reply_tokens=2, d_epochs=5, seed=0, progress=False,
          stop_band=(0.001, 0.002))  # held-out accuracies are k/6: never inside the band, every round trains
TESTS = Path(__file__).resolve().parent
CHILD = f"""
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, {str(TESTS)!r})
from conftest import random_llama, sentences
from are_lens import Concept, edit, rounds

phase = rounds.matched_phase
def slowed(*args, **kwargs):  # a slow round, so that the kill lands mid-run
    time.sleep(1.0)
    return phase(*args, **kwargs)
rounds.matched_phase = slowed
model = random_llama(Path(sys.argv[1]))
edit(model, Concept(sentences("sad", 16), sentences("happy", 16)), checkpoint_dir=sys.argv[2], **{KW!r})
"""


@pytest.fixture(scope="module")
def concept():
    return Concept(sentences("sad", 16), sentences("happy", 16))


@pytest.fixture(scope="module")
def uninterrupted(random_bridge, concept):
    return edit(random_bridge, concept, **KW)


def same_edit(a, b):
    for (name_a, x), (name_b, y) in zip(a.interventions, b.interventions, strict=True):
        assert name_a == name_b
        for p, q in zip(x.state_dict().values(), y.state_dict().values(), strict=True):
            assert torch.equal(p, q)
    untimed = [[{k: v for k, v in r.items() if not k.endswith("seconds")} for r in e.history] for e in (a, b)]
    assert untimed[0] == untimed[1]


def test_sigkill_then_resume_gives_the_uninterrupted_edit(random_bridge, concept, uninterrupted, tmp_path):
    folder = tmp_path / "ckpt"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "model"), str(folder)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (folder / "checkpoint.json").exists():
        if child.poll() is not None:
            pytest.fail(f"the child run ended early: {child.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    saved = json.loads((folder / "checkpoint.json").read_text())
    assert saved["next_round"] < KW["rounds"] + 1  # killed before the end
    resumed = edit(random_bridge, concept, checkpoint_dir=folder, **KW)
    same_edit(resumed, uninterrupted)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-3.safetensors", "checkpoint.json"]


def test_a_finished_checkpoint_returns_the_edit_without_training(random_bridge, concept, uninterrupted, tmp_path,
                                                                 monkeypatch):
    edit(random_bridge, concept, checkpoint_dir=tmp_path, **KW)
    monkeypatch.setattr(rounds, "extract", lambda *a, **k: pytest.fail("a finished run trained again"))
    same_edit(edit(random_bridge, concept, checkpoint_dir=tmp_path, **KW), uninterrupted)


def test_paper_schedule_resumes_too(random_bridge, concept, tmp_path, monkeypatch):
    kw = dict(KW, schedule="paper", reply_tokens=0)
    whole = edit(random_bridge, concept, **kw)
    calls = {"n": 0}
    phase = rounds.paper_phase

    def dies_in_round_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return phase(*args, **kwargs)

    monkeypatch.setattr(rounds, "paper_phase", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        edit(random_bridge, concept, checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(rounds, "paper_phase", phase)
    same_edit(edit(random_bridge, concept, checkpoint_dir=tmp_path, **kw), whole)


@pytest.mark.parametrize("change, words", [
    (dict(rounds=4), r"config\.rounds: checkpoint has 3, this run has 4"),
    (dict(lr=1e-2), r"config\.lr"),
    (dict(at=[0]), r"config\.at"),
    ("concept", r"concept: checkpoint has"),
])
def test_checkpoint_of_another_run_is_refused(random_bridge, concept, tmp_path, change, words):
    edit(random_bridge, concept, checkpoint_dir=tmp_path, **KW)
    other = Concept(sentences("angry", 16), sentences("happy", 16)) if change == "concept" else concept
    kw = KW if change == "concept" else dict(KW, **change)
    with pytest.raises(ValueError, match="holds a checkpoint of a different run .*" + words):
        edit(random_bridge, other, checkpoint_dir=tmp_path, **kw)


def test_nan_loss_stops_with_the_round_and_phase(random_bridge, concept, tmp_path, monkeypatch):
    phase = rounds.matched_phase
    calls = {"n": 0}

    def poisoned_in_round_1(backend, rows, read, interventions, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                interventions[0][1].B.fill_(float("nan"))
        return phase(backend, rows, read, interventions, *args, **kwargs)

    monkeypatch.setattr(rounds, "matched_phase", poisoned_in_round_1)
    with pytest.raises(NumericsError, match="round 1, adapter phase: the loss is nan"):
        edit(random_bridge, concept, checkpoint_dir=tmp_path, **KW)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["next_round"] == 1  # round 0 kept


def test_infinite_learning_rate_is_caught(random_bridge, concept):
    with pytest.raises(NumericsError, match="round 0, adapter phase"):
        edit(random_bridge, concept, **dict(KW, lr=float("inf")))


@pytest.mark.parametrize("target, phase", [("fresh_accuracy", "discriminator"),
                                           ("matched_phase", "warm discriminator")])
def test_nan_in_other_phases_is_named(random_bridge, concept, monkeypatch, target, phase):
    original = getattr(rounds, target)

    def nan_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        if target == "fresh_accuracy":
            return out[0], float("nan"), out[2]
        return {**out, "warm_d_loss": float("inf")}

    monkeypatch.setattr(rounds, target, nan_loss)
    with pytest.raises(NumericsError, match=f"round 0, {phase} phase"):
        edit(random_bridge, concept, **KW)
