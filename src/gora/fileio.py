"""Files and folders that appear whole or not at all: the one atomic-write mechanism of the library and the app.

- `atomic_write(path, write)`: a file filled in a temporary sibling, fsynced and renamed over `path`;
- `staged_folder(target, overwrite)`: a folder filled under a temporary sibling name and renamed into place;
- `check_output_folder`: the refusal of a file or a non-empty folder (without `overwrite`), before any slow work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temporary file in the same folder, fsync it and rename it over `path`, so no truncated
    file is ever left, whatever happens in between.

    The temporary file ends in the target's own suffix (`.ranks.x1y2.tmp.png`), for writers that choose the format
    from the file name (matplotlib's `savefig`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def check_output_folder(target: str | os.PathLike[str], overwrite: bool, option: str = "--output-dir") -> Path:
    """The output folder, after checking it may be written: it must not be a file, nor a non-empty folder unless
    `overwrite`.

    Raises:
        ValueError: what to change (`option` names the setting that chose the folder).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"output path {str(target)!r} is a file: choose a folder with {option}")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"output folder {str(target)!r} is not empty: choose another {option} or pass --overwrite")
    return target


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`, on any failure it is deleted,
    so the folder appears complete or not at all."""
    target = check_output_folder(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
