"""Provenance of a benchmark run: the code (git commit, dirty tree), the command, the environment (pip freeze), and
the lock that keeps one results file to one code version and one environment.

A suite's results folder holds, next to `<suite>.jsonl`:
- `<suite>.freeze.txt`: `pip freeze` of the environment the suite started in;
- `<suite>.lock.json`: the hash of the code's content (`code_sha256`: every tracked file outside results, docs and
  logs, as it is in the working tree), the commit it was started from (and whether the tracked files differed from
  it, with a hash of the diff), the hash of the freeze, the torch threads, Python, the command that started the
  suite, and what was not counted as code (untracked files, results, docs, logs: `git_state`).
`check_lock` refuses to add runs to a results file under other code, other package versions or another thread
count: an interrupted suite resumes only under the code and environment it started with. The code is compared by
content, not by commit: committing the suite's own records (or the report) does not stop it from resuming, and
neither does a copy of the same files under another git history (a device machine's snapshot). Locks written before
`code_sha256` existed are compared by commit and diff (LEGACY_LOCK_KEYS).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import gora

ROOT = Path(__file__).resolve().parents[2]
# the checkout this harness is imported from: the library it benchmarks must come from the same one (`check_imports`)
HARNESS_CHECKOUT = ROOT
LOCK_KEYS = ("code_sha256", "freeze_sha256", "threads", "python")
LEGACY_LOCK_KEYS = ("commit", "dirty", "diff_sha256", "freeze_sha256", "threads", "python")
INFO_KEYS = ("commit", "dirty", "diff_sha256", "command", "not_counted")  # written to the lock, not compared


class LockError(RuntimeError):
    """The results file was started under another code version or environment."""


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {root}: {out.stderr.strip()}")
    return out.stdout


# outputs, not code: results being appended, the generated report, logs
NOT_CODE = ("benchmarks/results", "docs")
UNTRACKED_NAMED = 10  # how many untracked files a lock names (it counts them all)


def git_state(outputs: tuple[Path, ...] = (), root: Path | None = None) -> dict[str, Any]:
    """{"commit", "dirty", "diff_sha256", "code_sha256", "not_counted"}: HEAD, whether tracked files differ from it,
    the sha256 of `git diff HEAD` (None when clean), the sha256 of the code's content (`code_sha256`), and what was
    not counted as code.

    The code that runs is the tracked files and the diff to them (staged or not). Untracked files are not counted
    (a log, a results file or a scratch script written into the checkout must not change the code's identity); they
    are named in `not_counted` (`git add` one to count it). The results folder, docs/, `*.log` files and `outputs`
    (e.g. a results folder inside the checkout) are not code either, tracked or not. `root`: the git checkout
    (default: the one this file is in).
    """
    root = Path(ROOT if root is None else root).resolve()
    excluded = [*NOT_CODE]
    for path in outputs:
        path = Path(path).resolve()
        if path.is_relative_to(root) and str(path.relative_to(root)) not in excluded:
            excluded.append(str(path.relative_to(root)))
    spec = [".", *(f":(exclude){p}" for p in excluded), ":(exclude,glob)**/*.log"]
    commit = _git(root, "rev-parse", "HEAD").strip()
    diff = _git(root, "diff", "HEAD", "--binary", "--", *spec)
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "--", *spec).splitlines()
    dirty = bool(diff)
    return {
        "commit": commit,
        "dirty": dirty,
        "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if dirty else None,
        "code_sha256": code_sha256(root, spec),
        "not_counted": {
            "paths": [*excluded, "**/*.log"],
            "untracked": len(untracked),
            "untracked_named": untracked[:UNTRACKED_NAMED],
        },
    }


def check_imports(checkout: Path | None = None) -> None:
    """Refuse to run when `gora` is imported from outside the checkout the harness runs from: the lock hashes this
    checkout's files, so the library that runs must be its `src/gora`. (A `git worktree` of an older commit next to
    an editable install of the main checkout imports the main checkout's library unless PYTHONPATH says otherwise.)

    Raises:
        LockError: naming both places and the fix.
    """
    checkout = Path(HARNESS_CHECKOUT if checkout is None else checkout).resolve()
    where = Path(gora.__file__).resolve().parent
    if not where.is_relative_to(checkout):
        raise LockError(
            f"gora is imported from {where}, not from this checkout ({checkout}): the lock would name code that does "
            f"not run. Run with PYTHONPATH={checkout / 'src'} (a worktree next to an editable install of another "
            "checkout), or install this checkout"
        )


def code_sha256(root: Path, spec: list[str]) -> str:
    """sha256 over (path, sha256 of the working-tree bytes) of every tracked file matching `spec`, in path order; a
    tracked file deleted from the working tree counts as deleted. Same files, same hash, whatever the commit."""
    paths = sorted(_git(root, "ls-files", "-z", "--", *spec).split("\0"))
    total = hashlib.sha256()
    for rel in filter(None, paths):
        path = root / rel
        if path.is_symlink():
            content = os.readlink(path).encode()
        elif path.is_file():
            content = path.read_bytes()
        else:
            content = b"\0deleted"
        total.update(f"{rel}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return total.hexdigest()


def pip_freeze() -> str:
    """`pip freeze` of this interpreter's environment, without the editable install of this checkout (its code is
    identified by the git commit instead)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    keep = [
        line
        for line in out.splitlines()
        if line.strip() and not line.startswith("-e ") and not line.startswith("#") and "gora" not in line.lower()
    ]
    return "\n".join(sorted(keep)) + "\n"


def command_line(argv: list[str]) -> str:
    """The command as a user would type it from the checkout's root."""
    return "python -m benchmarks.harness.run " + shlex.join(argv)


def current(argv: list[str], threads: int | None, out: Path | None = None) -> tuple[dict[str, Any], str]:
    """(the provenance of this invocation, its pip freeze); `out` is the results folder (not code)."""
    freeze = pip_freeze()
    state = git_state((out,) if out is not None else ())
    return (
        {
            **state,
            "freeze_sha256": hashlib.sha256(freeze.encode()).hexdigest(),
            "threads": threads,
            "python": platform.python_version(),
            "command": command_line(argv),
        },
        freeze,
    )


def check_lock(out: Path, suite: str, prov: dict[str, Any], freeze: str) -> None:
    """Write the suite's lock and freeze when it starts; afterwards refuse other code (by content; by commit and diff
    for a legacy lock), another environment or another thread count.

    Raises:
        LockError: with what differs and how to proceed.
    """
    lock_path, freeze_path = out / f"{suite}.lock.json", out / f"{suite}.freeze.txt"
    if not lock_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        freeze_path.write_text(freeze)
        lock_path.write_text(json.dumps({k: prov[k] for k in (*LOCK_KEYS, *INFO_KEYS)}, indent=1) + "\n")
        return
    lock = json.loads(lock_path.read_text())
    keys = LOCK_KEYS if "code_sha256" in lock else LEGACY_LOCK_KEYS
    diffs = [f"{k}: {lock.get(k)!r} there, {prov[k]!r} now" for k in keys if lock.get(k) != prov[k]]
    if lock.get("code_sha256") not in (None, prov["code_sha256"]):
        diffs.insert(
            0, f"the tracked code differs from the files the suite started with (commit {lock.get('commit')})"
        )
    if diffs:
        hint = ""
        if lock.get("freeze_sha256") != prov["freeze_sha256"] and freeze_path.is_file():
            old, new = set(freeze_path.read_text().splitlines()), set(freeze.splitlines())
            hint = f" (packages there only: {sorted(old - new)[:6]}; here only: {sorted(new - old)[:6]})"
        raise LockError(
            f"{lock_path} was started under another code version or environment ({'; '.join(diffs)}){hint}: "
            f"resume from that code (e.g. `git worktree add --detach DIR {lock.get('commit')}`, run in DIR with "
            "PYTHONPATH=DIR/src) and environment, or "
            f"start a new results folder with --out"
        )


def git_commit() -> dict[str, Any]:
    """{"commit", "dirty"} of the checkout the benchmark runs from (results, docs and logs are not code, as for
    the lock); None for both outside a git checkout."""
    try:
        state = git_state()
    except (OSError, RuntimeError):
        return {"commit": None, "dirty": None}
    return {"commit": state["commit"], "dirty": state["dirty"]}
