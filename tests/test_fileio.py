"""gora.fileio: output folders appear whole or not at all."""

from __future__ import annotations

import pytest

from gora.fileio import atomic_write, staged_folder


def test_staged_folder_leaves_nothing_on_failure(tmp_path):
    """Protects "no half-written output": a failure inside removes the temporary folder and keeps the old one."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "old.txt").is_file()
    with staged_folder(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


def test_atomic_write_keeps_the_old_file_or_writes_the_new_one_whole(tmp_path):
    """Protects files written whole: a failing writer leaves the old file and no temporary one; the temporary file
    ends in the target's suffix, so writers that pick the format from the name (matplotlib's savefig) work."""
    target = tmp_path / "ranks.png"
    target.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert [p.name for p in tmp_path.iterdir()] == ["ranks.png"] and target.read_bytes() == b"old"
    suffixes = []
    atomic_write(target, lambda tmp: (suffixes.append(tmp.suffix), tmp.write_bytes(b"new")))
    assert suffixes == [".png"] and target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["ranks.png"]
