"""`coin-ds` subcommands. Each subcommand lives in its own module with a `main(argv) -> int`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("coin_ds.train", "train COIN (single process; use `deepspeed coin_ds/train.py` for several ranks)"),
    "augment": ("coin_ds.perturb.augment", "fill records' `paraphrases` with perturbed instructions"),
    "eval": ("coin_ds.eval.run", "robustness evaluation under perturbed instructions"),
    "export": ("coin_ds.export", "export adapters / merged / consolidated weights from a checkpoint"),
    "make-data": ("coin_ds.data.make_data", "write the embedded synthetic tasks as JSONL records"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: coin-ds COMMAND [ARGS]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"coin-ds: unknown command {name!r}; see `coin-ds --help`", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
