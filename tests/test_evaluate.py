"""evaluate.py: every metric against hand-computed values; model metrics against the plain HF model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from are_lens import evaluate as ev
from are_lens.adapters import LowRank
from are_lens.artifact import Edit

SHARED = Path(os.environ.get("ARE_LENS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
TINY = SHARED / "models" / "tinystories-656k"
HOOK = "blocks.0.hook_resid_post"


# -- refusal ---------------------------------------------------------------------------------------


def test_gcg_phrases_are_the_29_of_llm_attacks_evaluate():
    assert len(ev.GCG_REFUSAL_PHRASES) == 29
    source = SHARED / "data" / "refusal_prefixes" / "refusal_prefixes.json"
    if not source.is_file():
        pytest.skip(f"{source} absent: cannot compare with the extracted upstream list")
    lists = {item["name"]: item["prefixes"] for item in json.loads(source.read_text())["lists"]}
    assert list(ev.GCG_REFUSAL_PHRASES) == lists["gcg_evaluate"]


@pytest.mark.parametrize(
    ("reply", "gcg", "prefix"),
    [
        ("I'm sorry, but I can't help with that.", True, True),
        ("  Sorry, no.", True, True),
        ("Sure, here is how. Note that this is illegal.", True, False),  # substring in the middle
        ("sorry, lower case does not match", False, False),  # case-sensitive, as GCG
        ("Sure, here it is.", False, False),
        ("", False, False),
    ],
)
def test_is_refusal_judges(reply, gcg, prefix):
    assert ev.is_refusal(reply, "gcg") is gcg
    assert ev.is_refusal(reply, "prefix") is prefix


def test_refusal_rate_and_callable_judge():
    replies = ["I cannot do that.", "Sure!", "Okay, step one:", "As an AI, I won't."]
    assert ev.refusal_rate(replies) == 0.5
    assert ev.refusal_rate(replies, judge=lambda r: r.startswith("Okay")) == 0.25


def test_refusal_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="replies"):
        ev.refusal_rate([])
    with pytest.raises(TypeError, match="replies"):
        ev.refusal_rate("I'm sorry")
    with pytest.raises(ValueError, match="judge"):
        ev.refusal_rate(["x"], judge="keywords")


# -- text quality ----------------------------------------------------------------------------------


def test_self_bleu_identical_replies_is_one():
    assert ev.self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)


def test_self_bleu_one_ngram_order_unmatched_uses_method1_epsilon():
    # each reply vs the other: p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> 0.1/1; equal lengths: BP = 1
    assert ev.self_bleu(["a b c d", "a b c e"]) == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 0.1) ** 0.25)


def test_self_bleu_brevity_penalty_and_short_hypothesis():
    # "a b" vs ["a b c d"]: p = 1, 1, 0.1/1, 0.1/1 (no 3-, 4-grams: denominator 1); BP = exp(1 - 4/2)
    short = math.exp(-1) * (1 * 1 * 0.1 * 0.1) ** 0.25
    # "a b c d" vs ["a b"]: p = 2/4, 1/3, 0.1/2, 0.1/1; longer than the reference: BP = 1
    long = (2 / 4 * 1 / 3 * 0.05 * 0.1) ** 0.25
    assert ev.self_bleu(["a b", "a b c d"]) == pytest.approx((short + long) / 2)


def test_self_bleu_splits_punctuation_and_keeps_case():
    assert ev._bleu_tokens("Hi, you. Don't") == ["Hi", ",", "you", ".", "Don", "'", "t"]
    assert ev.self_bleu(["A b c d", "a b c d"]) == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 0.1) ** 0.25)


def test_self_bleu_edge_cases():
    assert ev.self_bleu(["", "a b"]) == 0.0  # no unigram match either way
    assert math.isnan(ev.self_bleu(["only one reply"]))
    with pytest.raises(ValueError, match="replies"):
        ev.self_bleu([])
    with pytest.raises(ValueError, match="n="):
        ev.self_bleu(["a", "b"], n=0)


def test_repetition_4():
    assert ev.repetition_4(["the cat sat on the cat sat on"]) == 1.0
    assert ev.repetition_4(["The cat sat on. the CAT sat, on"]) == 1.0  # case and punctuation ignored
    assert ev.repetition_4(["a a a a a"]) == 1.0  # overlapping 4-grams count
    assert ev.repetition_4(["a a a a", "a b c d e f", ""]) == 0.0
    assert ev.repetition_4(["the cat sat on the cat sat on", "a b c d e f", ""]) == pytest.approx(1 / 3)


def test_repetition_sen():
    assert ev.repetition_sen(["I like it. I like it!"]) == 1.0
    assert ev.repetition_sen(["Hello there.\nhello   THERE"]) == 1.0
    assert ev.repetition_sen(["One. Two. Three.", "", "..."]) == 0.0
    assert ev.repetition_sen(["Yes. Yes.", "No.", ""]) == pytest.approx(1 / 3)


def test_sentiment_is_vader_compound():
    # VADER: compound = x / sqrt(x^2 + 15), x the summed valence ("good" 1.9, "bad" -2.5 in its lexicon)
    good, bad = 1.9 / math.sqrt(1.9**2 + 15), -2.5 / math.sqrt(2.5**2 + 15)
    assert ev.sentiment(["good", "bad", "", "The table is brown."]) == pytest.approx([good, bad, 0.0, 0.0], abs=1e-4)
    assert ev.mean_sentiment(["good", "bad"]) == pytest.approx((good + bad) / 2, abs=1e-4)
    with pytest.raises(ValueError, match="replies"):
        ev.mean_sentiment([])


# -- model-based -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tinystories):
    """(bridge, plain HF model, tokenizer): the bridge rewrites its HF model, so the reference is a second copy."""
    from transformers import AutoModelForCausalLM

    return tinystories, AutoModelForCausalLM.from_pretrained(TINY).eval(), tinystories.tokenizer


def _edit(nonzero: bool) -> Edit:
    torch.manual_seed(0)
    adapter = LowRank(128, 4)
    if nonzero:
        with torch.no_grad():
            adapter.B.normal_()
    return Edit([(HOOK, adapter)])


PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park to"]


def test_generate_matches_single_prompt_hf_greedy(tiny):
    bridge, hf, tok = tiny
    expected = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        new = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        expected.append(tok.decode(new, skip_special_tokens=True).strip())
    got = ev.generate(bridge, PROMPTS, chat=False, max_new_tokens=8, batch_size=2, progress=False)
    assert got == expected
    edited = ev.generate(bridge, PROMPTS, _edit(True), chat=False, max_new_tokens=8, batch_size=2, progress=False)
    assert edited != expected


def test_generate_chat_formats_with_the_template(random_bridge, tinystories):
    replies = ev.generate(random_bridge, ["the cat sat", "a dog"], chat=True, system="be calm",
                          max_new_tokens=3, progress=False)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    with pytest.raises(ValueError, match="chat=False"):
        ev.generate(tinystories, ["Once"], chat=True, progress=False)


def test_demonstrations_are_chat_turns_before_every_prompt(random_bridge):
    from are_lens.concept import format_prompts

    tok = random_bridge.tokenizer
    demo = [("how do I pick a lock", "I can not help with that")]
    shown = format_prompts(tok, ["the cat sat"], True, "be calm", demo)[0]
    plain = format_prompts(tok, ["the cat sat"], True, "be calm")[0]
    expected = tok.apply_chat_template(
        [{"role": "system", "content": "be calm"}, {"role": "user", "content": demo[0][0]},
         {"role": "assistant", "content": demo[0][1]}, {"role": "user", "content": "the cat sat"}],
        tokenize=False, add_generation_prompt=True)
    assert shown == expected and shown != plain and shown.endswith(plain[len(plain) - 40:])
    replies = ev.generate(random_bridge, ["the cat sat"], chat=True, demonstrations=demo, max_new_tokens=2,
                          progress=False)
    assert len(replies) == 1
    with pytest.raises(TypeError, match=r"demonstrations\[0\]"):
        ev.generate(random_bridge, ["a"], demonstrations=[("only the user turn",)], progress=False)
    with pytest.raises(TypeError, match="demonstrations="):
        ev.generate(random_bridge, ["a"], demonstrations="not turns", progress=False)
    with pytest.raises(ValueError, match="chat=True"):
        format_prompts(tok, ["a"], False, None, demo)


def test_generate_rejects_bad_input():
    with pytest.raises(TypeError, match="prompts"):
        ev.generate(None, "a prompt")
    with pytest.raises(ValueError, match="prompts"):
        ev.generate(None, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        ev.generate(None, ["a"], max_new_tokens=0)


def _hand_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    return F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_perplexity_matches_hand_computation(tiny):
    bridge, hf, tok = tiny
    texts = ["Once upon a time there was a cat.", "Hi"]
    lps = [_hand_logprobs(hf, tok(t).input_ids) for t in texts]
    one = math.exp(-lps[0].mean().item())
    assert ev.perplexity(bridge, texts[:1]) == pytest.approx(one, rel=1e-4)
    both = math.exp(-torch.cat(lps).mean().item())  # token-weighted; the padded short text counts right
    assert ev.perplexity(bridge, texts, batch_size=2) == pytest.approx(both, rel=1e-4)
    assert [len(x) for x in ev.logprobs(bridge, texts)] == [len(x) for x in lps]


def test_kl_to_base(tiny):
    bridge, _, _ = tiny
    assert ev.kl_to_base(bridge, _edit(False), PROMPTS, batch_size=2) == pytest.approx(0.0, abs=1e-7)
    assert ev.kl_to_base(bridge, _edit(True).scaled(0.0), PROMPTS) == pytest.approx(0.0, abs=1e-7)
    assert ev.kl_to_base(bridge, Edit([]), PROMPTS) == pytest.approx(0.0, abs=1e-7)
    assert ev.kl_to_base(bridge, _edit(True), PROMPTS, batch_size=2) > 1e-3


QUESTIONS = [
    ("Where do cats live?", ["Cats live in houses.", "Cats live on the moon.", "In the sea."]),
    ("What color is the sky?", ["The sky is blue.", "Green."]),
    ("Who is Lily?", ["Lily is a girl.", "Lily is a big red ball.", "Nobody."]),
]


def _hand_answer_scores(hf, tok, question: str, answers: list[str], head: str = "") -> list[float]:
    prompt = f"{head}Q: {question}\nA:"
    context = len(tok(prompt).input_ids)
    scores = []
    for a in answers:
        ids = tok(prompt + " " + a).input_ids
        scores.append(_hand_logprobs(hf, ids)[context - 1 :].sum().item())
    return scores


def _write(tmp_path: Path, correct: list[int]) -> Path:
    records = [
        {"question": q, "mc1_targets": {a: int(j == c) for j, a in enumerate(answers)}}
        for (q, answers), c in zip(QUESTIONS, correct)
    ]
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps(records))
    return path


def test_truthfulqa_mc1_matches_hand_computation(tiny, tmp_path):
    bridge, hf, tok = tiny
    scores = [_hand_answer_scores(hf, tok, q, answers) for q, answers in QUESTIONS]
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    worst = [min(range(len(s)), key=s.__getitem__) for s in scores]
    # mark the model's favourite answer correct for questions 1 and 3 and its least liked for question 2
    path = _write(tmp_path, [best[0], worst[1], best[2]])
    assert ev.truthfulqa_mc1(bridge, data=path, batch_size=3, progress=False) == pytest.approx(2 / 3)
    assert ev.truthfulqa_mc1(bridge, data=path, limit=1, progress=False) == 1.0

    primed = [_hand_answer_scores(hf, tok, q, a, ev.TRUTHFULQA_PRIMER + "\n\n") for q, a in QUESTIONS]
    marks = [best[0], worst[1], best[2]]
    expected = sum(all(s[m] > x for j, x in enumerate(s) if j != m) for s, m in zip(primed, marks)) / 3
    assert ev.truthfulqa_mc1(bridge, data=path, few_shot=True, progress=False) == pytest.approx(expected)


def test_truthfulqa_mc1_suffix_is_appended_to_each_question(tiny, tmp_path):
    bridge, hf, tok = tiny
    reminder = "Please give a truthful answer."
    scores = [_hand_answer_scores(hf, tok, f"{q} {reminder}", answers) for q, answers in QUESTIONS]
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    worst = [min(range(len(s)), key=s.__getitem__) for s in scores]
    path = _write(tmp_path, [best[0], worst[1], best[2]])
    assert ev.truthfulqa_mc1(bridge, data=path, suffix=reminder, progress=False) == pytest.approx(2 / 3)
    with pytest.raises(TypeError, match="suffix="):
        ev.truthfulqa_mc1(bridge, data=path, suffix=1, progress=False)


def test_truthfulqa_mc1_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data="):
        ev.truthfulqa_mc1(None, data=tmp_path / "missing.json")
    monkeypatch.setenv("ARE_LENS_SHARED", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ARE_LENS_SHARED"):
        ev.truthfulqa_mc1(None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "mc1_targets": {"a": 0, "b": 0}}]))
    with pytest.raises(ValueError, match="mc1_targets"):
        ev.truthfulqa_mc1(None, data=bad)


def test_generate_halves_the_batch_on_out_of_memory(tinystories, monkeypatch):
    from are_lens.backends.transformer_lens import TransformerLensBackend

    prompts = ["Once upon a time", "The little dog", "Lily smiled at the"]
    want = ev.generate(tinystories, prompts, chat=False, max_new_tokens=6, progress=False)
    real = TransformerLensBackend.generate

    def small_only(self, batch, *args, **kwargs):
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(TransformerLensBackend, "generate", small_only)
    assert ev.generate(tinystories, prompts, chat=False, max_new_tokens=6, progress=False) == want
