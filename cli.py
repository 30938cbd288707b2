"""How every command-line entry point ends on bad input: one line naming the file, key or step and what
was expected, not a traceback (OLA_DEBUG=1 shows it). Bugs (any other exception) keep their traceback."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

# Bad files and data (ValueError), missing files or a full disk (OSError), a diverged run (FloatingPointError)
USER_ERRORS = (ValueError, OSError, FloatingPointError)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn USER_ERRORS raised inside into `error: <message>` and exit status 1."""
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("OLA_DEBUG"):
            raise
        raise SystemExit(f"error: {e}\n(set OLA_DEBUG=1 for the traceback)") from None


def positive_int(text: str) -> int:
    """argparse type of counts that must be >= 1 (steps, batch sizes, limits, intervals)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type of amounts that must be > 0 (epochs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value
