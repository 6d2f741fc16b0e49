"""coin_ds: Contrastive Instruction Tuning (COIN) under DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
