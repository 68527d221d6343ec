"""The command line every bench shares: `make bench` hands each the same BENCH_ARGS."""

from __future__ import annotations

import argparse


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the known options; name the ones meant for another bench, and go on."""
    args, others = parser.parse_known_args()
    if others:
        print(f"({parser.prog}: {' '.join(others)} is for another bench)")
    return args
