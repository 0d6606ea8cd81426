"""The installed distribution's version: one owner for `uns` records (tl) and `cell2text --version`."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed `cell2text` distribution's version ("unknown" when the package runs from a plain folder)."""
    try:
        return version("cell2text")
    except PackageNotFoundError:
        return "unknown"
