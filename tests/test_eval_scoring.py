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
    model = build_model(tok, hidden_size=64, layers=2, heads=2).eval()
    with torch.no_grad():  # peaked attention: at init it is nearly uniform and would hide a wrong position or mask
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    return model


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


def assert_scores_equal_plain_forward(model, tok, groups, got):
    for (prompts, words), scores in zip(groups, got):
        want = torch.tensor([[reference_logprob(model, tok, p, w) for w in words] for p in prompts])
        assert scores.shape == (len(prompts), len(words))
        torch.testing.assert_close(scores, want.reshape(scores.shape), atol=1e-4, rtol=1e-4)


INPUTS = ["Great film.", "The plot was not dull, but the cast was really bad.", "ok", "A fun movie.", "Meh."]
MULTI = ["not_entailment", "entailment", "positive"]  # the first is several tokens: label-word branches


@pytest.mark.parametrize("row_tokens, batch_size", [(8, 2), (64, 64)])  # many rows, forwards, split segments; one
def test_grouped_packed_scores_equal_plain_forward(model, tok, monkeypatch, row_tokens, batch_size):
    monkeypatch.setattr(scoring, "ROW_TOKENS", row_tokens)
    assert len(tok("not_entailment", add_special_tokens=False)["input_ids"]) > 1
    groups = [
        ([render_prompt("coin", TASKS["sentiment"].templates[0], x) for x in INPUTS], ["positive", "negative"]),
        ([render_prompt("alpaca", TASKS["compare"].templates[1], x) for x in INPUTS[:3]], MULTI),
        (["Say 'even' or 'odd': 12", "Number? 7"], ["even", "odd"]),  # only the BOS token in common
        ([render_prompt("coin", TASKS["parity"].templates[0], "3")], ["even", "odd"]),  # alone: all but one token shared
        ([], ["even", "odd"]),
    ]
    assert_scores_equal_plain_forward(model, tok, groups, rank_scores_groups(model, tok, groups, batch_size))


def test_label_logits_without_the_normalizer(model, tok):
    """For predictions with one-token label words only the label rows of the head are needed: the scores are then the
    label tokens' logits, and the argmax is the log-probabilities' argmax."""
    words = ["positive", "negative"]
    prompts = [render_prompt("coin", TASKS["sentiment"].templates[0], x) for x in INPUTS]
    got = rank_scores_groups(model, tok, [(prompts, words)], logprobs=False)[0]
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([tok(p)["input_ids"]])).logits[0, -1, ids] for p in prompts])
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)
    assert rank_predict(model, tok, prompts, words) == [words[k] for k in rank_scores(model, tok, prompts,
                                                                                        words).argmax(1).tolist()]


def test_prefixes_with_a_common_start_run_it_once(model, tok, monkeypatch):
    """Alpaca's long header is common to every instruction: it runs once, then each instruction's own part."""
    monkeypatch.setattr(scoring, "ROW_TOKENS", 16)
    groups = [([render_prompt("alpaca", ins, x) for x in INPUTS], MULTI if i == 1 else ["positive", "negative"])
              for i, ins in enumerate(TASKS["sentiment"].templates[:3])]
    groups.append(([render_prompt("alpaca", TASKS["sentiment"].templates[0], "fine")], ["positive", "negative"]))
    calls = []
    decoder = model.get_decoder()
    forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or forward(*a, **k))
    got = rank_scores_groups(model, tok, groups, batch_size=3)
    assert calls[0][0] == 1 and calls[0][1] > 20 and calls[1][0] == len(groups)  # the header once, then the rest
    assert_scores_equal_plain_forward(model, tok, groups, got)


def test_pack_rows_layout():
    # group 0: one prompt; group 1: two, with a two-token label word (one branch token per prompt)
    suffixes, groups = [[11, 12, 13], [31, 32, 33, 34], [41]], [0, 1, 1]
    labels = [[[7], [8]], [[5, 6], [9]]]
    packed = pack_rows(suffixes, groups, labels, prefix_lens=[3, 5], pad_id=0, row_tokens=6, common=2)
    # [41, 5] does not fit after [31..34, 5], so it fills group 0's part-filled row: that row holds two groups
    assert packed.input_ids.tolist() == [[11, 12, 13, 41, 5], [31, 32, 33, 34, 5]]
    assert packed.row_groups.tolist() == [[0, 1], [1, -1]]
    assert packed.position_ids.tolist() == [[3, 4, 5, 5, 6], [5, 6, 7, 8, 9]]  # each after its own group's prefix
    m = packed.mask[:, 0]
    assert m.shape == (2, 5, 2 + 2 * 3 + 5)  # [common 2 | slot 0: 3 | slot 1: 3 | the row's 5 tokens]
    prefix = m[..., :8].int().tolist()
    assert prefix[0][0] == [1, 1, 1, 0, 0, 0, 0, 0]  # group 0: its prefix is 3 long, 1 past the common start
    assert prefix[0][3] == [1, 1, 0, 0, 0, 1, 1, 1]  # group 1 in slot 1 of row 0
    assert prefix[1][0] == [1, 1, 1, 1, 1, 0, 0, 0]  # group 1 in slot 0 of row 1
    local = m[..., 8:].int().tolist()
    assert local[0][2] == [1, 1, 1, 0, 0] and local[0][4] == [0, 0, 0, 1, 1]  # prompts never see each other
    reads = sorted(zip(packed.prompt.tolist(), packed.label.tolist(), packed.read_row.tolist(),
                       packed.read_pos.tolist(), packed.target.tolist()))
    assert reads == [(0, 0, 0, 2, 7), (0, 1, 0, 2, 8),
                     (1, 0, 1, 3, 5), (1, 0, 1, 4, 6), (1, 1, 1, 3, 9),  # [5, 6]: 5 at the last token, 6 at the branch
                     (2, 0, 0, 3, 5), (2, 0, 0, 4, 6), (2, 1, 0, 3, 9)]
    # a branch token sees its prompt and itself, not the other label word's branch
    multi = pack_rows([[1, 2]], [0], [[[5, 6], [8, 9]]], prefix_lens=[1], pad_id=0)
    assert multi.input_ids.tolist() == [[1, 2, 5, 8]] and multi.mask[0, 0, 3, 1:].int().tolist() == [1, 1, 0, 1]
    # padding sees nothing but itself, so no softmax row is empty
    padded = pack_rows([[1, 2, 3], [4]], [0, 0], [[[7]]], prefix_lens=[1], pad_id=0, row_tokens=3)
    assert padded.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert padded.mask[1, 0].int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        pack_rows([[1], []], [0, 0], [[[7]]], [2], pad_id=0)
    with pytest.raises(ValueError, match="common prefix"):
        pack_rows([[1]], [0], [[[7]]], [2], pad_id=0, common=3)


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
