"""The two scoring modes (SPEC §3), on prompts rendered exactly as in training (`coin_ds.prompting`).

- **rank** (ours): the total log-likelihood of each label word's tokens after the prompt; the answer is the most likely
  label word. Prompts that share an instruction share a long token prefix (chat template, system prompt, instruction),
  so the prefix runs through the decoder once and its key/value cache is reused for every record and every label
  word; the vocabulary projection is computed only at the positions that predict label tokens.
- **generate** (the official protocol): greedy decoding of a few new tokens; the answer is the label word the output
  starts with (after leading whitespace, quotes and markdown, ignoring case); anything else is wrong (`None`).

Prompt tokens are encoded like training does (`ViewEncoder`: special tokens on, the answer appended without them).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch

from coin_ds.loss import last_token_pool
from coin_ds.modeling import position_ids_from_mask, unwrap

MODES = ("rank", "generate")
MAX_NEW_TOKENS = 7  # the official protocol's budget


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def encode_label_words(tokenizer, label_words: Sequence[str]) -> list[list[int]]:
    out = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in label_words]
    empty = [w for w, ids in zip(label_words, out) if not ids]
    if empty:
        raise ValueError(f"label word(s) {empty} tokenize to nothing")
    return out


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(decoder) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); older releases only know the old name
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@torch.no_grad()
def rank_scores(model, tokenizer, prompts: Sequence[str], label_words: Sequence[str],
                batch_size: int = 16) -> torch.Tensor:
    """[len(prompts), len(label_words)] total log-probability of each label word's tokens after each prompt."""
    base = unwrap(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    dev = _device(base)
    ids = encode_prompts(tokenizer, prompts)
    labels = encode_label_words(tokenizer, label_words)
    # the shared prefix runs once; every row keeps at least one token of its own (it predicts the first label token)
    cache_kw = _cache_kwarg(decoder)
    shared = min(common_prefix_len(ids), min(len(x) for x in ids) - 1)
    prefix_cache = None
    if shared > 0:
        prefix = torch.tensor([ids[0][:shared]], device=dev)
        out = decoder(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True)
        prefix_cache = getattr(out, cache_kw)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    k = len(labels)
    # one-token label words (the usual case) are all read from one row per prompt: no row per label word
    one_token = all(len(lab) == 1 for lab in labels)
    scores = torch.empty(len(ids), k)
    for start in range(0, len(ids), batch_size):
        if one_token:
            rows = [x[shared:] for x in ids[start:start + batch_size]]
        else:
            rows = [x[shared:] + lab for x in ids[start:start + batch_size] for lab in labels]
        n_rows, width = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((n_rows, width), pad, dtype=torch.long)
        mask = torch.zeros((n_rows, width), dtype=torch.long)
        sel_row, sel_pos, targets = [], [], []
        for r, row in enumerate(rows):
            input_ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
            if one_token:
                sel_row.append(r)
                sel_pos.append(len(row) - 1)
                continue
            lab = labels[r % k]
            first = len(row) - len(lab)  # position of the first label token; the one before predicts it
            sel_row += [r] * len(lab)
            sel_pos += list(range(first - 1, len(row) - 1))
            targets += lab
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)  # the forward appends to it
            cache.batch_repeat_interleave(n_rows)
            attn = torch.cat([torch.ones((n_rows, shared), dtype=torch.long, device=dev), mask], dim=1)
            pos = (shared + torch.arange(width, device=dev)).expand(n_rows, width)
            hidden = decoder(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True,
                             **{cache_kw: cache}).last_hidden_state
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                             use_cache=False).last_hidden_state
        sel_row_t = torch.tensor(sel_row, device=dev)
        logp = head(hidden[sel_row_t, torch.tensor(sel_pos, device=dev)]).float().log_softmax(-1)
        if one_token:
            scores[start:start + n_rows] = logp[:, [lab[0] for lab in labels]].cpu()
            continue
        token_lp = logp[torch.arange(len(targets), device=dev), torch.tensor(targets, device=dev)]
        per_row = torch.zeros(n_rows, device=dev).index_add_(0, sel_row_t, token_lp)
        scores[start:start + n_rows // k] = per_row.view(-1, k).cpu()
    return scores


def rank_predict(model, tokenizer, prompts: Sequence[str], label_words: Sequence[str],
                 batch_size: int = 16) -> list[str]:
    scores = rank_scores(model, tokenizer, prompts, label_words, batch_size)
    return [label_words[i] for i in scores.argmax(dim=1).tolist()]


def parse_answer(text: str, label_words: Sequence[str]) -> str | None:
    """The label word the output starts with (the longest, so 'not_entailment' is not read as 'not'), else None."""
    t = text.lstrip(" \t\r\n\"'`*_([").lower()
    matches = [w for w in label_words if t.startswith(w.lower())]
    return max(matches, key=len) if matches else None


@torch.no_grad()
def generate_outputs(model, tokenizer, prompts: Sequence[str], batch_size: int = 16,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy continuations (decoded, special tokens dropped) of each prompt."""
    from transformers import GenerationConfig

    dev = _device(model)
    ids = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    out: list[str] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        # left padding: every row's next token comes right after its prompt
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=dev)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def generate_predict(model, tokenizer, prompts: Sequence[str], label_words: Sequence[str], batch_size: int = 16,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[list[str | None], list[str]]:
    """(parsed answers, raw outputs)."""
    raw = generate_outputs(model, tokenizer, prompts, batch_size, max_new_tokens)
    return [parse_answer(t, label_words) for t in raw], raw


@torch.no_grad()
def last_token_states(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Final decoder states (after the final norm) at each sequence's last token, as the COIN loss sees them."""
    base = unwrap(model)
    decoder, dev = base.get_decoder(), _device(base)
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.tensor([list(x) + [pad_id] * (width - len(x)) for x in chunk], device=dev)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=dev)
        hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                         use_cache=False).last_hidden_state
        out.append(last_token_pool(hidden, mask).float().cpu())
    return torch.cat(out)
