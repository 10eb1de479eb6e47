"""Argument types the benchmarks share."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """A count of at least 1: `--seeds 0` ran the default 5, and `--reps 0` ended the run in
    "no median for empty data" after all its work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count")
    return value
