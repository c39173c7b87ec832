"""Mechanics of the two schedules on a random-weight model."""

import dataclasses

import pytest
import torch

from are_lens import Concept, discriminators, edit
from are_lens.adapters import LowRank
from are_lens.backends import backend_for
from are_lens.edit import STRENGTH, _encode, _with_replies
from are_lens.rounds import (
    BaseLogProbs,
    BatchSize,
    Rows,
    check_matched_only,
    compared,
    extract,
    gap_figures,
    joined,
    kl_to_base,
    matched_phase,
    preservation_gradients,
    preset,
    teacher_replies,
)
from conftest import sentences

READ = ["blocks.2.hook_resid_post"]


@pytest.fixture()
def setup(random_bridge):
    backend = backend_for(random_bridge)
    rows = backend.tokenize(sentences("sad", 8))
    adapter = LowRank(64, 4)
    torch.nn.init.normal_(adapter.A)
    return backend, Rows(rows, rows, rows, rows), [("blocks.1.hook_resid_post", adapter)]


PLAIN = {"anchor": "edited", "mean_positions": "pooled", "pair_weight": 0.0}
"""The matched schedule with one pooled mean term and no pair term: each test turns on the term it pins."""


def phase(setup, lr=0.0, start_interventions=None, window=1, **changes):
    """One matched phase; `start` (the round-0 anchors) read under `start_interventions` (default: the edit's)."""
    backend, rows, interventions = setup
    changes = {"batch_size": len(rows.train_source), **PLAIN, **changes}
    cfg = dataclasses.replace(preset("matched"), steps_per_round=3, **changes)
    anchors = interventions if start_interventions is None else start_interventions
    start = {part: joined(extract(backend, getattr(rows, part), READ, anchors, window, 16), READ)
             for part in ("train_source", "train_target")}
    target = joined(extract(backend, rows.train_target, READ, interventions, window, 16), READ)
    warm = discriminators.make("mlp", target.shape[-1], 32, cfg.warm_dropout)
    warm.standardize_on(target[:, 0])
    before = [p.clone() for p in warm.parameters()]
    optimizer = torch.optim.Adam([p for _, a in interventions for p in a.parameters()], lr=lr)
    warm_optimizer = torch.optim.AdamW(warm.parameters(), lr=1e-3)
    with backend.frozen():
        figures = matched_phase(backend, rows, READ, interventions, warm, warm_optimizer, optimizer, start,
                                target, torch.tensor(1.0), cfg, torch.Generator().manual_seed(0))
    return figures, warm, before


def test_mean_term_is_zero_when_features_already_match(setup):
    figures, _, _ = phase(setup)  # source rows are the target rows and the adapters do not move (lr 0)
    assert figures["mean_loss"] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("metric", ["standardized", "raw"])
def test_mean_term_is_the_squared_gap_in_the_chosen_metric(setup, metric):
    backend, rows, interventions = setup
    other = backend.tokenize(sentences("happy", 8))  # source ≠ target; lr 0 keeps every step's batch the same
    figures, warm, _ = phase((backend, Rows(other, rows.train_target, other, rows.test_target), interventions),
                             mean_metric=metric)
    source, target = (joined(extract(backend, r, READ, interventions, 1, 16), READ)[:, 0]
                      for r in (other, rows.train_target))
    scale = warm.std if metric == "standardized" else 1.0  # the warm D's fixed standardisation
    expected = ((source.mean(0) - target.mean(0)) / scale).pow(2).sum()
    assert figures["mean_loss"] == pytest.approx(float(expected), rel=1e-4) and figures["mean_loss"] > 0


@pytest.mark.parametrize("positions", ["pooled", "each"])
def test_mean_term_over_a_window_pools_its_positions_or_matches_each(setup, positions):
    """A two-position window: "pooled" compares one mean over rows and positions, "each" averages the
    squared gaps of every position's own mean (which also sees gaps of opposite sign cancel in the pool)."""
    backend, _, interventions = setup
    other, rows = (backend.tokenize(sentences(kind, 8)) for kind in ("happy", "sad"))
    window = Rows(other, rows, other, rows, window=2)
    figures, warm, _ = phase((backend, window, interventions), window=2, mean_positions=positions)
    source, target = (joined(extract(backend, r, READ, interventions, 2, 16), READ) for r in (other, rows))
    gaps = (source.mean(0) - target.mean(0)) / warm.std  # one row per window position
    expected = gaps.mean(0).pow(2).sum() if positions == "pooled" else gaps.pow(2).sum(-1).mean()
    assert figures["mean_loss"] == pytest.approx(float(expected), rel=1e-4)
    assert gaps.mean(0).pow(2).sum() < gaps.pow(2).sum(-1).mean()  # the two measures differ on this window


def test_mean_term_does_not_depend_on_how_the_rows_are_batched(setup):
    """Each batch's shift is measured against the same rows' round-0 features, so the rows' own spread
    cancels: with the adapters still (lr 0) every batch of 3 gives the whole set's gap."""
    backend, rows, interventions = setup
    other = backend.tokenize(sentences("happy", 8))
    changed = (backend, Rows(other, rows.train_target, other, rows.test_target), interventions)
    whole, _, _ = phase(changed, anchor="start")
    small, _, _ = phase(changed, anchor="start", batch_size=3)
    assert small["mean_loss"] == pytest.approx(whole["mean_loss"], rel=1e-4) and whole["mean_loss"] > 0


def test_hold_term_is_the_target_rows_shift_and_zero_for_a_zero_adapter(setup):
    backend, rows, interventions = setup
    adapter = interventions[0][1]
    zero, _, _ = phase(setup, start_interventions=(), hold_weight=1.0)  # B is zero: the edit moves nothing yet
    assert zero["hold_loss"] == pytest.approx(0.0, abs=1e-10)
    torch.nn.init.normal_(adapter.B, std=0.1)
    moved, warm, _ = phase(setup, start_interventions=(), hold_weight=1.0)
    edited, start = (joined(extract(backend, rows.train_target, READ, i, 1, 16), READ)[:, 0]
                     for i in (interventions, ()))
    expected = ((edited.mean(0) - start.mean(0)) / warm.std).pow(2).sum()
    assert moved["hold_loss"] == pytest.approx(float(expected), rel=1e-4) and moved["hold_loss"] > 0
    off, _, _ = phase(setup, start_interventions=())  # the default: no hold term, no target forward
    assert off["hold_loss"] is None
    assert off["adapter_loss"] == pytest.approx(off["adversarial_loss"] + off["mean_loss"], rel=1e-5)


def test_pair_term_is_each_rows_distance_to_its_twin_and_bounds_the_mean_term(setup):
    backend, rows, interventions = setup
    same, _, _ = phase(setup, pair_weight=1.0)  # every source row is its own target twin
    assert same["pair_loss"] == pytest.approx(0.0, abs=1e-10)
    other = backend.tokenize(sentences("happy", 8))
    changed = (backend, Rows(other, rows.train_target, other, rows.test_target), interventions)
    figures, warm, _ = phase(changed, pair_weight=1.0)
    source, target = (joined(extract(backend, r, READ, interventions, 1, 16), READ)[:, 0]
                      for r in (other, rows.train_target))
    expected = ((source - target) / warm.std).pow(2).sum(-1).mean()  # row i against row i
    assert figures["pair_loss"] == pytest.approx(float(expected), rel=1e-4)
    assert figures["pair_loss"] > figures["mean_loss"] > 0  # a mean's squared gap ≤ the mean squared gap
    parts = figures["adversarial_loss"] + figures["mean_loss"] + figures["pair_loss"]
    assert figures["adapter_loss"] == pytest.approx(parts, rel=1e-5)
    assert phase(changed)[0]["pair_loss"] is None  # off at weight 0: no partners gathered


def test_gap_figures_see_an_edit_that_moves_every_prompt_alike():
    base_source, base_target = torch.zeros(4, 3), torch.ones(4, 3)
    gap = torch.ones(3)
    alike = gap_figures(base_source, base_target, base_source + gap, base_target + gap)  # both moved by the gap
    assert alike["projection"] == pytest.approx(1.0) and alike["cosine"] == pytest.approx(1.0)
    assert alike["mean_gap_left"] == pytest.approx(1.0) and alike["target_drift"] == pytest.approx(1.0)
    matched = gap_figures(base_source, base_target, base_source + gap, base_target)
    assert matched["mean_gap_left"] == pytest.approx(0.0) and matched["target_drift"] == pytest.approx(0.0)


def test_own_replies_give_each_set_its_own_teacher_forced_reply(random_bridge):
    backend = backend_for(random_bridge)
    concept = Concept(sentences("sad", 8), sentences("happy", 8))
    cfg = dataclasses.replace(preset("matched"), reply_tokens=3)
    shared = _with_replies(backend, concept, cfg, 0)
    own = _with_replies(backend, concept, dataclasses.replace(cfg, source_replies="own"), 0)
    split = concept.split(0)
    source_replies = teacher_replies(backend, _encode(backend, concept, split.train_source), 3, 16)
    assert [row[-3:] for row in shared.train_source] == [row[-3:] for row in shared.train_target]
    assert [row[-3:] for row in own.train_source] == source_replies
    assert own.train_target == shared.train_target and own.window == shared.window == 4


def test_warm_discriminator_is_updated_every_step(setup):
    _, warm, before = phase(setup)
    assert all(not torch.equal(b, a) for b, a in zip(before, warm.parameters()))


def test_adapters_move_only_under_the_matched_loss(setup):
    adapter = setup[2][0][1]
    start = adapter.B.detach().clone()
    phase(setup, lr=1e-2)
    assert not torch.equal(adapter.B, start)


def test_presets_differ_as_documented():
    paper, matched = preset("paper"), preset("matched")
    assert (paper.reply_tokens, paper.lr, paper.adapter_epochs) == (0, 1e-4, 2)
    assert (paper.anchor, paper.pair_weight) == ("edited", 0.0)  # the matched-only terms off
    assert matched.reply_tokens == 16 and matched.schedule == "matched"
    assert (matched.anchor, matched.mean_positions, matched.pair_weight) == ("start", "each", 1.0)


def test_default_pair_term_is_on_for_paired_concepts_and_dropped_for_unpaired_ones(random_bridge):
    kw = dict(at=[1], read=[2], rounds=1, steps_per_round=2, reply_tokens=2, d_epochs=2, progress=False)
    paired = edit(random_bridge, Concept(sentences("sad", 8), sentences("happy", 8)), **kw)
    assert paired.config["pair_weight"] == 1.0 and paired.history[0]["pair_loss"] > 0
    unpaired = edit(random_bridge, Concept(sentences("sad", 8), sentences("happy", 6)), **kw)
    assert unpaired.config["pair_weight"] == 0.0 and unpaired.history[0]["pair_loss"] is None
    own = edit(random_bridge, Concept(sentences("sad", 8), sentences("happy", 8)), source_replies="own", **kw)
    assert own.config["pair_weight"] == 0.0


def test_matched_history_records_why_it_converged_or_not(random_bridge):
    concept = Concept(sentences("sad", 16), sentences("happy", 16))
    result = edit(random_bridge, concept, at=[1], read=[2], rounds=2, steps_per_round=3, reply_tokens=2,
                  d_epochs=5, progress=False)
    first, last = result.history[0], result.history[-1]
    for key in ("warm_d_loss", "warm_d_margin", "mean_loss", "adversarial_loss"):
        assert key in first
    for key in ("mean_gap_left", "target_drift", "projection", "cosine", "fresh_d_accuracy_pooled", "probe_accuracy",
                "adapters"):
        assert key in last
    assert "oracle_d_accuracy" in first and first["projection"] == 0.0 and first["mean_gap_left"] == 1.0
    assert first["target_drift"] == 0.0 and first["hold_loss"] is None  # hold_weight is 0 by default
    assert set(last["adapters"]) == {"blocks.1.hook_resid_post"}
    assert result.config["strength"] == STRENGTH["matched"]
    assert all(a.scale == STRENGTH["matched"] for _, a in result.interventions)
    chosen = edit(random_bridge, concept, at=[1], read=[2], rounds=1, steps_per_round=2, reply_tokens=2,
                  d_epochs=2, strength=0.4, progress=False)
    assert chosen.config["strength"] == 0.4 and all(a.scale == 0.4 for _, a in chosen.interventions)


def test_anchored_edit_with_a_hold_term_records_it_and_moves_the_targets_less(random_bridge):
    concept = Concept(sentences("sad", 16), sentences("happy", 16))
    kw = dict(at=[1], read=[2], rounds=2, steps_per_round=4, reply_tokens=2, d_epochs=3, lr=1e-2, progress=False,
              stop_band=(0.001, 0.002))
    free = edit(random_bridge, concept, anchor="edited", **kw)
    held = edit(random_bridge, concept, anchor="start", hold_weight=5.0, **kw)
    assert held.config["anchor"] == "start" and held.history[0]["hold_loss"] > 0
    assert held.history[-1]["target_drift"] < free.history[-1]["target_drift"]
    for result, reference in ((free, "edited"), (held, "base")):  # the gap to what the edit is matched to
        first, last = result.snapshots[0], result.snapshots[max(result.snapshots)]
        target = last["target"] if reference == "edited" else first["target"]
        expected = (target.mean(0) - last["source"].mean(0)).norm() / (first["target"] - first["source"]).mean(0).norm()
        assert result.history[-1]["mean_gap_left"] == pytest.approx(float(expected), rel=1e-4)
    assert last["target"].sub(first["target"]).abs().max() > 0  # the snapshots keep the edited target rows


def test_fresh_discriminators_compare_the_target_rows_the_edit_is_matched_to():
    edited = {part: torch.full((2, 3), float(i)) for i, part in enumerate(
        ("train_source", "train_target", "test_source", "test_target"))}
    base = {part: -value for part, value in edited.items()}
    assert compared(dataclasses.replace(preset("matched"), anchor="edited"), edited, base) == edited
    anchored = compared(preset("matched"), edited, base)  # anchor="start", the default
    assert anchored["train_source"] is edited["train_source"] and anchored["test_source"] is edited["test_source"]
    assert anchored["train_target"] is base["train_target"] and anchored["test_target"] is base["test_target"]


def test_preservation_term_is_zero_for_a_zero_adapter_and_positive_once_it_moves(setup):
    backend, rows, interventions = setup
    adapter = interventions[0][1]
    base = BaseLogProbs(backend, rows.window)
    with backend.frozen():
        zero = preservation_gradients(backend, rows.train_target, interventions, rows.window, 1.0, base,
                                      BatchSize(16))
        assert float(zero) <= 1e-7 and kl_to_base(backend, rows.test_target, interventions, 1, BatchSize(16)) == 0.0
        torch.nn.init.normal_(adapter.B, std=0.1)
        adapter.zero_grad(set_to_none=True)
        whole = preservation_gradients(backend, rows.train_target, interventions, rows.window, 2.0, base,
                                       BatchSize(16))
        grad = adapter.B.grad.clone()
        adapter.zero_grad(set_to_none=True)
        split = preservation_gradients(backend, rows.train_target, interventions, rows.window, 2.0, base,
                                       BatchSize(3))  # as after an out-of-memory halving: same mean, same gradient
        held_out = kl_to_base(backend, rows.test_target, interventions, rows.window, BatchSize(16))
    assert float(whole) > 0 and grad.abs().sum() > 0
    assert float(split) == pytest.approx(float(whole), rel=1e-4) and held_out == pytest.approx(float(whole), rel=1e-4)
    torch.testing.assert_close(adapter.B.grad, grad, rtol=1e-4, atol=1e-7)


def test_preservation_adds_to_the_matched_steps_and_is_recorded(setup):
    figures, _, _ = phase(setup)
    assert figures["preserve_loss"] is None  # weight 0: not computed
    adapter = setup[2][0][1]
    torch.nn.init.normal_(adapter.B, std=0.1)
    figures, _, _ = phase(setup, preserve_weight=0.5)
    assert figures["preserve_loss"] > 0
    expected = figures["adversarial_loss"] + figures["mean_loss"] + 0.5 * figures["preserve_loss"]
    assert figures["adapter_loss"] == pytest.approx(expected, rel=1e-5)


def test_preserve_weight_zero_is_the_default_edit_and_a_positive_one_is_recorded(random_bridge):
    concept = Concept(sentences("sad", 12), sentences("happy", 12))
    kw = dict(at=[1], read=[2], rounds=1, steps_per_round=3, reply_tokens=2, d_epochs=3, progress=False,
              stop_band=(0.001, 0.002))
    default, zero = edit(random_bridge, concept, **kw), edit(random_bridge, concept, preserve_weight=0.0, **kw)
    for (_, a), (_, b) in zip(default.interventions, zero.interventions, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert default.history[0]["preserve_loss"] is None and zero.config["preserve_weight"] == 0.0
    kept = edit(random_bridge, concept, preserve_weight=2.0, **kw)
    assert kept.history[0]["preserve_loss"] > 0 and kept.config["preserve_weight"] == 2.0
    assert "preserve_loss" not in kept.history[-1]  # the last record only measures


@pytest.mark.parametrize("schedule", ["matched", "paper"])
def test_every_round_records_its_kl_to_the_base_model(random_bridge, schedule):
    concept = Concept(sentences("sad", 12), sentences("happy", 12))
    result = edit(random_bridge, concept, at=[1], read=[2], schedule=schedule, rounds=2, steps_per_round=3,
                  adapter_epochs=1, lr=1e-2, reply_tokens=2, d_epochs=3, stop_band=(0.001, 0.002), progress=False)
    kls = [record["kl_to_base"] for record in result.history]
    assert len(kls) == 3 and all(isinstance(kl, float) and kl >= 0 for kl in kls)
    assert kls[0] == 0.0 and kls[-1] > 0  # round 0 measures the zero-initialised adapter; later rounds the trained one


@pytest.mark.parametrize("value, error, words", [
    (-0.5, ValueError, "preserve_weight= must be ≥ 0; got -0.5"),
    ("strong", TypeError, "preserve_weight= must be a number; got 'strong'"),
    (True, TypeError, "preserve_weight= must be a number; got True"),
    (float("inf"), ValueError, "preserve_weight= must be a finite number ≥ 0; got inf"),
    (float("nan"), ValueError, "preserve_weight= must be a finite number ≥ 0; got nan"),
])
def test_bad_preserve_weights_name_themselves(random_bridge, value, error, words):
    with pytest.raises(error, match=words):
        edit(random_bridge, Concept(sentences("sad", 4), sentences("happy", 4)), at=[1], read=[2],
             preserve_weight=value, progress=False)


@pytest.mark.parametrize("name, value", [("preserve_weight", 0.5), ("hold_weight", 1.0), ("pair_weight", 1.0),
                                         ("anchor", "start")])
def test_matched_only_options_are_refused_by_the_paper_schedule(random_bridge, name, value):
    with pytest.raises(ValueError, match=f"{name}= is used only by schedule='matched'.* got "
                                         f"{name}={value!r} with schedule='paper'"):
        edit(random_bridge, Concept(sentences("sad", 4), sentences("happy", 4)), at=[1], read=[2],
             schedule="paper", progress=False, **{name: value})
    paper = dataclasses.replace(preset("paper"), **{name: value})
    with pytest.raises(ValueError, match=f"{name}="):
        check_matched_only(paper)
    check_matched_only(dataclasses.replace(preset("matched"), **{name: value}))
