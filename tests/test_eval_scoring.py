"""Scoring modes on tiny models: rank's shared-prefix log-likelihoods against a plain forward, answer parsing, and
both modes agreeing on a model whose answer is forced."""

from __future__ import annotations

import pytest
import torch

from coin_ds.data.synthetic import TASKS, generate_eval_records
from coin_ds.eval.scoring import generate_predict, last_token_states, parse_answer, rank_predict, rank_scores
from coin_ds.prompting import render_prompt
from coin_ds.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tok, hidden_size=64, layers=2, heads=2).eval()


def reference_logprob(model, tok, prompt: str, word: str) -> float:
    a = tok(prompt)["input_ids"]
    b = tok(word, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([a + b])).logits[0].float().log_softmax(-1)
    return float(sum(logp[len(a) - 1 + t, b[t]] for t in range(len(b))))


@pytest.mark.parametrize("template, words", [("coin", ["positive", "negative", "not_entailment"]),
                                             ("alpaca", ["positive", "negative", "not_entailment"]),
                                             ("coin", ["positive", "negative"])])  # one-token path
def test_rank_scores_equal_plain_forward(model, tok, template, words):
    instruction = TASKS["sentiment"].templates[0]
    inputs = ["Great film.", "The plot was not dull, but the cast was really bad.", "ok", "A fun movie."]
    prompts = [render_prompt(template, instruction, x) for x in inputs]
    assert len(tok("not_entailment", add_special_tokens=False)["input_ids"]) > 1  # the multi-token path
    got = rank_scores(model, tok, prompts, words, batch_size=3)  # 2 batches, the second one ragged
    want = torch.tensor([[reference_logprob(model, tok, p, w) for w in words] for p in prompts])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_rank_scores_without_a_shared_prefix(model, tok):
    prompts = ["Say 'even' or 'odd': 12", "Number? 7"]  # only the BOS token in common
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in ["even", "odd"])  # one-token path
    got = rank_scores(model, tok, prompts, ["even", "odd"])
    want = torch.tensor([[reference_logprob(model, tok, p, w) for w in ["even", "odd"]] for p in prompts])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("text, answer", [
    ("positive", "positive"), ("  'Negative'.", "negative"), ("**positive**", "positive"),
    ("The answer is positive", None), ("", None), ("not_entailment", "not_entailment"), ("not sure", None),
])
def test_parse_answer_is_the_label_word_the_output_starts_with(text, answer):
    assert parse_answer(text, ["positive", "negative", "not_entailment", "entailment"]) == answer


def forced(tok, word: str):
    """A tiny model whose next token is always the first token of `word`: the answer is forced."""
    token = tok(word, add_special_tokens=False)["input_ids"][0]
    model = build_model(tok, hidden_size=64, layers=2, heads=2).eval()
    head = torch.nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 10.0
    model.lm_head = head
    return model


@pytest.mark.parametrize("word", ["positive", "negative"])
def test_modes_agree_on_a_forced_model(tok, word):
    assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1
    model = forced(tok, word)
    records = generate_eval_records(6, seed=1, tasks=["sentiment"])
    prompts = [render_prompt("coin", TASKS["sentiment"].templates[2], r["input"]) for r in records]
    words = list(TASKS["sentiment"].label_words)
    ranked = rank_predict(model, tok, prompts, words, batch_size=4)
    generated, raw = generate_predict(model, tok, prompts, words, batch_size=4, max_new_tokens=3)
    assert raw == [word * 3] * len(prompts)
    assert ranked == generated == [word] * len(prompts)


def test_forced_non_label_answer_is_wrong_in_generate_mode(tok):
    model = forced(tok, "Classify")
    prompts = [render_prompt("coin", TASKS["parity"].templates[0], "12")]
    assert generate_predict(model, tok, prompts, ["even", "odd"], max_new_tokens=2)[0] == [None]


def test_last_token_states_ignore_padding(model, tok):
    seqs = [tok("short")["input_ids"], tok("a somewhat longer sequence of words")["input_ids"]]
    batched = last_token_states(model, seqs, tok.pad_token_id, batch_size=2)
    alone = torch.cat([last_token_states(model, [s], tok.pad_token_id) for s in seqs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
