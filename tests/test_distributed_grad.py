"""Two real gloo processes: with global negatives, the rank-averaged gradient (what DeepSpeed applies) equals the
gradient of one process computing the same COIN loss on the concatenated global batch (SPEC §1)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coin_ds import distributed as D
from coin_ds.data.batching import ViewEncoder, collate, encode_triples
from coin_ds.data.synthetic import generate_records
from coin_ds.data.triples import build_triples
from coin_ds.loss import LossSettings, coin_loss
from coin_ds.modeling import CoinForward
from coin_ds.tiny import build_model, build_tokenizer

N_PER_RANK = 3


def _batch_and_model():
    tok = build_tokenizer()
    triples, _ = build_triples(generate_records(20, seed=1), seed=1)
    encoded, _ = encode_triples(triples[: 2 * N_PER_RANK], ViewEncoder(tok, "alpaca", 256))
    model = CoinForward(build_model(tok, hidden_size=32, layers=1, heads=2, seed=3))
    return tok, encoded, model


def _grads(model, batch, settings, **dist_kwargs):
    model.zero_grad()
    hidden, logits, targets, rows = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    out = coin_loss(hidden, batch["attention_mask"], logits, targets, rows, batch["n_pairs"], settings, **dist_kwargs)
    out.loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), out


def _worker(rank: int, world: int, port: int, result_file: str, negatives: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    settings = LossSettings(negatives=negatives, hard_negatives=True, symmetric=True)
    tok, encoded, model = _batch_and_model()
    local = collate(encoded[rank * N_PER_RANK:(rank + 1) * N_PER_RANK], tok.pad_token_id)
    g, out = _grads(model, local, settings, rank=rank, world_size=world, gather=D.gather_with_grad,
                    reduce_sum=D.reduce_sum)
    dist.all_reduce(g)
    g /= world  # DeepSpeed averages gradients over data-parallel ranks
    if rank == 0:
        _, _, ref_model = _batch_and_model()
        ref_g, ref = _grads(ref_model, collate(encoded, tok.pad_token_id), settings)
        result = {"max_abs_diff": float((g - ref_g).abs().max()), "grad_norm": float(ref_g.norm()),
                  "l_gen": [out.l_gen, ref.l_gen], "l_ctr": [out.l_ctr, ref.l_ctr], "w": [out.weight, ref.weight]}
        with open(result_file, "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_global_negatives_equal_one_process(tmp_path):
    result_file = str(tmp_path / "result.json")
    mp.spawn(_worker, args=(2, _free_port(), result_file, "global"), nprocs=2, join=True)
    r = json.loads(open(result_file).read())
    assert r["l_gen"][0] == pytest.approx(r["l_gen"][1], rel=1e-5)
    assert r["l_ctr"][0] == pytest.approx(r["l_ctr"][1], rel=1e-5)
    assert r["w"][0] == pytest.approx(r["w"][1], rel=1e-5)
    assert r["grad_norm"] > 0
    assert r["max_abs_diff"] < 1e-5 * max(1.0, r["grad_norm"]), r


def test_two_ranks_local_negatives_differ_from_one_process(tmp_path):
    """The control: with local negatives the ranks see fewer candidates, so the losses must differ — this is what
    makes the test above able to fail."""
    result_file = str(tmp_path / "result.json")
    mp.spawn(_worker, args=(2, _free_port(), result_file, "local"), nprocs=2, join=True)
    r = json.loads(open(result_file).read())
    assert r["l_gen"][0] == pytest.approx(r["l_gen"][1], rel=1e-5)
    assert r["l_ctr"][0] != pytest.approx(r["l_ctr"][1], rel=1e-3)
