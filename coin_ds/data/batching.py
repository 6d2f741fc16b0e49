"""Tokenized triples -> micro-batches.

The sampler deals whole triples, so a micro-batch always holds complete triples; each global step takes
`micro_batch_size x world_size` triples and gives every rank its own disjoint slice. The tail that cannot fill a
global batch is dropped for that epoch (and counted), because every rank must contribute the same number of anchors.
Its state is two integers (epoch, position), saved in checkpoints to resume mid-epoch.

The collator renders each view with the prompt template, masks the prompt with -100, truncates the *input* (never the
output) to `max_length`, and pads the 3n rows [orig | para | neg] to one length, so one forward pass serves all views.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from coin_ds.data.triples import Triple, View
from coin_ds.prompting import render_prompt

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    n_prompt: int  # tokens of prompt; the rest is the output (labels)


class TooLong(ValueError):
    pass


class ViewEncoder:
    """Tokenizes one view; truncates the input text when prompt + output exceed max_length."""

    def __init__(self, tokenizer, template: str = "auto", max_length: int = 256, add_eos: bool = False):
        self.tok, self.template, self.max_length, self.add_eos = tokenizer, template, max_length, add_eos
        self.truncated = 0

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def encode(self, view: View) -> Encoded:
        out_ids = self._ids(view.output, False) + ([self.tok.eos_token_id] if self.add_eos else [])
        text_input = view.input
        for _ in range(4):
            prompt = self._ids(render_prompt(self.template, view.instruction, text_input, self.tok), True)
            over = len(prompt) + len(out_ids) - self.max_length
            if over <= 0:
                if text_input != view.input:
                    self.truncated += 1
                return Encoded(prompt + out_ids, len(prompt))
            input_ids = self._ids(text_input, False)
            if not input_ids:
                break
            text_input = self.tok.decode(input_ids[:max(0, len(input_ids) - over - 1)])
        raise TooLong(f"instruction + output alone take {len(prompt) + len(out_ids) - len(self._ids(text_input, False))}"
                      f" tokens, more than data.max_length={self.max_length}")


@dataclass
class EncodedTriple:
    orig: Encoded
    para: Encoded
    neg: Encoded

    @property
    def length(self) -> int:
        return max(len(self.orig.input_ids), len(self.para.input_ids), len(self.neg.input_ids))


def encode_triples(triples: list[Triple], encoder: ViewEncoder, progress: bool = False) -> tuple[list[EncodedTriple], int]:
    """Encode every triple; returns (encoded, number skipped as too long even after truncating the input)."""
    from tqdm.auto import tqdm

    out, too_long = [], 0
    cache: dict[View, Encoded] = {}
    for t in tqdm(triples, desc="tokenizing", disable=not progress, unit="triple"):
        try:
            views = []
            for v in (t.orig, t.para, t.neg):
                if v not in cache:
                    cache[v] = encoder.encode(v)
                views.append(cache[v])
            out.append(EncodedTriple(*views))
        except TooLong:
            too_long += 1
    return out, too_long


class TripleSampler:
    """Deterministic, resumable, rank-sharded order of triple indices."""

    def __init__(self, lengths: list[int], micro_batch_size: int, rank: int, world_size: int, seed: int,
                 group_by_length: bool = True):
        self.lengths, self.mbs, self.rank, self.world = lengths, micro_batch_size, rank, world_size
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.position = 0, 0  # position: micro-batches of this epoch already taken
        self._cached: tuple[int, list[list[int]]] | None = None
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(lengths)} triples cannot fill one global batch of {self.global_batch} "
                             f"({micro_batch_size} per rank x {world_size} ranks)")

    @property
    def global_batch(self) -> int:
        return self.mbs * self.world

    @property
    def batches_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch

    @property
    def dropped_per_epoch(self) -> int:
        return len(self.lengths) - self.batches_per_epoch * self.global_batch

    def global_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(f"sampler/{self.seed}/{epoch}")
        rng.shuffle(order)
        order = order[:self.batches_per_epoch * self.global_batch]
        if self.group_by_length:
            # sort within windows of 32 global batches, then shuffle the batches: little padding, still random
            window = self.global_batch * 32
            order = [i for s in range(0, len(order), window)
                     for i in sorted(order[s:s + window], key=lambda k: self.lengths[k])]
        batches = [order[s:s + self.global_batch] for s in range(0, len(order), self.global_batch)]
        if self.group_by_length:
            rng.shuffle(batches)
        return batches

    def local_batch(self, global_batch: list[int]) -> list[int]:
        if self.group_by_length:
            # deal rank slices round-robin so that each rank gets similar lengths
            return global_batch[self.rank::self.world]
        return global_batch[self.rank * self.mbs:(self.rank + 1) * self.mbs]

    def next_batch(self) -> list[int]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self.global_batches(self.epoch))
        batch = self.local_batch(self._cached[1][self.position])
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate(encoded: list[EncodedTriple], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Rows [orig_0..orig_n-1 | para_0.. | neg_0..]; labels -100 on prompts, padding and the negatives (no L_gen)."""
    rows = [t.orig for t in encoded] + [t.para for t in encoded] + [t.neg for t in encoded]
    n = len(encoded)
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        length = len(r.input_ids)
        start = width - length if padding_side == "left" else 0
        ids[i, start:start + length] = torch.tensor(r.input_ids)
        mask[i, start:start + length] = 1
        if i < 2 * n:
            labels[i, start + r.n_prompt:start + length] = torch.tensor(r.input_ids[r.n_prompt:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "n_pairs": n}


def padding_efficiency(batch: dict[str, torch.Tensor]) -> float:
    return float(batch["attention_mask"].sum()) / batch["attention_mask"].numel()
