"""The two scoring modes (SPEC §3), on prompts rendered exactly as in training (`coin_ds.prompting`).

- **rank** (ours): the total log-likelihood of each label word's tokens after the prompt; the answer is the most likely
  label word. Prompts that share an instruction share a long token prefix (chat template, system prompt, instruction),
  so the prefix runs through the decoder once and its key/value cache is reused for every record and every label
  word; what is left of each prompt is packed with others into rows with no padding between them (`pack_rows`); the
  vocabulary projection is computed only at the positions that predict label tokens.
- **generate** (the official protocol): greedy decoding of a few new tokens; the answer is the label word the output
  starts with (after leading whitespace, quotes and markdown, ignoring case); anything else is wrong (`None`).

Prompt tokens are encoded like training does (`ViewEncoder`: special tokens on, the answer appended without them).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import Cache

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


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens a group of prompts runs once: their common prefix, leaving each prompt at least one token of its own (it
    predicts the first label token)."""
    return min(common_prefix_len(prompts), min(len(x) for x in prompts) - 1) if prompts else 0


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(decoder) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); older releases only know the old name
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


ROW_TOKENS = 64  # a packed row's length. Rows are stacked into one batch, so matrix products see every row's tokens
# at once whatever this is; it only bounds the block-diagonal attention, which computes scores that it then masks.


@dataclass
class PackedRows:
    """Prompts' own tokens packed end to end behind their groups' prefixes; label words branch off as a tree."""

    input_ids: torch.Tensor     # [rows, width]
    position_ids: torch.Tensor  # [rows, width], counted from the start of the prompt
    mask: torch.Tensor          # [rows, 1, width, prefix columns + width] bool, True = may attend
    row_groups: torch.Tensor    # [rows, slots] the groups whose prefixes fill each row's prefix slots (-1: none)
    read_row: torch.Tensor      # [reads] row and position whose next-token distribution scores...
    read_pos: torch.Tensor
    target: torch.Tensor        # ...this label token
    prompt: torch.Tensor        # of this prompt (index into the suffixes)
    label: torch.Tensor         # and this label word (index into its group's labels)

    def take(self, lo: int, hi: int) -> PackedRows:
        """Rows lo..hi-1 and the reads they carry."""
        keep = (self.read_row >= lo) & (self.read_row < hi)
        return PackedRows(self.input_ids[lo:hi], self.position_ids[lo:hi], self.mask[lo:hi], self.row_groups[lo:hi],
                          self.read_row[keep] - lo, self.read_pos[keep], self.target[keep], self.prompt[keep],
                          self.label[keep])


def pack_rows(suffixes: Sequence[Sequence[int]], groups: Sequence[int], labels: Sequence[Sequence[Sequence[int]]],
              prefix_lens: Sequence[int], pad_id: int, row_tokens: int = ROW_TOKENS, common: int = 0) -> PackedRows:
    """Pack prompts' own tokens into rows with no padding between them.

    Prompt i belongs to group `groups[i]`, whose `prefix_lens[g]` shared tokens precede `suffixes[i]` and whose label
    words are `labels[g]`. A prompt's segment is its suffix, then one branch per label word holding that word's tokens
    but the last (the last token is only predicted, never read). A token attends to its group's prefix, to earlier
    tokens of its own suffix and to earlier tokens of its own branch: exactly the context it has in the unpacked
    sequence prompt + label word, at the same positions. One-token label words add no branch: all are read from the
    suffix's last token. A segment longer than `row_tokens` gets a row of its own.

    A row holds at most two groups, so the part-filled rows a group leaves are filled by the next one. Its prefix
    columns are laid out as [the first `common` tokens, which every group's prefix shares | slot 0: the rest of the
    first group's prefix | slot 1: the rest of the second's], each slot max(prefix_lens) - common wide; slot 1 exists
    only when some row holds two groups.
    """
    if not all(suffixes):
        raise ValueError("every prompt needs at least one token after the shared prefix")
    if common > min(prefix_lens, default=0):
        raise ValueError(f"common prefix {common} is longer than a group's prefix ({min(prefix_lens)})")
    rows: list[list[tuple[int, int, int, int, int]]] = []  # per token: (token, prompt, group, branch, position)
    row_groups: list[list[int]] = []
    reads = []  # (row, pos, target, prompt, label)

    def room(r: int, need: int) -> bool:
        return len(rows[r]) + need <= row_tokens

    # first fit, longest first, group by group: rows end up nearly full, so little padding is left between them
    for p in sorted(range(len(suffixes)), key=lambda i: (groups[i], -len(suffixes[i]))):
        g, suffix, start_pos = groups[p], suffixes[p], prefix_lens[groups[p]]
        need = len(suffix) + sum(len(lab) - 1 for lab in labels[g])
        r = next((r for r in range(len(rows)) if g in row_groups[r] and room(r, need)), None)
        if r is None:
            r = next((r for r in range(len(rows)) if len(row_groups[r]) == 1 and room(r, need)), None)
        if r is None:
            rows.append([])
            row_groups.append([])
            r = len(rows) - 1
        if g not in row_groups[r]:
            row_groups[r].append(g)
        row = rows[r]
        last = len(row) + len(suffix) - 1
        row += [(t, p, g, 0, start_pos + i) for i, t in enumerate(suffix)]
        for j, lab in enumerate(labels[g]):
            reads.append((r, last, lab[0], p, j))
            for t, tok in enumerate(lab[:-1]):
                row.append((tok, p, g, j + 1, start_pos + len(suffix) + t))
                reads.append((r, len(row) - 1, lab[t + 1], p, j))
    width, n = max(len(row) for row in rows), len(rows)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n, width), dtype=torch.long)
    owner = torch.full((n, width), -1, dtype=torch.long)  # -1: padding
    group = torch.full((n, width), -1, dtype=torch.long)
    branch = torch.zeros((n, width), dtype=torch.long)
    for r, row in enumerate(rows):
        cols = torch.tensor(row, dtype=torch.long)
        ids[r, :len(row)], owner[r, :len(row)], group[r, :len(row)], branch[r, :len(row)], pos[r, :len(row)] = \
            cols.unbind(1)
    idx = torch.arange(width)
    same = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0)
    causal = idx[None, :, None] >= idx[None, None, :]
    on_path = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    local = same & causal & on_path
    local |= (owner < 0)[:, :, None] & torch.eye(width, dtype=torch.bool)  # padding sees itself: no empty softmax
    slots = 2 if any(len(gs) == 2 for gs in row_groups) else 1
    slot_groups = torch.tensor([gs + [-1] * (slots - len(gs)) for gs in row_groups], dtype=torch.long)
    rest = max(prefix_lens, default=0) - common
    rest_len = torch.tensor(list(prefix_lens) + [0], dtype=torch.long)[group] - common  # [rows, width]; pad: group -1
    prefix = [(group >= 0)[:, :, None].expand(n, width, common)]
    for s in range(slots):
        in_slot = (group == slot_groups[:, s:s + 1]) & (group >= 0)
        prefix.append(in_slot[:, :, None] & (torch.arange(rest)[None, None, :] < rest_len[:, :, None]))
    mask = torch.cat([*prefix, local], dim=2)[:, None]
    r_row, r_pos, r_tgt, r_prompt, r_label = torch.tensor(reads, dtype=torch.long).unbind(1)
    return PackedRows(ids, pos, mask, slot_groups, r_row, r_pos, r_tgt, r_prompt, r_label)


def prefix_caches(decoder, cache_kw: str, prefixes: Sequence[Sequence[int]], pad_id: int,
                  dev: torch.device) -> tuple[Cache | None, int]:
    """(cache, common): one cache row per prefix, right padded (the packed rows' masks hide each row's padding), or
    None if all are empty; `common` is how many first tokens all prefixes share. That common start (chat template,
    system prompt: most of a prefix) runs once, then only the rest of each prefix: with many instructions of a few
    records each, that is most of the prefix work saved."""
    width = max((len(x) for x in prefixes), default=0)
    if width == 0:
        return None, 0
    common = common_prefix_len(prefixes) if all(prefixes) else 0
    cache = None
    if common > 0:
        cache = getattr(decoder(input_ids=torch.tensor([prefixes[0][:common]], device=dev), use_cache=True),
                        cache_kw)
        cache.batch_repeat_interleave(len(prefixes))
        if common == width:
            return cache, common
    # right padding: causal attention keeps the padding out of every real token's context
    rest = torch.tensor([list(x[common:]) + [pad_id] * (width - len(x)) for x in prefixes], device=dev)
    kwargs = {cache_kw: cache, "position_ids": (common + torch.arange(width - common, device=dev)).expand_as(rest)}
    out = decoder(input_ids=rest, use_cache=True, **(kwargs if cache is not None else {}))
    return getattr(out, cache_kw), common


def row_cache(prefix_cache: Cache, row_groups: torch.Tensor, common: int) -> Cache:
    """The cache a batch of packed rows continues: per row, the common start and its slots' prefix rests."""
    cache = copy.deepcopy(prefix_cache)  # the forward appends to it
    cache.reorder_cache(row_groups[:, 0])
    for s in range(1, row_groups.shape[1]):
        other = torch.where(row_groups[:, s] >= 0, row_groups[:, s], row_groups[:, 0])  # an empty slot stays masked
        for layer, (keys, values, *_) in enumerate(prefix_cache):
            cache.update(keys[other][:, :, common:], values[other][:, :, common:], layer)
    return cache


@contextmanager
def only_at(module: torch.nn.Module | None, rows: torch.Tensor, pos: torch.Tensor):
    """Run a position-wise module ([batch, seq, d] -> same) only at (rows, pos), zeros elsewhere.

    Used on the last decoder layer's MLP: its output at a position feeds nothing but that position's final hidden
    state, and only the read positions' final states are used (a one-token label is read at one position a prompt)."""
    if module is None:
        yield
        return
    shape = {}

    def pick(_, args):
        shape["x"] = args[0].shape
        return (args[0][rows, pos][None],) + tuple(args[1:])

    def scatter(_, args, out):
        full = out.new_zeros(shape["x"][:-1] + out.shape[-1:])
        full[rows, pos] = out[0]
        return full

    handles = [module.register_forward_pre_hook(pick), module.register_forward_hook(scatter)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def rank_scores_groups(model, tokenizer, groups: Sequence[tuple[Sequence[str], Sequence[str]]],
                       batch_size: int = 64, logprobs: bool = True) -> list[torch.Tensor]:
    """For each group (prompts, label words): [len(prompts), len(label words)] total log-probability of each label
    word's tokens after each prompt.

    Prompts of a group (one instruction over many inputs) share a long token prefix: chat template, system prompt,
    instruction. All groups' prefixes run first (their common start once); then the prompts' own tokens, packed into
    rows of `ROW_TOKENS` (`pack_rows`), run `batch_size` rows at a time behind copies of their groups' prefixes. So
    `batch_size` counts sequences per forward as in generate mode, each holding several prompts. Logits are computed
    only where a label token is predicted. With `logprobs=False` and one-token label words the scores are the label
    tokens' logits (same argmax, no vocabulary-wide normalizer).
    """
    base = unwrap(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    dev = _device(base)
    cache_kw = _cache_kwarg(decoder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [encode_prompts(tokenizer, prompts) for prompts, _ in groups]
    labels = [encode_label_words(tokenizer, words) for _, words in groups]
    shared = [shared_prefix_len(g) for g in ids]
    prefix_cache, common = prefix_caches(decoder, cache_kw, [g[0][:s] if g else [] for g, s in zip(ids, shared)],
                                         pad, dev)
    flat = [(g, i) for g, group in enumerate(ids) for i in range(len(group))]
    scores = [torch.zeros(len(g), len(lab)) for g, lab in zip(ids, labels)]
    if not flat:
        return scores
    packed = pack_rows([ids[g][i][shared[g]:] for g, i in flat], [g for g, _ in flat], labels, shared, pad, ROW_TOKENS,
                       common)
    dtype = head.weight.dtype
    last_mlp = getattr(decoder.layers[-1], "mlp", None) if hasattr(decoder, "layers") else None
    if not type(last_mlp).__name__.endswith("MLP"):
        last_mlp = None  # only a plain position-wise MLP (LlamaMLP, Qwen2MLP, ...): MoE blocks may return tuples
    logits_only = (not logprobs and type(head) is torch.nn.Linear and head.bias is None
                   and all(len(lab) == 1 for g in labels for lab in g))
    for lo in range(0, packed.input_ids.shape[0], batch_size):
        part = packed.take(lo, lo + batch_size)
        kwargs = {}
        if prefix_cache is not None:
            kwargs = {cache_kw: row_cache(prefix_cache, part.row_groups.to(dev), common), "use_cache": True}
        # an additive mask in the model's dtype: a boolean one would be converted again in every layer
        mask = torch.zeros(part.mask.shape, dtype=dtype, device=dev).masked_fill_(~part.mask.to(dev),
                                                                                  torch.finfo(dtype).min)
        read_row, read_pos, target = part.read_row.to(dev), part.read_pos.to(dev), part.target.to(dev)
        width = part.input_ids.shape[1]
        at = torch.unique(read_row * width + read_pos)  # label words of one token are all read at the same position
        with only_at(last_mlp, at // width, at % width):
            hidden = decoder(input_ids=part.input_ids.to(dev), attention_mask=mask,
                             position_ids=part.position_ids.to(dev), **kwargs).last_hidden_state
        h = hidden[read_row, read_pos]
        if logits_only:  # the label tokens' rows of the head: an argmax needs no normalizer
            token_lp = (h.float() * head.weight[target].float()).sum(-1).cpu()  # fp32: bf16 logits would tie
        else:
            token_lp = head(h).float().log_softmax(-1).gather(1, target[:, None])[:, 0].cpu()
        for p, lab, lp in zip(part.prompt.tolist(), part.label.tolist(), token_lp):
            g, i = flat[p]
            scores[g][i, lab] += lp
    return scores


def rank_scores(model, tokenizer, prompts: Sequence[str], label_words: Sequence[str],
                batch_size: int = 64) -> torch.Tensor:
    """[len(prompts), len(label_words)] total log-probability of each label word's tokens after each prompt."""
    return rank_scores_groups(model, tokenizer, [(prompts, label_words)], batch_size)[0]


def rank_predict_groups(model, tokenizer, groups: Sequence[tuple[Sequence[str], Sequence[str]]],
                        batch_size: int = 64) -> list[list[str]]:
    """The most likely label word of each prompt, group by group."""
    scores = rank_scores_groups(model, tokenizer, groups, batch_size, logprobs=False)
    return [[words[k] for k in s.argmax(dim=1).tolist()] for (_, words), s in zip(groups, scores)]


def rank_predict(model, tokenizer, prompts: Sequence[str], label_words: Sequence[str],
                 batch_size: int = 64) -> list[str]:
    return rank_predict_groups(model, tokenizer, [(prompts, label_words)], batch_size)[0]


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
    # batches of similar lengths waste little on padding; outputs go back to the prompts' order
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in range(0, len(ids), batch_size):
        picked = order[start:start + batch_size]
        chunk = [ids[i] for i in picked]
        width = max(len(x) for x in chunk)
        # left padding: every row's next token comes right after its prompt
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=dev)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        for i, text in zip(picked, tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)):
            out[i] = text
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
