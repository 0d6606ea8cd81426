"""What the package states about itself to its users: the installed version (`uns` records, `cell2text --version`)
and the weight dtypes one may name (`tl.describe(dtype=...)`, `cell2text --dtype`).

Standard library only, and no import from the package: `cell2text_cli` (the console script's parser) runs this file
without the package's `__init__`, which imports torch and transformers, so that `--version` and `--help` answer at
once."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

# The weight dtypes a user may name, besides "auto".
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def package_version() -> str:
    """The installed `cell2text` distribution's version ("unknown" when the package runs from a plain folder)."""
    try:
        return version("cell2text")
    except PackageNotFoundError:
        return "unknown"
