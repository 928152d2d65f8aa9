"""Chunker: zero content loss, budget respected, functions under budget kept whole."""

from __future__ import annotations

import re
import textwrap

import pytest

pytest.importorskip("tree_sitter")

from forged.worker.mine.chunker import analyze, budget_bytes, parser_for  # noqa: E402


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


# Brace languages: a class or function body split over chunks. The bench's parse rule: a
# chunk parses alone, or (methods being complete units of a class body) inside a class/impl.
_WRAP = {"java": ("class _ {\n", "\n}"), "javascript": ("class _ {\n", "\n}"),
         "typescript": ("class _ {\n", "\n}"), "rust": ("impl _ {\n", "\n}"), "go": ("", "")}


def _parses(lang: str, text: str) -> bool:
    parser = parser_for(lang)
    if not parser.parse(text.encode()).root_node.has_error:
        return True
    pre, post = _WRAP[lang]
    return bool(pre) and not parser.parse((pre + text + post).encode()).root_node.has_error


def _sums(indent: str, end: str) -> str:
    return "".join(f"{indent}s += xs[{i}] * {i + 1}{end}\n" for i in range(24))


_JS_CLASS = ("class Shapes {\n  area(w, h) {\n    return w * h;\n  }\n\n  total(xs) {\n    let s = 0;\n"
             + _sums("    ", ";") + "    return s;\n  }\n\n  twice(y) {\n    return 2 * y;\n  }\n}\n")
SPLIT_BODIES = {
    "java": ("class Shapes {\n    private int count = 0;\n\n"
             "    int area(int w, int h) {\n        return w * h;\n    }\n\n"
             "    int total(int[] xs) {\n        int s = 0;\n" + _sums("        ", ";")
             + "        return s;\n    }\n\n    int twice(int y) {\n        return 2 * y;\n    }\n}\n"),
    "javascript": _JS_CLASS,
    "typescript": _JS_CLASS,
    "rust": ("struct Shapes;\n\nimpl Shapes {\n    fn area(w: u32, h: u32) -> u32 {\n        w * h\n    }\n\n"
             "    fn total(xs: &[u32]) -> u32 {\n        let mut s = 0;\n" + _sums("        ", ";")
             + "        s\n    }\n\n    fn twice(y: u32) -> u32 {\n        2 * y\n    }\n}\n"),
    "go": ("package shapes\n\nfunc Area(w, h int) int {\n\treturn w * h\n}\n\n"
           "func Total(xs []int) int {\n\ts := 0\n" + _sums("\t", "")
           + "\treturn s\n}\n\nfunc Twice(y int) int {\n\treturn 2 * y\n}\n"),
}


@pytest.mark.parametrize("lang", sorted(SPLIT_BODIES))
def test_split_body_breaks_only_where_it_opens_and_closes(lang: str) -> None:
    # A class (Go: a file) around one over-budget method: its `{` must be in one chunk and
    # its `}` in another, so those two cannot parse — and no other chunk may break: the
    # class's and the method's opening go into one chunk (not a chunk of their own each),
    # and the chunks in between hold whole statements.
    src = SPLIT_BODIES[lang]
    chunks = analyze("x", lang, src.encode(), 150).chunks
    assert "".join(c.text for c in chunks) == src
    assert len(chunks) >= 3
    assert all(nws(c.text) <= 150 for c in chunks)
    broken = [i for i, c in enumerate(chunks) if not _parses(lang, c.text)]
    assert broken == [0, len(chunks) - 1], [c.text for c in chunks]


@pytest.mark.parametrize(("lang", "src", "header"), [
    ("java", "class Outer {\n    int a = 1;\n    int b = 2;\n\n"
             "    static final class Inner extends Base implements Runnable {\n"
             + "".join(f"        int f{i}() {{\n            return {i} * {i};\n        }}\n" for i in range(12))
             + "    }\n}\n", "static final class Inner extends Base implements Runnable {"),
    ("rust", "mod outer {\n    const A: u32 = 1;\n\n    impl<T: Clone> Runner for Holder<T>\n"
             "    where\n        T: Send,\n    {\n"
             + "".join(f"        fn f{i}(&self) -> u32 {{\n            {i} * {i}\n        }}\n" for i in range(12))
             + "    }\n}\n", "impl<T: Clone> Runner for Holder<T>\n    where\n        T: Send,\n    {"),
])
def test_split_body_keeps_its_header_with_the_brace(lang: str, src: str, header: str) -> None:
    # The header of a split class/impl goes with its `{` (no chunk starts with a bare `{`),
    # so the chunks of its body are whole members.
    for budget in (100, 150, 200):
        chunks = analyze("x", lang, src.encode(), budget).chunks
        assert "".join(c.text for c in chunks) == src
        assert any(header in c.text for c in chunks), (budget, [c.text for c in chunks])
        assert not any(c.text.lstrip().startswith("{") for c in chunks)


def test_split_list_cut_after_separators() -> None:
    src = "const TABLE = [\n" + "".join(f"  {{ id: {i}, name: 'item{i}' }},\n" for i in range(40)) + "];\n"
    for budget in (100, 200):
        chunks = analyze("t.js", "javascript", src.encode(), budget).chunks
        assert "".join(c.text for c in chunks) == src
        assert not any(c.text.lstrip().startswith(",") for c in chunks)


# ---------------------------------------------------------------------- broken input


def test_a_syntax_error_neither_raises_nor_loses_the_file() -> None:
    """`def f(:` makes the function body an ERROR node with no children."""
    from forged.worker.mine.chunker import chunk_code, symbols_of

    data = b"def g():\n    '''Doc.'''\n    return 2\n\ndef f(:\n"
    chunks, tree = chunk_code("x.py", "python", data, budget_bytes(96))
    symbols, _calls = symbols_of(tree, "python", data, budget_bytes(96))
    assert "".join(c.text for c in chunks) == data.decode()
    assert {s.name: s.doc for s in symbols} == {"g": "Doc.", "f": ""}


def test_analyze_falls_back_to_text_when_the_syntax_code_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from forged.worker.mine import chunker

    def broken(*a: object) -> None:
        raise RecursionError("deep")

    monkeypatch.setattr(chunker, "chunk_code", broken)
    data = b"x = 1\n\n\ny = 2\n"
    fa = analyze("x.py", "python", data, budget_bytes(96))
    assert "".join(c.text for c in fa.chunks).replace("\n", "") == "x = 1y = 2"
    assert fa.symbols == [] and all(c.lang == "python" for c in fa.chunks)


def test_fuzz_truncated_and_edited_files_raise_nothing() -> None:
    """Seeded and bounded: every sample of the seven languages cut every 3rd byte, and 60
    random edits of each (bench/mine/fuzz_chunker.py runs the big one)."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import chunker_fuzz as fz

    samples = [(p, lang, s.encode()) for lang, (p, s) in fz.SAMPLES.items()]
    assert len(samples) == 7
    cut = fz.run(fz.truncations(3), deadline_s=25)
    edits = fz.run(fz.edited(samples, random.Random(16), 60, 8), deadline_s=25)
    assert cut.inputs > 600 and edits.inputs == 420
    assert cut.failures == [] and edits.failures == []
