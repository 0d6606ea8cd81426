"""Publishing an output: a finished temporary file or folder becomes the output in one step.

Every writer (describe, embed, the corpus builder, the trained model, the evaluation report) builds its output under
a temporary name beside the destination and publishes it here. Without `overwrite`, publishing never replaces
anything, even what another process published after the writer's own up-front check: the file is hard-linked into
place (`link` fails on an existing name) and a folder renamed (`rename` fails on a non-empty folder), so of two
runs racing for one destination exactly one wins and the other gets `OutputExistsError`.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# errno values meaning "this filesystem makes no hard links" (then a placeholder created with O_EXCL reserves the name).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}
_TAKEN = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}


class Terminated(BaseException):
    """SIGTERM received: raised in the main thread so that `finally` blocks remove temporary outputs. A
    BaseException, as KeyboardInterrupt is: an `except Exception` in library code (a checkpoint writer's, say) must
    not catch a stop and turn it into another error."""


@contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into `Terminated` while the block runs (SIGINT already raises KeyboardInterrupt), so that a
    writer stopped by `kill`, a scheduler or a closed terminal removes its temporary files on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class OutputExistsError(FileExistsError):
    """The destination exists (perhaps published by another run meanwhile) and may not be replaced."""


def exists_message(target: Path, fix: str = "pass --overwrite to replace it") -> str:
    return f"{target} exists; {fix}, or choose a new path"


def publish_file(temporary: Path, target: Path, overwrite: bool, fix: str = "pass --overwrite to replace it") -> None:
    """Move the finished file `temporary` to `target` (same folder); an existing `target` is replaced only with
    `overwrite`, else `OutputExistsError` (and `temporary` is left for the caller to remove)."""
    if overwrite:
        os.replace(temporary, target)
        return
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise OutputExistsError(exists_message(target, fix)) from None
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        try:  # reserve the name atomically, then move the finished file onto the reservation
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise OutputExistsError(exists_message(target, fix)) from None
        os.replace(temporary, target)
        return
    os.unlink(temporary)


def publish_folder(staging: Path, target: Path, overwrite: bool, fix: str = "pass --overwrite to replace it",
                   holds: str | None = None) -> None:
    """Move the finished folder `staging` to `target` (same parent). Without `overwrite` only a missing or empty
    `target` is taken, else `OutputExistsError`; with it, an existing `target` is set aside and removed after the
    new folder is in place, if it is an output of the same kind (it `holds` that file; `_refuse_foreign_folder`).
    `staging` is left for the caller to remove when this raises. The folder and its files get the modes the user's
    umask gives new ones (`tempfile.mkdtemp` makes the folder private; transformers writes weights that way)."""
    _as_plain_folder(staging)
    if overwrite:
        _refuse_foreign_folder(target, holds)
    if overwrite and target.exists():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.replaced-"))
        os.replace(target, aside / target.name)
        try:
            _rename_no_replace(staging, target, fix)
        except BaseException:
            if not target.exists():
                os.replace(aside / target.name, target)  # put the old output back
            raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        return
    _rename_no_replace(staging, target, fix)


def _as_plain_folder(folder: Path) -> None:
    """Give `folder` and the files in it the modes of a folder and files made under the process's umask."""
    mask = os.umask(0)  # reading the umask requires setting it: set it straight back
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def _rename_no_replace(staging: Path, target: Path, fix: str) -> None:
    if target.exists() and not target.is_dir():
        raise OutputExistsError(exists_message(target, fix))
    try:
        os.rename(staging, target)  # replaces an empty folder only
    except OSError as error:
        if error.errno in _TAKEN:
            raise OutputExistsError(exists_message(target, fix)) from None
        raise


def _refuse_foreign_folder(target: Path, holds: str | None) -> None:
    """Refuse to replace a non-empty folder without the file `holds` (a report's results.json, a model's config.json):
    `--overwrite` pointed at the wrong folder (a model, a corpus, a home directory) deleted all of it."""
    if holds is None or not target.is_dir() or not any(target.iterdir()) or (target / holds).exists():
        return
    raise OutputExistsError(
        f"{target} holds files but no {holds}, so it is not an earlier output of this kind; refusing to replace it "
        "even with overwrite: choose a new or empty folder"
    )


def check_new_output(target: Path, overwrite: bool, fix: str = "pass --overwrite to replace it",
                     holds: str | None = None) -> None:
    """The cheap up-front check (before hours of work): `target` is free, an empty folder, or may be replaced (with
    `overwrite`, a folder holding the file `holds` where that is given)."""
    if overwrite:
        _refuse_foreign_folder(target, holds)
    if overwrite or not target.exists():
        return
    if target.is_dir() and not any(target.iterdir()):
        return
    raise OutputExistsError(exists_message(target, fix))


__all__ = [
    "OutputExistsError", "Terminated", "sigterm_as_exception", "check_new_output", "exists_message", "publish_file", "publish_folder"]
