"""The two processes stay apart in the tree: the daemon never imports the worker.

``forged/daemon`` and ``forged/common`` may import each other and the standard library
and light dependencies; they must not import ``forged.worker`` (the heavy stages) nor an
ML library. The worker may import ``common`` but not the daemon. Checked statically
(every import statement, including those inside functions) so a lazy import cannot
hide, and at run time by ``test_daemon_imports_no_ml_libraries``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "forged"
ML = {"torch", "transformers", "peft", "mlx", "mlx_lm", "numpy", "gguf", "tree_sitter", "llama_cpp",
      "detect_secrets", "bm25s", "safetensors"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return found


def violations(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in sorted((ROOT / folder).rglob("*.py")):
        for line, mod in imported_modules(f):
            top = mod.split(".")[0]
            if mod.startswith(forbidden) or top in ML:
                bad.append(f"{f.relative_to(ROOT.parent)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("folder", ["daemon", "common"])
def test_daemon_side_never_imports_the_worker_or_ml(folder: str) -> None:
    assert violations(folder, ("forged.worker",)) == []


def test_worker_never_imports_the_daemon() -> None:
    bad = [v for v in violations("worker", ("forged.daemon",)) if "forged.daemon" in v]
    assert bad == []


def test_the_rule_sees_a_lazy_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: an import of the worker inside a daemon function is caught."""
    fake = tmp_path / "forged"
    (fake / "daemon").mkdir(parents=True)
    (fake / "daemon" / "x.py").write_text("def f():\n    from forged.worker.train import train\n    from ..worker import main\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    assert violations("daemon", ("forged.worker",)) == [
        "forged/daemon/x.py:2 imports forged.worker.train",
        "forged/daemon/x.py:2 imports forged.worker.train.train",
        "forged/daemon/x.py:3 imports forged.worker",
        "forged/daemon/x.py:3 imports forged.worker.main",
    ]


def test_checkout_root_is_the_repository() -> None:
    """`make run` forges this checkout and keeps its state beside it: both come from here."""
    from forged.common import paths

    assert paths.checkout_root() == ROOT.parent
