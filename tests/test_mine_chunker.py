"""Chunker: zero content loss, budget respected, functions under budget kept whole."""

from __future__ import annotations

import re
import textwrap

import pytest

pytest.importorskip("tree_sitter")

from forged.mine.chunker import analyze, budget_bytes  # noqa: E402


def nws(s: str) -> int:
    return len(re.sub(r"\s", "", s).encode())


def gen_python(n_funcs: int, body_lines: int) -> str:
    out = ['"""Module doc."""', "import os", ""]
    for i in range(n_funcs):
        out.append(f"def func_{i}(a, b) -> int:")
        out.append(f'    """Add things {i}."""')
        out += [f"    x{j} = a + b * {j}  # step {j}" for j in range(body_lines)]
        out += ["    return x0", ""]
    out.append("class Big:")
    out.append('    """A class with many methods."""')
    for i in range(n_funcs):
        out += [f"    def m{i}(self, v):", f"        return v + {i}", ""]
    # An oversized leaf: one string literal far bigger than the budget.
    out.append('BLOB = """' + "\n".join(f"word{i} " * 8 for i in range(400)) + '"""')
    out.append("TAIL = 1")
    return "\n".join(out) + "\n"


SOURCES = {
    "python": ("m.py", gen_python(30, 6)),
    "javascript": ("a.js", "\n".join(
        f"export function f{i}(x) {{\n  const y = x * {i};\n  return y + 1;\n}}\n" for i in range(200))),
    "typescript": ("a.ts", "\n".join(
        f"interface I{i} {{ a: number; b: string }}\nexport const g{i} = (x: number): number => x * {i};\n"
        for i in range(200))),
    "go": ("a.go", "package main\n\n" + "\n".join(
        f"// F{i} doubles.\nfunc (s *Srv) F{i}(x int) int {{\n\treturn x * {i}\n}}\n" for i in range(200))),
    "rust": ("a.rs", "\n".join(
        f"/// r{i}\npub fn r{i}(x: u32) -> u32 {{\n    x + {i}\n}}\n" for i in range(200))),
    "java": ("A.java", "class A {\n" + "\n".join(
        f"  int m{i}(int x) throws Exception {{\n    if (x < 0) throw new IllegalStateException();\n    return x + {i};\n  }}\n"
        for i in range(200)) + "}\n"),
    "markdown": ("R.md", "\n".join(
        f"# Title {i}\n\nSome prose about part {i}.\n\n```\n# not a heading {i}\n```\n" for i in range(200))),
    "rst": ("R.rst", "\n".join(f"Section {i}\n{'=' * 12}\n\nText {i} here.\n" for i in range(200))),
}


@pytest.mark.parametrize("lang", sorted(SOURCES))
@pytest.mark.parametrize("tokens", [24, 96])
def test_retention_and_budget(lang: str, tokens: int) -> None:
    path, src = SOURCES[lang]
    budget = budget_bytes(tokens)
    fa = analyze(path, lang, src.encode(), budget)
    assert len(fa.chunks) > 1
    # Concatenated chunks are the file, byte for byte: no non-whitespace char is lost.
    assert "".join(c.text for c in fa.chunks) == src
    for c in fa.chunks:
        assert nws(c.text) <= budget, (c.start_line, c.text[:80])
        assert 1 <= c.start_line <= c.end_line
        assert c.path == path and c.lang == lang


def test_functions_under_budget_kept_whole() -> None:
    _, src = SOURCES["python"]
    budget = budget_bytes(96)
    fa = analyze("m.py", "python", src.encode(), budget)
    for i in range(30):
        func = re.search(rf"def func_{i}\(.*?return x0\n", src, re.S).group(0)
        assert nws(func) <= budget
        assert any(func in c.text for c in fa.chunks), f"func_{i} was split"


def test_symbols_and_context() -> None:
    src = textwrap.dedent('''
        class Store:
            """Keeps things."""

            def get(self, key: str) -> bytes:
                """Return the value."""
                if key not in self.d:
                    raise KeyError(key)
                return self.d[key]

            def put(self, key, value):
                self.get(key)
    ''') + "\n".join(f"    def pad{i}(self):\n        return {i} * {i}\n" for i in range(40))
    fa = analyze("s.py", "python", src.encode(), budget_bytes(40))
    syms = {s.qualname: s for s in fa.symbols}
    assert syms["Store.get"].returns == "bytes"
    assert syms["Store.get"].raises == ["KeyError"]
    assert syms["Store.get"].doc == "Return the value."
    assert "Return the value" not in syms["Store.get"].code
    assert any(c.caller == "Store.put" and c.callee == "get" for c in fa.calls)
    inner = [c for c in fa.chunks if "def pad" in c.text]
    assert len(inner) > 1
    # Chunks cut out of the class carry its signature; the symbol path starts with it.
    for c in inner:
        assert c.symbol.startswith("Store")
        assert c.context == ([] if "class Store:" in c.text else ["class Store:"])
    assert "# in: class Store:" in inner[0].render()


def test_go_receiver_and_rust_impl() -> None:
    go = "package p\n\ntype T struct{}\n\nfunc (t *T) Run() error { return nil }\n"
    syms = {s.qualname for s in analyze("a.go", "go", go.encode(), 400).symbols}
    assert "T.Run" in syms and "T" in syms
    rs = "struct S;\nimpl S {\n    pub fn new() -> S { S }\n}\n"
    syms = {s.qualname: s for s in analyze("a.rs", "rust", rs.encode(), 400).symbols}
    assert syms["S.new"].returns == "S"


def test_calls_in_source_order_on_every_parse() -> None:
    # py-tree-sitter's capture lists are not in source order and differ between two parses
    # of one text; the facts of a file must not (two cold mines would differ).
    src = "\n".join(f"def f{i}():\n    a{i}(1)\n    b{i}(2)\n    raise E{i}()\n" for i in range(40))
    first = analyze("m.py", "python", src.encode(), budget_bytes(384))
    assert [(c.line, c.callee) for c in first.calls] == sorted((c.line, c.callee) for c in first.calls)
    for _ in range(3):
        again = analyze("m.py", "python", src.encode(), budget_bytes(384))
        assert again.to_dict() == first.to_dict()
