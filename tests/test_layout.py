"""The package's layout: the library (the method, `gora.*`) never imports the application (`gora.app`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gora

LIBRARY = Path(gora.__file__).parent


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
