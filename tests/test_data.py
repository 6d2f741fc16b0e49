"""Records, triples, the sampler and the collator."""

from __future__ import annotations

import json

import pytest

from coin_ds.data.batching import IGNORE, TripleSampler, ViewEncoder, collate, encode_triples
from coin_ds.data.records import Record, RecordError, load_records
from coin_ds.data.synthetic import TASKS, generate_eval_records, generate_records
from coin_ds.data.triples import build_triples, split_heldout
from coin_ds.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_synthetic_tasks_are_deterministic_and_well_formed():
    a, b = generate_records(30, seed=5), generate_records(30, seed=5)
    assert a == b and a != generate_records(30, seed=6)
    assert len(TASKS) >= 4
    for task in TASKS.values():
        assert len(task.templates) >= 5
        for t in task.templates:  # every template names every label word, so a swap keeps the task
            assert all(w in t for w in task.label_words), (task.name, t)
    for r in a:
        assert r.output in TASKS[r.task].label_words
        assert r.instruction not in r.paraphrases and len(r.paraphrases) == len(TASKS[r.task].templates) - 1


def test_eval_records_avoid_training_inputs():
    train = generate_records(50, seed=0, tasks=["parity", "compare"])
    seen = {(r.task, r.input) for r in train}
    ev = generate_eval_records(40, seed=0, tasks=["parity", "compare"], exclude_inputs=seen)
    assert len(ev) == 80 and not [e for e in ev if (e["task"], e["input"]) in seen]


def test_load_records_validates_with_file_line_field(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"task": "t", "instruction": "i", "input": "x", "output": "y"}) + "\n\n"
                 + json.dumps({"task": "t", "instruction": "i", "input": "x"}) + "\n")
    with pytest.raises(RecordError) as e:
        load_records(p)
    assert e.value.line == 3 and e.value.field == "output" and str(p) in str(e.value)


def test_triples_hard_negative_differs_in_input_and_output():
    records = generate_records(40, seed=2)
    triples, report = build_triples(records, seed=2)
    assert report.triples == len(triples) == len(records)
    for t in triples:
        assert t.neg.instruction == t.orig.instruction  # same instruction, another instance
        assert t.neg.input != t.orig.input and t.neg.output != t.orig.output
        assert t.para.instruction != t.orig.instruction and t.para.input == t.orig.input
    assert build_triples(records, seed=2)[0] == triples


def test_record_without_negative_is_counted_never_self_paired():
    records = [Record("a", "Say yes or no.", "x1", "yes", ["Answer yes or no."]),
               Record("a", "Say yes or no.", "x2", "no", ["Answer yes or no."]),
               Record("lonely", "Only one.", "x", "y", ["Just one."]),
               Record("same", "Same out.", "x1", "y", ["p"]), Record("same", "Same out.", "x2", "y", ["p"]),
               Record("nopara", "Only wording.", "x1", "y1"), Record("nopara", "Only wording.", "x2", "y2")]
    triples, report = build_triples(records, seed=0)
    assert len(triples) == 2
    assert sum(report.skipped.values()) == 5
    assert any("no hard negative" in k and v == 3 for k, v in report.skipped.items())
    assert any("no positive" in k and v == 2 for k, v in report.skipped.items())
    assert all(t.orig.input != t.neg.input for t in triples)
    assert any("skipped 3" in line for line in report.lines())


def test_explicit_negatives_take_precedence():
    records = generate_records(10, seed=0, tasks=["parity"])
    j = next(k for k in range(1, 10) if records[k].output != records[0].output)
    triples, _ = build_triples(records[:1] + [records[j]], seed=0, explicit_negatives={0: 1})
    assert len(triples) == 1 and triples[0].neg.input == records[j].input


def test_heldout_split_is_disjoint():
    triples, _ = build_triples(generate_records(20, seed=0), seed=0)
    train, held = split_heldout(triples, 10, seed=0)
    assert len(held) == 10 and len(train) + len(held) == len(triples)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_sampler_shards_without_duplicates_and_resumes(group_by_length):
    lengths = [(i * 7) % 23 for i in range(50)]
    samplers = [TripleSampler(lengths, 4, r, 3, seed=1, group_by_length=group_by_length) for r in range(3)]
    assert samplers[0].batches_per_epoch == 4 and samplers[0].dropped_per_epoch == 2
    seen = []
    for _ in range(samplers[0].batches_per_epoch):
        batches = [s.next_batch() for s in samplers]
        assert all(len(b) == 4 for b in batches)
        seen += [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 48  # no triple twice in an epoch, none shared across ranks
    # resume mid-epoch: a fresh sampler with the saved state continues identically
    a = TripleSampler(lengths, 4, 1, 3, seed=1, group_by_length=group_by_length)
    for _ in range(6):
        a.next_batch()
    b = TripleSampler(lengths, 4, 1, 3, seed=1, group_by_length=group_by_length)
    b.load_state_dict(a.state_dict())
    assert [a.next_batch() for _ in range(5)] == [b.next_batch() for _ in range(5)]


def test_sampler_rejects_too_little_data():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        TripleSampler([1, 2, 3], 2, 0, 2, seed=0)


def test_collate_keeps_triples_masks_prompts_and_negatives(tok):
    triples, _ = build_triples(generate_records(5, seed=0), seed=0)
    enc, _ = encode_triples(triples[:3], ViewEncoder(tok, "alpaca", 256))
    for side in ("right", "left"):
        b = collate(enc, tok.pad_token_id, side)
        assert b["input_ids"].shape[0] == 9 and b["n_pairs"] == 3
        labels, mask = b["labels"], b["attention_mask"]
        assert (labels[6:] == IGNORE).all()  # negatives carry no generation loss
        for i, e in enumerate([t.orig for t in enc] + [t.para for t in enc]):
            got = labels[i][labels[i] != IGNORE].tolist()
            assert got == e.input_ids[e.n_prompt:]  # exactly the output tokens
            assert tok.decode(got).strip() == [t.orig.output for t in triples[:3]][i % 3]
        if side == "left":
            assert (mask[:, -1] == 1).all()
        else:
            assert (mask[:, 0] == 1).all()


def test_truncation_cuts_the_input_never_the_output(tok):
    from coin_ds.data.triples import View

    enc = ViewEncoder(tok, "coin", max_length=40)
    view = View("Is the following number 'even' or 'odd'?", " ".join(["12345"] * 60), "even")
    e = enc.encode(view)
    assert len(e.input_ids) <= 40 and tok.decode(e.input_ids[e.n_prompt:]) == "even"
    assert enc.truncated == 1
    from coin_ds.data.batching import TooLong

    with pytest.raises(TooLong, match="max_length"):
        ViewEncoder(tok, "coin", max_length=8).encode(View("A long instruction " * 5, "x", "even"))
