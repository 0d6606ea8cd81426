"""What the command lines share (`cell2text`, `python -m processing.build_corpus`, the evaluation, publishing):
the library's keywords written as options and how refused input ends a command. The argparse type `positive_int` is
`cell2text_cli`'s, which the `cell2text` command parses with before any of this package loads; the dtype names are
`package_info`'s."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# The library's messages name its Python keywords; a command line's user reads its options. Each pattern matches
# the message's own wording only (never a path, a column or a value that happens to hold the word); the options are
# those of `cell2text` and of the corpus builder (`--obs-map` is the builder's only).
_OPTION_NAMES = (
    (re.compile(r"\binput_values='(counts|normalized|log1p)'"), r"--input-values \1"),
    (re.compile(r"\bleave constrained=False out, or cell_types\b"), "leave --free out, or --cell-types"),
    (re.compile(r"^keep_labels: "), "--cell-types: "),
    (re.compile(r"^cell_types\b"), "--cell-types"),
    (re.compile(r"\bconstrained=False"), "--free"),
    (re.compile(r"\bskip_empty_cells=True"), "--skip-empty-cells"),
    (re.compile(r"\buse_raw=True"), "--use-raw"),
    (re.compile(r"\bleave use_raw out\b"), "leave --use-raw out"),
    (re.compile(r"\blayer='([^']*)'"), r"--layer \1"),
    (re.compile(r"\blayer=\.\.\."), "--layer NAME"),
    (re.compile(r"\bbatch_size must\b"), "--batch-size must"),
    (re.compile(r"\bmax_new_tokens=(\d+)"), r"--max-new-tokens \1"),
    (re.compile(r"\bpass a (larger|smaller) max_new_tokens\b"), r"pass a \1 --max-new-tokens"),
    (re.compile(r"\bbfloat16 \(dtype=\.\.\.\)"), "bfloat16 (--dtype NAME)"),
    (re.compile(r"^obs_map (?=names |maps )"), "--obs-map "),
    (re.compile(r"^max_shard_size must\b"), "--max-shard-size must"),
)


def as_command_line(message: str) -> str:
    """`message` with the library's keyword names written as the command line's options."""
    for pattern, option in _OPTION_NAMES:
        message = pattern.sub(option, message)
    return message


def with_close_match(name: str, known: Iterable[str], cutoff: float = 0.6) -> str:
    """`name` quoted, with the closest of `known` where one is close (difflib's ratio, ignoring case, at least
    `cutoff`): "'num_beam' (did you mean 'num_beams'?)", for refusing a misspelt setting or label with its fix."""
    by_folded = {str(other).casefold(): other for other in known}
    close = difflib.get_close_matches(name.casefold(), list(by_folded), n=1, cutoff=cutoff)
    return f"{name!r} (did you mean {by_folded[close[0]]!r}?)" if close else repr(name)


def is_integer_at_least(value: object, least: int) -> bool:
    """Whether a setting given in Python or YAML is an integer (numpy's too, not a bool: True is 1) of at least
    `least`: 2.5 or "10" ran, or failed deep in numpy, torch or datasets."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least


@contextmanager
def refused_input_as_one_line(prog: str, wording: Callable[[str], str] = str) -> Iterator[None]:
    """End a command whose input is refused (`ValueError`, `OSError`: a missing file, an existing output, a corpus
    that does not fit the model; their messages name the fix) with one line and exit status 1, as argparse's errors
    end, instead of a traceback. Other exceptions keep their traceback: they are bugs. `wording` rewrites the
    message (`as_command_line`: the library's keywords as the command's options). A `ValueError` raised in another
    library's code (a shape mismatch in torch, a JSON file that does not parse) keeps its traceback too: it was
    not this project's refusal, and one line would hide where it came from."""
    try:
        yield
    except (ValueError, OSError) as error:
        if isinstance(error, ValueError) and not raised_by_this_project(error):
            raise
        raise SystemExit(f"{prog}: error: {wording(' '.join(str(error).split()))}") from None


# The project's top-level packages (and a command's own module, run with `python -m`), whose refusals name the fix.
_PROJECT_PACKAGES = ("modeling_cell2text", "processing", "training", "hub_cards", "__main__")
# Where transformers imports a model folder's code (trust_remote_code): this package's modules, saved with the model.
_REMOTE_CODE_PACKAGE = "transformers_modules"


def raised_by_this_project(error: BaseException) -> bool:
    """Whether the innermost Python frame of `error`'s traceback (where it was raised, or the caller of the builtin
    that raised it) is this project's code: one of its packages, or a module of this package that a model folder
    holds, run with trust_remote_code (its config check refused `num_cell_tokens: 0` with a traceback)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    module = frame.tb_frame.f_globals.get("__name__", "") if frame is not None else ""
    if module.startswith(f"{_REMOTE_CODE_PACKAGE}."):
        return (Path(__file__).parent / f"{module.rsplit('.', 1)[-1]}.py").is_file()
    return module.split(".")[0] in _PROJECT_PACKAGES
