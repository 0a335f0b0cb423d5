"""gora.fileio: output folders appear whole or not at all."""

from __future__ import annotations

import pytest

from gora.fileio import staged_folder


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
