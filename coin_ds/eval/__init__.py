"""Robustness evaluation (SPEC §3): instruction sets, scoring (rank, generate), metrics, report, and the CLI."""
