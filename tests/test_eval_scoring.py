"""Scoring modes on tiny models: rank's shared-prefix, packed log-likelihoods against a plain forward, the packing
itself, answer parsing, and both modes agreeing on a model whose answer is forced."""

from __future__ import annotations

import pytest
import torch

from coin_ds.data.synthetic import TASKS, generate_eval_records
from coin_ds.eval import scoring
from coin_ds.eval.scoring import (
    generate_outputs,
    generate_predict,
    last_token_states,
    pack_rows,
    parse_answer,
    rank_predict,
    rank_scores,
    rank_scores_groups,
)
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


@pytest.mark.parametrize("row_tokens, batch_size", [(8, 2), (64, 64)])  # many rows, forwards, split segments; one
def test_grouped_packed_scores_equal_plain_forward(model, tok, monkeypatch, row_tokens, batch_size):
    monkeypatch.setattr(scoring, "ROW_TOKENS", row_tokens)
    inputs = ["Great film.", "The plot was not dull, but the cast was really bad.", "ok", "A fun movie.", "Meh."]
    multi = ["not_entailment", "entailment", "positive"]
    assert len(tok("not_entailment", add_special_tokens=False)["input_ids"]) > 1
    groups = [
        ([render_prompt("coin", TASKS["sentiment"].templates[0], x) for x in inputs], ["positive", "negative"]),
        ([render_prompt("alpaca", TASKS["compare"].templates[1], x) for x in inputs[:3]], multi),
        (["Say 'even' or 'odd': 12", "Number? 7"], ["even", "odd"]),  # only the BOS token in common
        ([render_prompt("coin", TASKS["parity"].templates[0], "3")], ["even", "odd"]),  # alone: all but one token shared
        ([], ["even", "odd"]),
    ]
    got = rank_scores_groups(model, tok, groups, batch_size=batch_size)
    for (prompts, words), scores in zip(groups, got):
        want = torch.tensor([[reference_logprob(model, tok, p, w) for w in words] for p in prompts])
        assert scores.shape == (len(prompts), len(words))
        torch.testing.assert_close(scores, want.reshape(scores.shape), atol=1e-4, rtol=1e-4)


def test_pack_rows_layout():
    suffixes = [[11, 12, 13], [21, 22], [31, 32, 33, 34], [41]]
    groups = [0, 0, 1, 1]
    labels = [[[7], [8]], [[5, 6], [9]]]  # group 1 has a two-token label word: one branch token per prompt
    prefix_lens = [3, 5]
    packed = pack_rows(suffixes, groups, labels, prefix_lens, pad_id=0, row_tokens=6)
    rows = packed.input_ids.tolist()
    assert packed.row_group.tolist() == [0, 1, 1]  # groups never share a row; group 1 does not fit in one row
    assert rows[0][:5] == [11, 12, 13, 21, 22] and rows[1][:5] == [31, 32, 33, 34, 5] and rows[2][:2] == [41, 5]
    assert packed.position_ids[0, :5].tolist() == [3, 4, 5, 3, 4]
    assert packed.position_ids[1, :5].tolist() == [5, 6, 7, 8, 9]  # the branch token sits right after its prompt
    m = packed.mask[:, 0]
    width = packed.input_ids.shape[1]
    assert m[0, :, :3].all() and not m[0, :, 3:5].any()  # group 0's prefix is 3 long: columns 3, 4 are not its own
    assert m[1, :5, :5].all()  # group 1 sees its whole prefix
    local = m[0, :, 5:]
    assert local[4].tolist()[:5] == [False, False, False, True, True]  # prompt 1's last token: own tokens only
    assert local[2].tolist()[:3] == [True, True, True] and not local[2, 3:].any()
    # the reads: group 0 reads both one-token words at each prompt's last token
    reads = sorted(zip(packed.prompt.tolist(), packed.label.tolist(), packed.read_row.tolist(),
                       packed.read_pos.tolist(), packed.target.tolist()))
    assert reads[:4] == [(0, 0, 0, 2, 7), (0, 1, 0, 2, 8), (1, 0, 0, 4, 7), (1, 1, 0, 4, 8)]
    # group 1, prompt 2: the first token of [5, 6] at its last token, the second at the branch token; [9] at the last
    assert [r for r in reads if r[0] == 2] == [(2, 0, 1, 3, 5), (2, 0, 1, 4, 6), (2, 1, 1, 3, 9)]
    assert packed.mask.shape == (3, 1, width, 5 + width)
    # padding attends to nothing of the packed tokens but itself, so no softmax row is empty even without a prefix
    pad_at = (packed.input_ids[2] == 0).nonzero()[:, 0]
    assert len(pad_at) == 3 and all(m[2, i, 5:].nonzero()[:, 0].tolist() == [i] for i in pad_at.tolist())
    with pytest.raises(ValueError, match="at least one token"):
        pack_rows([[1], []], [0, 0], [[[7]]], [2], pad_id=0)


def echo(tok):
    """A tiny model whose next token is the last input token: its layers add nothing and its head is the embedding."""
    model = build_model(tok, hidden_size=64, layers=2, heads=2).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    return model


def test_generate_outputs_keep_the_prompts_order(tok):
    model = echo(tok)
    prompts = ["a much longer review than the others, with many words: great", "ok", "fine film", "bad"]
    alone = [generate_outputs(model, tok, [p], batch_size=1, max_new_tokens=2)[0] for p in prompts]
    assert len(set(alone)) == len(prompts)  # the outputs tell the prompts apart
    assert generate_outputs(model, tok, prompts, batch_size=3, max_new_tokens=2) == alone


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
