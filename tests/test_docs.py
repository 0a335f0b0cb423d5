"""The code in README.md and docs/*.md runs as written.

Every fenced ```python and ```bash block of those pages is either run here or says why not:
- `<!-- not run: REASON -->` on the line before a block marks an illustration (placeholder paths, a GPU, several
  processes, minutes of training); REASON must say which, and where the same thing is tested if it is;
- `<!-- run with: CONTEXT ... -->` runs a python block after putting CONTEXT's names (the `CONTEXTS` below: a tiny
  config-built model, its batches, ...) into the page's namespace, for blocks that start from "your model";
- `NOT_RUN` below lists the blocks that cannot carry a comment (the README's two commands at the very top), with
  their reasons.
Python blocks of one page run in order in one namespace (a later block may use an earlier one's names), in a fresh
temporary folder; bash blocks run with `bash -euo pipefail` there, with this environment's `gora` first on PATH.
Blocks of other languages (yaml, ...) are data, not run. A page whose blocks fail fails with the block's file and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
RUN_LANGUAGES = ("python", "bash")
DATA_LANGUAGES = ("yaml", "json", "text", "toml")

# blocks that cannot carry a marker, by their first line: reason
NOT_RUN = {
    "# 1. Set up and run the main job: GoRA fine-tune of all-MiniLM-L6-v2 on Rotten Tomatoes (offline, CPU, ~2-3 min)": (
        "the README's first command: builds the environment and fine-tunes for minutes; docs/cli.md runs a small run"
    ),
    "# 2. Set up and run the tests": "the README's second command: builds the environment and runs this test suite",
}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: str  # the HTML comment on the line before the fence ('' if none)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> str | None:
        """Why this block is not run (None if it is)."""
        m = re.fullmatch(r"<!--\s*not run:\s*(.*?)\s*-->", self.marker)
        if m:
            return m.group(1)
        return NOT_RUN.get(self.code.split("\n", 1)[0].strip())

    @property
    def context(self) -> str | None:
        m = re.fullmatch(r"<!--\s*run with:\s*([\w-]+).*-->", self.marker)
        return m.group(1) if m else None


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.fullmatch(r"(\s*)```(\S*)\s*", lines[i])
        if m:
            indent, start = m.group(1), i
            i += 1
            while not re.fullmatch(r"\s*```\s*", lines[i]):
                i += 1
            code = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[start + 1 : i])
            marker = lines[start - 1].strip() if start else ""
            out.append(Block(page, start + 1, m.group(2), code, marker if marker.startswith("<!--") else ""))
        i += 1
    return out


# --- what "your model" is in the blocks that start from one --------------------------------------------------------


def _tiny_llama(tmp: Path) -> dict[str, Any]:
    from transformers import TrainingArguments

    import gora
    from helpers import lm_batches, make_llama

    batches = lm_batches(n=64)
    args = TrainingArguments(
        output_dir=str(tmp / "trainer"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    return {
        "model": make_llama(),
        "train_dataloader": batches,
        "dataloader": batches,
        "config": gora.GoraConfig(target_modules=["q_proj", "v_proj"], r=4, num_batches=4),
        "args": args,
        "train_dataset": [{k: v[0] for k, v in b.items()} for b in batches[:8]],
    }


def _tiny_llama_folder(tmp: Path) -> dict[str, Any]:
    names = _tiny_llama(tmp)
    path = tmp / "llama"
    names.pop("model").save_pretrained(path)
    return {**names, "path": str(path)}


def _tiny_mixtral(tmp: Path) -> dict[str, Any]:
    """A config-built Mixtral whose experts are fused 3-D parameters (docs/moe.md), with causal-LM batches."""
    from helpers import lm_batches, make_mixtral

    return {"model": make_mixtral(), "dataloader": lm_batches(n=4)}


CONTEXTS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "tiny-llama": _tiny_llama,
    "tiny-llama-folder": _tiny_llama_folder,
    "tiny-mixtral": _tiny_mixtral,
}


# --- the tests ------------------------------------------------------------------------------------------------------


def test_every_block_runs_or_says_why():
    """Protects the rule that a block that looks runnable runs: every python/bash block is run or carries a reason,
    every `run with` names a known context, and every block names its language."""
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if not block.language:
                problems.append(f"{block.where}: a block without a language (```python, ```bash, ```yaml, ...)")
            elif block.language not in (*RUN_LANGUAGES, *DATA_LANGUAGES):
                problems.append(f"{block.where}: language {block.language!r} is neither run nor data here")
            reason = block.not_run
            if reason is not None and len(reason) < 10:
                problems.append(f"{block.where}: 'not run' needs a reason, got {reason!r}")
            if block.context is not None and block.context not in CONTEXTS:
                problems.append(f"{block.where}: unknown context {block.context!r} (known: {sorted(CONTEXTS)})")
            if block.marker and reason is None and block.context is None:
                problems.append(f"{block.where}: unrecognised marker {block.marker!r}")
    assert not problems, "\n".join(problems)
    assert any(b.not_run is None and b.language in RUN_LANGUAGES for p in PAGES for b in blocks(p))


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(b.language in RUN_LANGUAGES for b in blocks(p))], ids=lambda p: p.name
)
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each page's runnable blocks run, in order, as written (on tiny offline models where they start from one)."""
    runnable = [b for b in blocks(page) if b.language in RUN_LANGUAGES and b.not_run is None]
    if not runnable:
        pytest.skip(f"{page.relative_to(ROOT)}: every block says why it is not run")
    if any(b.context == "tiny-mixtral" for b in runnable):
        from helpers import FUSED_EXPERTS

        if not FUSED_EXPERTS:
            pytest.skip(f"{page.relative_to(ROOT)} needs transformers>=5: fused experts")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    for block in runnable:
        if block.language == "python":
            if block.context is not None:
                namespace.update(CONTEXTS[block.context](tmp_path))
            try:
                exec(compile(block.code, block.where, "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{block.where} failed: {err!r}") from err
        else:
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block.code],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=1200,  # a hang guard only: the blocks take seconds
                check=False,
            )
            assert done.returncode == 0, f"{block.where} exited {done.returncode}:\n{done.stderr[-3000:]}"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lowercased; punctuation but - and _ dropped; spaces to -)."""
    heads = re.findall(r"^#+\s+(.*)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


PROSE_PAGES = [*PAGES, ROOT / "benchmarks" / "README.md"]  # the pages whose links and tables are checked


def _prose(page: Path) -> str:
    """A page's text without its fenced code blocks."""
    return re.sub(r"```.*?```", "", page.read_text(), flags=re.S)


def test_links_between_pages_resolve():
    """Protects the README's map of the docs: every relative link of README.md, docs/*.md and benchmarks/README.md
    names a file that exists, and an anchor that one of its headings makes."""
    broken = []
    for page in PROSE_PAGES:
        text = _prose(page)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.exists() and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _cells(row: str) -> int:
    """Cells of one Markdown table row: the unescaped | between its outer ones, plus one (an empty cell counts)."""
    inner = row.strip().removeprefix("|").removesuffix("|")
    return len(re.split(r"(?<!\\)\|", inner))


def test_every_table_row_has_its_header_columns():
    """Protects the generated and hand-written tables: a literal | inside a cell (GoRA's mean|W*G| in the method
    list did) splits the row into extra columns; every row of every Markdown table outside code blocks has as many
    cells as its header (an escaped \\| stays in its cell)."""
    bad = []
    for page in PROSE_PAGES:
        lines = _prose(page).split("\n")
        for i, line in enumerate(lines[:-1]):
            if not (line.startswith("|") and re.fullmatch(r"\|[\s:|-]+\|", lines[i + 1].strip())):
                continue
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                if _cells(row) != _cells(line):
                    bad.append(
                        f"{page.relative_to(ROOT)}: {_cells(row)} cells under a {_cells(line)}-column header: {row[:80]}"
                    )
    assert not bad, "\n".join(bad)
