"""The package's layout: the library (the method, `gora.*`) never imports the application (`gora.app`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gora

LIBRARY = Path(gora.__file__).parent
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # the harness and studies, held to the same rules


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against the `gora` package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "gora" if node.level == 1 else (node.module or "")
            module = f"{base}.{node.module}" if node.level == 1 and node.module else base
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_library_modules_never_import_the_app():
    """Property: data flows one way: the app imports the library; no library module imports gora.app."""
    offenders = {
        path.name: sorted(n for n in _imports(path) if n == "gora.app" or n.startswith("gora.app."))
        for path in LIBRARY.glob("*.py")
        if path.name != "__main__.py"  # `python -m gora` runs the command: the one entry into the app
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_import_gora_loads_no_app_module():
    """Property: `import gora` (the library API) does not load the command-line application, nor the option parser
    only the command needs (jsonargparse)."""
    code = "import sys, gora; print([m for m in sys.modules if m.startswith(('gora.app', 'jsonargparse'))])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _module_name(path: Path, root: Path = LIBRARY) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(root: Path = LIBRARY) -> dict[str, set[str]]:
    """module -> the modules of the same package (the folder `root`: src/gora, or benchmarks) it imports, counting
    every import statement wherever it stands: at the top, inside a function (a lazy import) or under
    `if TYPE_CHECKING:`. `from package import name` is an edge to the submodule when `name` is one, else to the
    package."""
    files = {_module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[module] = {name for name in edges if name in files and name != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a list of modules whose last imports the first), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_import_graph_has_no_cycle_not_even_through_a_lazy_import():
    """Property: the modules under src/gora form an acyclic import graph, counting imports inside functions and under
    TYPE_CHECKING: what two modules both need lives in a module below both, so each module can be read (and tested)
    with only what is below it."""
    graph = _import_graph()
    assert len(graph) > 30 and graph["gora.model"] >= {"gora.estimate", "gora.record"}  # the walk sees the package
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join([*cycle, cycle[0]])


def test_the_benchmarks_import_graph_has_no_cycle():
    """Property (issue #35): benchmarks/ (the suite harness and the studies) is layered like the library: its modules
    form an acyclic import graph, lazy imports included, so a report module can be read without the runner."""
    graph = _import_graph(BENCHMARKS)
    assert graph["benchmarks.harness.report_doc"] >= {
        "benchmarks.harness.report_capacity"
    }  # the walk sees the package
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join([*cycle, cycle[0]])


APP_LAYERS = ("config", "tasks", "run", "commands")  # gora.app's subpackages, each above the ones before it


def _app_layer(module: str) -> int | None:
    """0 for the modules directly in gora.app (errors, assets, parallel), 1.. for the subpackages in APP_LAYERS
    order, None outside the app."""
    parts = module.split(".")
    if parts[:2] != ["gora", "app"] or len(parts) == 2:
        return None
    return APP_LAYERS.index(parts[2]) + 1 if parts[2] in APP_LAYERS else 0


def test_the_app_subpackages_are_layered():
    """Property (issue #35): the app's subpackages import downwards only: config <- tasks <- run <- commands, all on
    the three shared modules directly in gora.app, which import none of them (nor each other): a reader of the task
    kinds never needs the run machinery, nor the run the command line."""
    graph = _import_graph()
    assert {_app_layer(m) for m in graph} >= {0, 1, 2, 3, 4}  # every layer has modules: the walk sees them
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if (lm := _app_layer(m)) is not None
        for d in deps
        if (ld := _app_layer(d)) is not None and (ld > lm or (ld == lm == 0 and m != "gora.app"))
    )
    assert not upward, upward


def test_the_cycle_finder_finds_a_lazy_cycle():
    """Property: the check above can fail: a cycle closed only by an import inside a function is found."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_is_over_500_lines():
    """Property (issues #20, #35): each module of the library and of benchmarks/ stays small enough to read in one
    sitting, one job per module."""
    long = {
        str(path): n
        for root in (LIBRARY, BENCHMARKS)
        for path in root.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert any(BENCHMARKS.rglob("*.py")), BENCHMARKS  # the bound reads the benchmarks, not an empty folder
    assert not long, f"split these modules by responsibility: {long}"
