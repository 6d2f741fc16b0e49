"""Benchmarks of coin_ds: COIN's cost as ratios measured side by side in one run (issue #7). Entry: `make bench`."""
