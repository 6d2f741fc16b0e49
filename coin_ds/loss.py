"""The COIN objective as pure functions (SPEC §1).

Nothing here imports torch.distributed: cross-rank work comes in as two callables, `gather` (all-gather with gradients
along dim 0) and `reduce_sum` (sum of a detached tensor over ranks). With the identity defaults the functions compute the
single-process loss, which is exactly what N ranks compute together on the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]
ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last real token of each row, for left or right padding (found from the mask)."""
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(1).to(torch.int64).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str = "last") -> torch.Tensor:
    if how == "last":
        return last_token_pool(hidden, attention_mask)
    if how == "mean":
        return mean_pool(hidden, attention_mask)
    raise ValueError(f"unknown pooling {how!r}; use 'last' or 'mean'")


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-anchor cross-entropy of cosine similarities / temperature (no reduction)."""
    a = F.normalize(anchors.float(), dim=-1)
    c = F.normalize(candidates.float(), dim=-1)
    return F.cross_entropy(a @ c.T / temperature, targets, reduction="none")


def contrastive_per_anchor(h_orig: torch.Tensor, h_para: torch.Tensor, cand_orig: torch.Tensor,
                           cand_para: torch.Tensor, cand_neg: torch.Tensor | None, offset: int,
                           temperature: float, symmetric: bool = True) -> torch.Tensor:
    """COIN InfoNCE for the local anchors against (possibly global) candidates.

    Anchor orig_i must pick para_(offset+i) among all candidate positives (and hard negatives when given);
    symmetric: para_i must also pick orig_(offset+i) among candidate originals (and hard negatives).
    With local candidates, no hard negatives and offset 0 this is the official CLIP-style loss.
    """
    targets = offset + torch.arange(h_orig.shape[0], device=h_orig.device)
    with_neg = (lambda c: torch.cat([c, cand_neg])) if cand_neg is not None else _identity
    loss = info_nce(h_orig, with_neg(cand_para), targets, temperature)
    if symmetric:
        loss = 0.5 * (loss + info_nce(h_para, with_neg(cand_orig), targets, temperature))
    return loss


def adaptive_weight(l_gen: torch.Tensor, l_ctr: torch.Tensor, lambda_max: float) -> torch.Tensor:
    """w = min(λ, stopgrad(L_gen / L_ctr)): the contrastive term never outweighs generation (SPEC §1: min, not max)."""
    l_gen, l_ctr = l_gen.detach().float(), l_ctr.detach().float()
    ratio = l_gen / l_ctr if float(l_ctr) > 0 else torch.tensor(float(lambda_max))
    return torch.clamp(ratio, max=lambda_max)


@dataclass
class LossSettings:
    contrastive: bool = True
    temperature: float = 0.05
    lambda_max: float = 1000.0
    negatives: str = "global"  # local | global
    hard_negatives: bool = True
    symmetric: bool = True
    pooling: str = "last"


@dataclass
class LossOutput:
    loss: torch.Tensor  # this rank's share: averaging it over ranks gives the global objective
    l_gen: float  # global values, for logging
    l_ctr: float
    weight: float
    gen_tokens: int


def coin_loss(hidden: torch.Tensor, attention_mask: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
              target_rows: torch.Tensor, n_pairs: int, settings: LossSettings, rank: int = 0, world_size: int = 1,
              gather: Gather = _identity, reduce_sum: ReduceSum = _identity) -> LossOutput:
    """The whole COIN objective for one micro-batch whose rows are [orig (n), para (n), neg (n)].

    `logits`/`targets` are only the positions that carry a label (next-token prediction), `target_rows` the batch row of
    each. L_gen = CE(orig) + CE(para), each a token mean over the *global* batch; L_ctr a mean over global anchors.
    Every rank returns `world_size * local_sum / global_count`, so that DeepSpeed's gradient average over ranks equals
    the gradient of one process on the concatenated batch; w uses the global values for the same reason.
    """
    n = n_pairs
    token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
    is_orig, is_para = target_rows < n, (target_rows >= n) & (target_rows < 2 * n)
    local = torch.stack([token_loss[is_orig].sum(), token_loss[is_para].sum()])
    counts = reduce_sum(torch.stack([is_orig.sum(), is_para.sum()]).float())
    sums = reduce_sum(local.detach())
    l_gen_global = (sums / counts.clamp(min=1)).sum()
    l_gen = world_size * (local / counts.clamp(min=1)).sum()

    if not settings.contrastive:
        return LossOutput(l_gen, float(l_gen_global), 0.0, 0.0, int(counts.sum()))

    h = pool(hidden, attention_mask, settings.pooling)
    h_orig, h_para, h_neg = h[:n], h[n:2 * n], h[2 * n:3 * n]
    if settings.negatives == "global":
        cand_orig, cand_para = gather(h_orig), gather(h_para)
        cand_neg = gather(h_neg) if settings.hard_negatives else None
        # rank r's anchors sit at offset r*n in the gathered candidates (equal n on every rank: the sampler ensures it)
        offset = rank * n
    elif settings.negatives == "local":
        cand_orig, cand_para = h_orig, h_para
        cand_neg = h_neg if settings.hard_negatives else None
        offset = 0
    else:
        raise ValueError(f"unknown negatives {settings.negatives!r}; use 'local' or 'global'")
    per_anchor = contrastive_per_anchor(h_orig, h_para, cand_orig, cand_para, cand_neg, offset,
                                        settings.temperature, settings.symmetric)
    ctr_sum, ctr_count = reduce_sum(per_anchor.detach().sum()), reduce_sum(torch.tensor(float(n)))
    l_ctr_global = ctr_sum / ctr_count
    l_ctr = world_size * per_anchor.sum() / ctr_count
    w = adaptive_weight(l_gen_global, l_ctr_global, settings.lambda_max)
    return LossOutput(l_gen + w * l_ctr, float(l_gen_global), float(l_ctr_global), float(w), int(counts.sum()))


def alignment(h_orig: torch.Tensor, h_para: torch.Tensor, h_neg: torch.Tensor) -> dict[str, float]:
    """What COIN optimises, as one number: mean cos(orig, para) − mean cos(orig, neg)."""
    cos_para = F.cosine_similarity(h_orig.float(), h_para.float(), dim=-1).mean()
    cos_neg = F.cosine_similarity(h_orig.float(), h_neg.float(), dim=-1).mean()
    return {"cos_para": float(cos_para), "cos_neg": float(cos_neg), "alignment": float(cos_para - cos_neg)}
