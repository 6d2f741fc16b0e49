"""The COIN loss against an independent, deliberately plain re-computation (loops, no vectorisation)."""

from __future__ import annotations

import math

import pytest
import torch

from coin_ds.loss import LossSettings, adaptive_weight, coin_loss, info_nce, last_token_pool, mean_pool


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def plain_infonce(anchor: torch.Tensor, candidates: list[torch.Tensor], target: int, tau: float) -> float:
    scores = [cos(anchor, c) / tau for c in candidates]
    m = max(scores)
    return -(scores[target] - m - math.log(sum(math.exp(s - m) for s in scores)))


def plain_ce_tokens(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    out = []
    for row, t in zip(logits.double(), targets):
        m = float(row.max())
        out.append(-(float(row[t]) - m - math.log(float(torch.exp(row - m).sum()))))
    return out


def test_last_token_pool_left_and_right_padding():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert torch.equal(last_token_pool(hidden, right), torch.stack([hidden[0, 2], hidden[1, 4]]))
    assert torch.equal(last_token_pool(hidden, left), torch.stack([hidden[0, 4], hidden[1, 4]]))
    mp = mean_pool(hidden, right)
    assert torch.allclose(mp[0], hidden[0, :3].mean(0))


def test_info_nce_matches_plain():
    torch.manual_seed(0)
    a, c = torch.randn(3, 8), torch.randn(5, 8)
    targets = torch.tensor([0, 2, 4])
    got = info_nce(a, c, targets, 0.05)
    for i in range(3):
        assert got[i].item() == pytest.approx(plain_infonce(a[i], list(c), int(targets[i]), 0.05), abs=1e-5)


def test_weight_is_min_not_max():
    assert float(adaptive_weight(torch.tensor(4.0), torch.tensor(2.0), 1000.0)) == pytest.approx(2.0)
    assert float(adaptive_weight(torch.tensor(4.0), torch.tensor(2.0), 1.5)) == pytest.approx(1.5)  # capped by λ
    g = torch.tensor(4.0, requires_grad=True)
    assert not adaptive_weight(g, torch.tensor(2.0), 10.0).requires_grad  # stop-gradient


def make_case(n: int, hidden: int = 6, vocab: int = 11, seq: int = 7, padding: str = "right", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3 * n, seq, hidden, generator=g)
    lengths = torch.randint(3, seq + 1, (3 * n,), generator=g)
    mask = torch.zeros(3 * n, seq, dtype=torch.long)
    for i, length in enumerate(lengths):
        if padding == "right":
            mask[i, :length] = 1
        else:
            mask[i, seq - length:] = 1
    # labelled positions: some tokens on orig and para rows only
    rows = torch.tensor([r for r in range(2 * n) for _ in range(int(r % 3) + 1)])
    logits = torch.randn(len(rows), vocab, generator=g)
    targets = torch.randint(0, vocab, (len(rows),), generator=g)
    return h, mask, logits, targets, rows


def plain_coin(h, mask, logits, targets, rows, n, s: LossSettings, padding: str) -> dict:
    seq = mask.shape[1]
    pooled = []
    for i in range(3 * n):
        idx = [t for t in range(seq) if mask[i, t] == 1]
        pooled.append(h[i, idx[-1]])  # last real token, whatever the padding side
    orig, para, neg = pooled[:n], pooled[n:2 * n], pooled[2 * n:]
    token_losses = plain_ce_tokens(logits, targets)
    o = [x for x, r in zip(token_losses, rows) if r < n]
    p = [x for x, r in zip(token_losses, rows) if n <= r < 2 * n]
    l_gen = sum(o) / len(o) + sum(p) / len(p)
    per = []
    for i in range(n):
        cands = para + (neg if s.hard_negatives else [])
        row = plain_infonce(orig[i], cands, i, s.temperature)
        if s.symmetric:
            cands2 = orig + (neg if s.hard_negatives else [])
            row = 0.5 * (row + plain_infonce(para[i], cands2, i, s.temperature))
        per.append(row)
    l_ctr = sum(per) / n
    w = min(s.lambda_max, l_gen / l_ctr)
    return {"l_gen": l_gen, "l_ctr": l_ctr, "w": w, "loss": l_gen + w * l_ctr}


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("hard,symmetric,lam", [(True, True, 1000.0), (False, True, 1000.0), (True, False, 1000.0),
                                                (True, True, 0.01)])
def test_coin_loss_matches_plain_recomputation(padding, hard, symmetric, lam):
    n = 4
    h, mask, logits, targets, rows = make_case(n, padding=padding, seed=hash((padding, hard, symmetric)) % 1000)
    s = LossSettings(temperature=0.05, lambda_max=lam, negatives="local", hard_negatives=hard, symmetric=symmetric)
    out = coin_loss(h, mask, logits, targets, rows, n, s)
    ref = plain_coin(h, mask, logits, targets, rows, n, s, padding)
    assert out.l_gen == pytest.approx(ref["l_gen"], abs=1e-6, rel=1e-6)
    assert out.l_ctr == pytest.approx(ref["l_ctr"], abs=1e-6, rel=1e-6)
    assert out.weight == pytest.approx(ref["w"], abs=1e-6, rel=1e-6)
    assert float(out.loss) == pytest.approx(ref["loss"], abs=1e-5, rel=1e-6)
    if lam == 0.01:
        assert out.weight == pytest.approx(0.01)  # the cap binds: min(λ, ratio)


def test_global_negatives_single_process_equals_local():
    n = 3
    h, mask, logits, targets, rows = make_case(n)
    a = coin_loss(h, mask, logits, targets, rows, n, LossSettings(negatives="global"))
    b = coin_loss(h, mask, logits, targets, rows, n, LossSettings(negatives="local"))
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-6)


def test_contrastive_off_is_plain_generation_loss():
    n = 2
    h, mask, logits, targets, rows = make_case(n)
    out = coin_loss(h, mask, logits, targets, rows, n, LossSettings(contrastive=False))
    ref = plain_coin(h, mask, logits, targets, rows, n, LossSettings(), "right")
    assert float(out.loss) == pytest.approx(ref["l_gen"], rel=1e-6)
    assert out.l_ctr == 0.0
