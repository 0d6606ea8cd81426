"""What the command lines share (`cell2text`, `python -m processing.build_corpus`, the evaluation, publishing):
argparse types and how refused input ends a command."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


@contextmanager
def refused_input_as_one_line(prog: str) -> Iterator[None]:
    """End a command whose input is refused (`ValueError`, `OSError`: a missing file, an existing output, a corpus
    that does not fit the model; their messages name the fix) with one line and exit status 1, as argparse's errors
    end, instead of a traceback. Other exceptions keep their traceback: they are bugs."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise SystemExit(f"{prog}: error: {' '.join(str(error).split())}") from None
