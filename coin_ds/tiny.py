"""A tiny randomly initialised Llama and a byte-level BPE tokenizer trained on the embedded tasks.

Used by the demo and the fast tests: nothing is downloaded, everything is deterministic by seed. The tokenizer is
byte-level, so any text (typos, homoglyphs, other languages) tokenizes, just into more pieces.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from coin_ds.data.synthetic import TASKS, generate_records

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def corpus(seed: int = 0, n_per_task: int = 300) -> list[str]:
    from coin_ds.prompting import render_prompt

    texts = []
    for r in generate_records(n_per_task, seed):
        for template in ("coin", "alpaca"):
            texts.append(render_prompt(template, r.instruction, r.input) + r.output)
    for task in TASKS.values():
        texts.extend(task.templates)
    random.Random(seed).shuffle(texts)
    return texts


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """Train a byte-level BPE on the embedded tasks' text and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    bos = tok.token_to_id(SPECIAL["bos_token"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def build_model(tokenizer, hidden_size: int = 128, layers: int = 4, heads: int = 4, seed: int = 0,
                max_position_embeddings: int = 512):
    """A LlamaForCausalLM small enough to train on two CPU ranks in a few minutes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_tiny(path: str | Path, hidden_size: int = 128, layers: int = 4, heads: int = 4, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as an ordinary HF directory (what `model.path` expects)."""
    path = Path(path)
    tok = build_tokenizer(seed=seed)
    model = build_model(tok, hidden_size, layers, heads, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
