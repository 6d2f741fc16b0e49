"""The benchmarks' counters (FLOPs, padding) against hand counts; no timing is asserted anywhere."""

from __future__ import annotations

import pytest
from torch import nn

from benchmarks.padding import epoch_efficiency, triple_floor
from benchmarks.step_cost import step_flops
from coin_ds.data.batching import Encoded, EncodedTriple


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_linear_params_match_the_model(kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=kv_heads)
    model = LlamaForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear))
    flops = step_flops(config, n_seqs=2, seq_len=10, logit_positions=7)
    assert flops["linear_params"] == linear
    assert flops["linear"] == 6 * linear * 20
    assert flops["attention"] == 12 * 3 * 64 * 10 * 20
    assert flops["lm_head_useful"] == 6 * 64 * 300 * 7 and flops["lm_head_all"] == 6 * 64 * 300 * 20
    assert flops["hf_equivalent"] - flops["useful"] == 6 * 64 * 300 * 13


def _triple(a: int, b: int, c: int) -> EncodedTriple:
    return EncodedTriple(*(Encoded(list(range(n)), 1) for n in (a, b, c)))


def test_padding_counts_are_token_weighted():
    train = [_triple(4, 4, 2), _triple(8, 8, 8)]
    assert triple_floor(train) == pytest.approx((10 + 24) / (12 + 24))
    # one micro-batch of both triples on one rank: 6 rows padded to 8
    assert epoch_efficiency(train, 0, micro_batch=2, world=1, group_by_length=False) == pytest.approx(34 / 48)
    # one triple per micro-batch: the floor
    assert epoch_efficiency(train, 0, micro_batch=1, world=1, group_by_length=True) == pytest.approx(34 / 36)
