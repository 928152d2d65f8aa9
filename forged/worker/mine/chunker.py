"""cAST-style chunking with tree-sitter, plus the per-file symbol facts the examples need.

Budget unit: **non-whitespace bytes** of a chunk's source text (the unit cAST and
astchunk use). It is tokenizer-free, so a chunk's size does not change when the base
model changes, and it ignores indentation, which costs few tokens in BPE vocabularies.
``chunk_tokens`` from the config is turned into it with :data:`NWS_PER_TOKEN`.

Algorithm (per file): a node that fits the budget is one atom; a node over it is split
into its children recursively; an over-budget node without children is split by lines
(and an over-budget line by bytes). Python: sibling atoms are merged greedily back up to
the budget, level by level. Brace languages: the atoms of the whole file are cut in one
pass (:meth:`_Chunker.plan`) into the fewest chunks that cannot parse, then the fewest
chunks — a run of statements/members of one block or class body parses, a chunk holding
a split body's `{` or `}` cannot, so those go together — with a split construct's header
glued to its `{`. Chunk boundaries are then made contiguous over the whole file, so the
chunks of a file concatenate back to the file byte for byte: nothing is ever dropped.

Everything here runs in the worker subprocess; tree_sitter is imported lazily.
"""

from __future__ import annotations

import re
import sys
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

# Bump when chunk boundaries, symbol facts, redaction or content skips change: the cache is
# keyed by it.
CHUNKER_VERSION = "forged-cast-7"

# chunk_tokens × this = budget in non-whitespace bytes. Measured with the SmolLM2
# tokenizer on Python (click, httpx): ~3.1 non-whitespace bytes per token.
NWS_PER_TOKEN = 3.0

_NUMPY_BYTES = 32_768  # files at least this big get numpy tables (imported on first use:
# a re-mine that parses one small blob never imports numpy)
# byte → 1 when not whitespace (translate table)
_NWS_BYTES = bytes(0 if b in (9, 10, 11, 12, 13, 32) else 1 for b in range(256))
_WS_CHARS = b" \t\n\r\x0b\x0c"  # deleted by translate: what is left counts against the budget

COMMENT_TYPES = frozenset({"comment", "line_comment", "block_comment"})

# Definition node type → kind, per language.
DEF_TYPES: dict[str, dict[str, str]] = {
    "python": {"function_definition": "function", "class_definition": "class"},
    "javascript": {
        "function_declaration": "function", "generator_function_declaration": "function",
        "class_declaration": "class", "method_definition": "method",
    },
    "typescript": {
        "function_declaration": "function", "generator_function_declaration": "function",
        "class_declaration": "class", "abstract_class_declaration": "class",
        "method_definition": "method", "interface_declaration": "interface",
        "enum_declaration": "enum", "type_alias_declaration": "type", "internal_module": "module",
        "abstract_method_signature": "method",
    },
    "go": {"function_declaration": "function", "method_declaration": "method", "type_spec": "type"},
    "rust": {
        "function_item": "function", "impl_item": "impl", "struct_item": "struct",
        "enum_item": "enum", "trait_item": "trait", "mod_item": "module",
        "function_signature_item": "function",
    },
    "java": {
        "class_declaration": "class", "interface_declaration": "interface",
        "enum_declaration": "enum", "record_declaration": "record",
        "method_declaration": "method", "constructor_declaration": "constructor",
    },
}
DEF_TYPES["tsx"] = DEF_TYPES["typescript"]

# Where each language's functions keep their return type.
RETURN_FIELD = {"python": "return_type", "typescript": "return_type", "tsx": "return_type",
                "go": "result", "rust": "return_type", "java": "type"}
CALL_QUERY = {
    "python": "(call function: [(identifier) @callee (attribute attribute: (identifier) @callee)])",
    "javascript": "(call_expression function: [(identifier) @callee (member_expression property: (property_identifier) @callee)])",
    "go": "(call_expression function: [(identifier) @callee (selector_expression field: (field_identifier) @callee)])",
    "rust": "(call_expression function: [(identifier) @callee (field_expression field: (field_identifier) @callee) (scoped_identifier name: (identifier) @callee)])",
    "java": "(method_invocation name: (identifier) @callee)",
}
CALL_QUERY["typescript"] = CALL_QUERY["tsx"] = CALL_QUERY["javascript"]
RAISE_QUERY = {
    "python": "(raise_statement) @raise",
    "javascript": "(throw_statement) @raise",
    "java": "(throw_statement) @raise",
}
RAISE_QUERY["typescript"] = RAISE_QUERY["tsx"] = RAISE_QUERY["javascript"]
COMMENT_PREFIX = {"python": "#", "markdown": None, "rst": None}

_parsers: dict[str, Any] = {}
_queries: dict[tuple[str, str], Any] = {}


def _language(lang: str) -> Any:
    import tree_sitter as ts

    if lang == "python":
        import tree_sitter_python as m

        return ts.Language(m.language())
    if lang == "javascript":
        import tree_sitter_javascript as m

        return ts.Language(m.language())
    if lang in ("typescript", "tsx"):
        import tree_sitter_typescript as m

        return ts.Language(m.language_tsx() if lang == "tsx" else m.language_typescript())
    if lang == "go":
        import tree_sitter_go as m

        return ts.Language(m.language())
    if lang == "rust":
        import tree_sitter_rust as m

        return ts.Language(m.language())
    if lang == "java":
        import tree_sitter_java as m

        return ts.Language(m.language())
    raise ValueError(f"no tree-sitter grammar for language {lang!r}")


def parser_for(lang: str) -> Any:
    """A cached tree-sitter parser for a language name of :mod:`forged.filters`."""
    if lang not in _parsers:
        import tree_sitter as ts

        _parsers[lang] = ts.Parser(_language(lang))
    return _parsers[lang]


def _query(lang: str, src: str) -> Any:
    key = (lang, src)
    if key not in _queries:
        import tree_sitter as ts

        _queries[key] = ts.QueryCursor(ts.Query(_language(lang), src))
    return _queries[key]


@dataclass
class Chunk:
    """A contiguous slice of one file, at most the budget, with what it needs to stand alone."""

    path: str
    lang: str
    symbol: str  # enclosing symbol path, e.g. "Client.send"; "" at module level
    start_line: int  # 1-based, inclusive
    end_line: int
    text: str  # the exact (redacted) source slice
    context: list[str] = field(default_factory=list)  # signatures of enclosing defs not in text
    blob: str = ""

    def render(self) -> str:
        """Path header, enclosing signatures, then the code: readable on its own."""
        pre = COMMENT_PREFIX.get(self.lang, "//")
        pre = "#" if self.lang == "python" else pre
        lines = [f"{pre} path: {self.path}" if pre else f"<!-- path: {self.path} -->"]
        for sig in self.context:
            lines.append(f"{pre} in: {sig}" if pre else f"<!-- in: {sig} -->")
        return "\n".join(lines) + "\n" + self.text.strip("\n").rstrip() + "\n"


@dataclass
class Symbol:
    """A definition with the exact facts symbol questions are asked about."""

    name: str
    qualname: str
    kind: str
    line: int
    end_line: int
    signature: str  # the definition's first line, verbatim
    returns: str = ""  # declared return type, verbatim
    raises: list[str] = field(default_factory=list)  # exception types raised/thrown directly
    doc: str = ""  # docstring or leading comment, without comment markers
    code: str = ""  # the definition's text without its docstring (only when doc and small)


@dataclass
class Call:
    caller: str  # qualname of the enclosing definition
    callee: str  # bare name called
    line: int


@dataclass
class FileAnalysis:
    chunks: list[Chunk]
    symbols: list[Symbol]
    calls: list[Call]

    def to_dict(self) -> dict[str, Any]:
        # vars() rather than asdict(): no deep copies, this runs for every chunk of a repo.
        return {"chunks": [vars(c) for c in self.chunks],
                "symbols": [vars(s) for s in self.symbols],
                "calls": [vars(c) for c in self.calls]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileAnalysis:
        return cls([Chunk(**c) for c in d["chunks"]], [Symbol(**s) for s in d["symbols"]],
                   [Call(**c) for c in d["calls"]])


def nws_bytes(text: str) -> int:
    """Non-whitespace UTF-8 bytes of ``text``: what the chunk budget counts."""
    return len(text.encode("utf-8").translate(None, _WS_CHARS))


def budget_bytes(chunk_tokens: int) -> int:
    return max(16, int(chunk_tokens * NWS_PER_TOKEN))


# ---------------------------------------------------------------------------- spans


class _Text:
    """A file as bytes with O(1) non-whitespace counts (prefix sums) and line lookups."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._newlines: Any = None
        if len(data) < _NUMPY_BYTES and "numpy" not in sys.modules:
            # Small files (the one blob a re-mine parses): plain Python, no numpy import.
            self.cum: Any = list(accumulate(data.translate(_NWS_BYTES), initial=0))
            return
        import numpy as np

        # int32 is enough (files over the size limit are never read) and halves the
        # memory traffic; a memoryview indexes to plain ints at list speed (numpy
        # scalars are ~10x slower), and bisect works on it as on a list.
        cum = np.empty(len(data) + 1, dtype=np.int32)
        cum[0] = 0
        np.cumsum(np.frombuffer(data.translate(_NWS_BYTES), dtype=np.uint8), out=cum[1:])
        self.cum = memoryview(cum)

    @property
    def newlines(self) -> Any:
        """Newline offsets, made on first use (only cutting by lines needs them)."""
        if self._newlines is None:
            data = self.data
            if "numpy" in sys.modules:
                import numpy as np

                nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10).astype(np.int32)
                self._newlines = memoryview(nl)
            else:  # from the line lengths: C loops only, no per-byte Python
                self._newlines = list(accumulate(
                    map((1).__add__, map(len, data.split(b"\n")[:-1])), initial=-1))[1:]
        return self._newlines

    def nws(self, s: int, e: int) -> int:
        return int(self.cum[e] - self.cum[s])

    def line_start(self, b: int) -> int:
        return self.data.rfind(b"\n", 0, b) + 1

    def split_lines(self, s: int, e: int, budget: int) -> list[int]:
        """Cut points strictly inside (s, e) so each piece fits: at newlines, else inside a line."""
        cuts: list[int] = []
        start = s
        nl, cum, data = self.newlines, self.cum, self.data
        while cum[e] - cum[start] > budget:
            # x: the furthest offset with nws(start, x) <= budget (cum never decreases);
            # x < e since [start, e) is over budget.
            x = bisect_right(cum, cum[start] + budget, start, e + 1) - 1
            # Furthest line end that keeps [start, cut) within budget.
            k = bisect_right(nl, x - 1) - 1
            if k >= 0 and nl[k] >= start:
                cut = nl[k] + 1
            else:  # one line alone is over budget: cut it by bytes at a UTF-8 boundary
                cut = x
                while cut > start and (data[cut] & 0xC0) == 0x80:
                    cut -= 1
                if cut <= start:  # pathological; never loop forever
                    cut = start + 1
                    while cut < e and (data[cut] & 0xC0) == 0x80:
                        cut += 1
            cuts.append(cut)
            start = cut
        return cuts


# A piece of a file while chunking: (start, end, scope, defs, comment) — scope is the
# enclosing (name, signature, def start byte) from outside in, defs the names of whole
# definitions inside. Plain tuples: the chunker makes one per child of every over-budget
# node, and tuples cost a fraction of objects.
_Piece = tuple[int, int, tuple[tuple[str, str, int], ...], tuple[str, ...], bool]


def _common(a: tuple, b: tuple) -> tuple:
    if a is b:
        return a
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return a[:n]


# ------------------------------------------------------------------ definitions


def _unwrap(node: Any, lang: str) -> Any:
    """The definition node a statement stands for (decorators, export, const f = () => …)."""
    t = node.type
    if t == "decorated_definition":
        return node.child_by_field_name("definition") or node
    if t == "export_statement":
        d = node.child_by_field_name("declaration")
        return _unwrap(d, lang) if d is not None else node
    if t in ("lexical_declaration", "variable_declaration"):
        decls = [c for c in node.named_children if c.type == "variable_declarator"]
        if len(decls) == 1:
            v = decls[0].child_by_field_name("value")
            if v is not None and v.type in ("arrow_function", "function_expression", "function", "class"):
                return decls[0]
    if t == "type_declaration" and lang == "go":
        specs = [c for c in node.named_children if c.type == "type_spec"]
        if len(specs) == 1:
            return specs[0]
    return node


_WRAPPERS = frozenset({"decorated_definition", "export_statement", "lexical_declaration",
                       "variable_declaration", "type_declaration"})


def _def_kind(node: Any, lang: str) -> str | None:
    if node.type == "variable_declarator":
        return "function"
    return DEF_TYPES.get(lang, {}).get(node.type)


def _def_name(node: Any, lang: str, data: bytes) -> str:
    if node.type == "impl_item":
        n = node.child_by_field_name("type")
    else:
        n = node.child_by_field_name("name")
    if n is None:
        return ""
    name = data[n.start_byte:n.end_byte].decode("utf-8", "replace")
    if node.type == "method_declaration" and lang == "go":
        recv = node.child_by_field_name("receiver")
        if recv is not None:
            m = re.search(rb"([A-Za-z_]\w*)(\[[^\]]*\])?\s*\)\s*$", data[recv.start_byte:recv.end_byte])
            if m:
                name = m.group(1).decode() + "." + name
    return name


def _signature(node: Any, data: bytes) -> str:
    """The definition's header: from its start to its body, first line only, verbatim."""
    body = node.child_by_field_name("body")
    end = body.start_byte if body is not None and body.start_byte > node.start_byte else node.end_byte
    head = data[node.start_byte:end].decode("utf-8", "replace")
    first = head.split("\n", 1)[0].rstrip()
    return first[:200]


# --------------------------------------------------------------------- chunking


@dataclass(frozen=True)
class _Kinds:
    """A grammar's node kind ids for what the chunker looks at: one int compare per child
    instead of building the node's type string (several kind ids can share one name)."""

    wrappers: frozenset[int]
    comments: frozenset[int]
    defs: dict[int, str]  # kind id → definition kind
    seqs: frozenset[int] = frozenset()  # containers whose named children are complete units
    anon: frozenset[int] = frozenset()  # anonymous kinds (punctuation, keywords)
    seps: frozenset[int] = frozenset()  # `,` and `;`
    special: frozenset[int] = frozenset()  # wrappers, comments or definitions

    def __post_init__(self) -> None:
        object.__setattr__(self, "special", self.wrappers | self.comments | frozenset(self.defs))


_kinds: dict[str, _Kinds] = {}

# Brace languages: containers whose named children are complete units one after another
# (statements, members, items): a chunk holding only such siblings of one container parses
# (a class body's members inside a class). Go's `block` is `{ statement_list }`.
SEQ_TYPES: dict[str, tuple[str, ...]] = {
    "javascript": ("program", "statement_block", "class_body"),
    "typescript": ("program", "statement_block", "class_body", "interface_body"),
    "go": ("source_file", "statement_list"),
    "rust": ("source_file", "declaration_list", "block"),
    "java": ("program", "class_body", "block", "interface_body", "constructor_body",
             "enum_body_declarations", "annotation_type_body"),
}
SEQ_TYPES["tsx"] = SEQ_TYPES["typescript"]
# What a chunk that cannot parse costs the planner, in chunks: it first makes the fewest
# such chunks, then the fewest chunks.
FAIL_WEIGHT = 1000


def _kinds_for(lang: str) -> _Kinds:
    if lang not in _kinds:
        lg = parser_for(lang).language
        ids: dict[str, list[int]] = {}
        for i in range(lg.node_kind_count):
            name = lg.node_kind_for_id(i)
            if name is not None:
                ids.setdefault(name, []).append(i)
        defs = {i: kind for ty, kind in DEF_TYPES.get(lang, {}).items() for i in ids.get(ty, ())}
        # A declarator reached by unwrapping `const f = () => …` is a function definition.
        defs.update((i, "function") for i in ids.get("variable_declarator", ()))
        _kinds[lang] = _Kinds(frozenset(i for ty in _WRAPPERS for i in ids.get(ty, ())),
                              frozenset(i for ty in COMMENT_TYPES for i in ids.get(ty, ())), defs,
                              frozenset(i for ty in SEQ_TYPES.get(lang, ()) for i in ids.get(ty, ())),
                              frozenset(i for i in range(lg.node_kind_count) if not lg.node_kind_is_named(i)),
                              frozenset(i for ty in (",", ";") for i in ids.get(ty, ())
                                        if not lg.node_kind_is_named(i)))
    return _kinds[lang]


class _Chunker:
    def __init__(self, text: _Text, lang: str, budget: int) -> None:
        self.t = text
        self.lang = lang
        self.budget = budget
        self.kinds = _kinds_for(lang)

    def definition(self, child: Any, k: int) -> tuple[Any, str]:
        """The node a child of kind ``k`` stands for (through export/decorator/declaration
        wrappers) and, when that is a definition, its name ("" otherwise)."""
        kinds = self.kinds
        if k in kinds.wrappers:
            d = _unwrap(child, self.lang)
            kind = kinds.defs.get(d.kind_id) if d is not child else None
        else:
            d, kind = child, kinds.defs.get(k)
        return d, _def_name(d, self.lang, self.t.data) if kind else ""

    def pieces(self, root: Any) -> list[_Piece]:
        if self.kinds.seqs:
            atoms: list[tuple] = []
            self.ncont = 0
            self.glued: list[int] = []
            self.named: list[tuple[int, str]] = []
            self.collect(root, (), atoms)
            return self.plan(atoms)
        return self.split(root, ())[0]

    def collect(self, node: Any, scope: tuple, out: list) -> None:
        """Atoms of an over-budget node in file order, flat: (start, end, scope, key, nws
        offset of start, of end). key: the id of the container when the atom is one of its
        complete units (statement, member, item, comment), else -1. Also notes comments
        and headers to glue onto what follows, and where whole definitions start."""
        children = node.children
        if not children:
            cuts = self.t.split_lines(node.start_byte, node.end_byte, self.budget)
            bounds = [node.start_byte, *cuts, node.end_byte]
            cum = self.t.cum
            out.extend((a, b, scope, -1, cum[a], cum[b])
                       for a, b in zip(bounds, bounds[1:], strict=False))
            return
        cum = self.t.cum
        budget = self.budget
        kinds = self.kinds
        comments, anon, seps = kinds.comments, kinds.anon, kinds.seps
        data = self.t.data
        key = -1
        if node.kind_id in kinds.seqs:
            key = self.ncont = self.ncont + 1
        glued = self.glued
        run = len(out)
        append = out.append
        for child in children:
            s, e = child.start_byte, child.end_byte
            if e <= s:
                continue
            k = child.kind_id
            d, name = self.definition(child, k)
            cs, ce = cum[s], cum[e]
            if ce - cs <= budget:
                if k in anon:
                    if k in seps and len(out) > run:
                        # A `,` or `;` stays with what it follows: no chunk starts with one.
                        a = out[-1]
                        out[-1] = (a[0], e, a[2], a[3], a[4], ce)
                    else:
                        append((s, e, scope, -1, cs, ce))
                    continue
                if name:
                    self.named.append((s, name))
                if k in comments:
                    x = len(out)
                    if x > run and glued and glued[-1] == x - 1 and ce - out[-1][4] <= budget:
                        # One atom for a run of comments (`//` lines) that fits.
                        a = out[-1]
                        out[-1] = (a[0], e, a[2], a[3], a[4], ce)
                        continue
                    glued.append(x)
                append((s, e, scope, key, cs, ce))
                continue
            if key < 0 and run < len(out) and child.child_count and (
                    k not in kinds.seqs or child.children[0].kind_id in anon):
                # What precedes a split part of a construct (its header: `class A`,
                # `if (x)`, `else`) is glued onto that part's start (its `{`); not onto a
                # unit (Go: a block's `{` and its first statement) nor onto a slice of an
                # over-budget token.
                while glued and glued[-1] >= run:
                    glued.pop()
                glued.extend(range(run, len(out)))
            inner = scope + ((name, _signature(d, data), s),) if name else scope
            self.collect(child, inner, out)
            run = len(out)

    def plan(self, atoms: list[tuple]) -> list[_Piece]:
        """Cut the flat atoms into chunks within the budget: fewest chunks that are not a
        run of complete units of one container, then fewest chunks (a dynamic program)."""
        if not atoms:
            return []
        if self.glued:
            atoms = self._glue(atoms)
        return self._pieces(atoms, self._cuts(atoms))

    def _glue(self, atoms: list[tuple]) -> list[tuple]:
        """Glue each run of glued atoms onto the atom after it, packed from that atom
        backwards while it fits: a header goes with its `{`, a doc comment with what it
        documents. A run of atoms in file order has the common scope of its first and
        last (scopes are paths in the syntax tree)."""
        fits, n, gi = self.budget, len(atoms), self.glued
        out: list[tuple] = []
        prev = 0
        ng = len(gi)
        x = 0
        while x < ng:
            p = q = gi[x]
            x += 1
            while x < ng and gi[x] == q + 1:
                q += 1
                x += 1
            t = q + 1 if q + 1 < n else q
            out.extend(atoms[prev:p])
            if p == q and t > q:  # one atom, the common case: a doc comment
                a, b = atoms[p], atoms[t]
                if b[5] - a[4] <= fits:
                    out.append((a[0], b[1], a[2] if a[2] is b[2] else _common(a[2], b[2]),
                                a[3] if a[3] == b[3] else -1, a[4], b[5]))
                else:
                    out.append(a)
                    out.append(b)
                prev = t + 1
                continue
            groups = []
            last = atoms[t]
            ge, key = t, last[3]
            for m in range(t - 1, p - 1, -1):
                a = atoms[m]
                if last[5] - a[4] > fits:
                    groups.append((m + 1, ge, key))
                    last, ge, key = a, m, a[3]
                elif a[3] != key:
                    key = -1
            groups.append((p, ge, key))
            for gs, ge, key in reversed(groups):
                if gs == ge:
                    out.append(atoms[gs])
                else:
                    a, b = atoms[gs], atoms[ge]
                    out.append((a[0], b[1], a[2] if a[2] is b[2] else _common(a[2], b[2]),
                                key, a[4], b[5]))
            prev = t + 1
        out.extend(atoms[prev:])
        return out

    def _cuts(self, atoms: list[tuple]) -> list[int]:
        """nxt[i]: the last atom of the best chunk that starts at atom i."""
        fits, n = self.budget, len(atoms)
        # best[i]: cost of atoms i.. (a chunk is 1, a chunk that cannot parse 1 + FAIL_WEIGHT).
        # best only grows towards the start, so of the chunks starting at i only two can be best: the longest that fits,
        # and the longest run of complete units of i's container that fits.
        fail = 1 + FAIL_WEIGHT
        best = [0] * (n + 1)
        nxt = [0] * n
        j = n - 1
        ej = atoms[j][5]
        rend = rkey = -1
        i = n
        for a in reversed(atoms):
            i -= 1
            lim = a[4] + fits
            while ej > lim:
                j -= 1
                ej = atoms[j][5]
            k = a[3]
            if k < 0:
                best[i] = best[j + 1] + fail
                nxt[i] = j
            else:
                if k != rkey:
                    rend = i
                if rend < j:
                    c = best[rend + 1] + 1
                    f = best[j + 1] + fail
                    if c <= f:
                        best[i] = c
                        nxt[i] = rend
                    else:
                        best[i] = f
                        nxt[i] = j
                else:
                    best[i] = best[j + 1] + 1
                    nxt[i] = j
            rkey = k
        return nxt

    def _pieces(self, atoms: list[tuple], nxt: list[int]) -> list[_Piece]:
        """The chunks from atom i to nxt[i], each with the names it defines."""
        n = len(atoms)
        pieces: list[_Piece] = []
        add = pieces.append
        named = self.named
        nd = len(named)
        w = 0
        i = 0
        while i < n:
            j = nxt[i]
            a = atoms[i]
            b = atoms[j]
            end = b[1]
            defs: tuple = ()
            while w < nd and named[w][0] < end:
                defs += (named[w][1],)
                w += 1
            add((a[0], end, a[2] if a[2] is b[2] else _common(a[2], b[2]), defs, False))
            i = j + 1
        return pieces

    def split(self, node: Any, scope: tuple) -> tuple[list[_Piece], bool]:
        """Pieces of an over-budget node (its children recursively, greedily merged), and
        whether any of them is a comment."""
        children = node.children
        if not children:
            cuts = self.t.split_lines(node.start_byte, node.end_byte, self.budget)
            bounds = [node.start_byte, *cuts, node.end_byte]
            return [(a, b, scope, (), False) for a, b in zip(bounds, bounds[1:], strict=False)], False
        cum = self.t.cum
        budget = self.budget
        kinds = self.kinds
        comments, special = kinds.comments, kinds.special
        data = self.t.data
        atoms: list[_Piece] = []
        has_comment = False
        for child in children:
            s, e = child.start_byte, child.end_byte
            if e <= s:
                continue  # zero-width (MISSING) nodes carry no text
            k = child.kind_id
            if k not in special and (e - s <= budget or cum[e] - cum[s] <= budget):
                # Most children: no definition, no comment, within the budget (a span of
                # at most `budget` bytes cannot hold more non-whitespace bytes than that).
                atoms.append((s, e, scope, (), False))
                continue
            d, name = self.definition(child, k)
            if cum[e] - cum[s] <= budget:
                comment = k in comments
                has_comment = has_comment or comment
                atoms.append((s, e, scope, (name,) if name else (), comment))
            else:
                inner = scope + ((name, _signature(d, data), s),) if name else scope
                got, com = self.split(child, inner)
                has_comment = has_comment or com
                atoms.extend(got)
        return self.merge(atoms, has_comment), has_comment

    def merge(self, atoms: list[_Piece], has_comment: bool = True) -> list[_Piece]:
        fits = self.budget
        cum = self.t.cum
        # Glue comment runs onto the atom they precede (the doc above a function) when that
        # fits, so greedy merging cannot leave a function's comment with the previous chunk.
        glued: list[tuple] = atoms
        if has_comment:
            glued = []
            g: tuple | None = None
            for a in atoms:
                if g is not None and g[4] and cum[a[1]] - cum[g[0]] <= fits:
                    g = (g[0], a[1], _common(g[2], a[2]), g[3] + a[3], a[4])
                    glued[-1] = g
                else:
                    glued.append(a)
                    g = a
        out: list[tuple] = []
        cur: tuple | None = None
        for a in glued:
            if cur is not None and cum[a[1]] - cum[cur[0]] <= fits:
                sc = cur[2] if cur[2] is a[2] else _common(cur[2], a[2])
                cur = (cur[0], a[1], sc, cur[3] + a[3], cur[4] and a[4])
                continue
            if cur is not None:
                out.append(cur)
            cur = a
        if cur is not None:
            out.append(cur)
        return out


def _finish(t: _Text, pieces: list[_Piece], budget: int, path: str, lang: str,
            scope_symbol: bool = True) -> list[Chunk]:
    """Make piece boundaries contiguous over the file, enforce the budget, build chunks."""
    n = len(t.data)
    starts: list[int] = []
    cum = t.cum
    for p in pieces:
        s = p0 = p[0]
        ls = t.line_start(s)
        # Start at the beginning of the line when only indentation precedes the piece.
        if cum[s] == cum[ls] and (not starts or ls > starts[-1]):
            s = ls
        if starts and s <= starts[-1]:
            s = p0
        starts.append(s)
    if starts:
        starts[0] = 0
    bounds: list[tuple[int, int, _Piece | None]] = []
    for i, p in enumerate(pieces):
        e = starts[i + 1] if i + 1 < len(pieces) else n
        bounds.append((starts[i], e, p))
    if not bounds and n:
        bounds = [(0, n, None)]
    chunks: list[Chunk] = []
    data = t.data
    pos, line = 0, 1  # line number of byte offset pos
    for s, e, p in bounds:
        # Gaps between siblings are whitespace in every grammar we ship, but enforce the
        # budget anyway: a span over it is cut by lines.
        cuts = t.split_lines(s, e, budget) if t.nws(s, e) > budget else []
        edges = [s, *cuts, e]
        for a, b in zip(edges, edges[1:], strict=False):
            if t.nws(a, b) == 0 and chunks:
                # Whitespace only: append to the previous chunk so nothing is lost.
                prev = chunks[-1]
                prev.text += t.data[a:b].decode("utf-8")
                continue
            scope = p[2] if p is not None else ()
            names = [x[0] for x in scope]
            if scope_symbol and p is not None and len(p[3]) == 1 and not cuts:
                names.append(p[3][0])
            context = [sig for (_n, sig, ds) in scope if ds < a]
            text = t.data[a:b].decode("utf-8")
            first, last = _content_span(text, a, b)
            # Lines by counting newlines since the previous lookup: offsets only grow here.
            line += data.count(b"\n", pos, first)
            tail = max(first, last - 1)
            end_line = line + data.count(b"\n", first, tail)
            chunks.append(Chunk(path, lang, ".".join(names), line, end_line, text, context))
            pos, line = tail, end_line
    return chunks


def chunk_code(path: str, lang: str, data: bytes, budget: int) -> tuple[list[Chunk], Any]:
    """Chunks of one source file (and its syntax tree, for the symbol pass)."""
    tree = parser_for(lang).parse(data)
    root = tree.root_node
    if len(data.translate(None, _WS_CHARS)) > budget:
        t = _Text(data)
        return _finish(t, _Chunker(t, lang, budget).pieces(root), budget, path, lang), tree
    # The whole file is one chunk (a third of the files of a typical repo): no tables.
    d = None
    named = [c for c in root.named_children if c.type not in COMMENT_TYPES]
    if len(named) == 1:
        d = _unwrap(named[0], lang)
    name = _def_name(d, lang, data) if d is not None and _def_kind(d, lang) else ""
    text = data.decode("utf-8")
    first, last = _content_span(text, 0, len(data))
    return [Chunk(path, lang, name, data.count(b"\n", 0, first) + 1,
                  data.count(b"\n", 0, max(first, last - 1)) + 1, text, [])], tree


def _content_span(text: str, a: int, b: int) -> tuple[int, int]:
    """Byte offsets of the first non-space of ``text`` (the bytes [a, b) decoded) and just
    past its last: encodes only what strip removes."""
    n = len(text)
    return (a + len(text[:n - len(text.lstrip())].encode()),
            b - len(text[len(text.rstrip()):].encode()))


# ------------------------------------------------------------------------- docs

_MD_HEADING = re.compile(rb"^(#{1,6})[ \t]+(.+?)[ \t#]*$")
_RST_ADORN = re.compile(rb"^([=\-~^\"'`#*+<>:._])\1{2,}[ \t]*$")


def _doc_sections(data: bytes, lang: str) -> list[tuple[int, str]]:
    """(byte offset, heading) of each section start."""
    lines = data.split(b"\n")
    offs, pos = [], 0
    for ln in lines:
        offs.append(pos)
        pos += len(ln) + 1
    out: list[tuple[int, str]] = []
    fence = None
    for i, ln in enumerate(lines):
        s = ln.strip()
        if lang == "markdown":
            if s.startswith((b"```", b"~~~")):
                fence = None if fence and s.startswith(fence) else (fence or s[:3])
                continue
            if fence:
                continue
            m = _MD_HEADING.match(ln.rstrip(b"\r"))
            if m:
                out.append((offs[i], m.group(2).decode("utf-8", "replace")))
        else:  # reST: a title line underlined (and maybe overlined) by one repeated mark
            if (i + 1 < len(lines) and s and not _RST_ADORN.match(ln.rstrip())
                    and _RST_ADORN.match(lines[i + 1].rstrip())
                    and len(lines[i + 1].rstrip()) >= len(ln.rstrip())):
                start = i - 1 if i > 0 and _RST_ADORN.match(lines[i - 1].rstrip()) else i
                out.append((offs[start], s.decode("utf-8", "replace")))
    return out


def chunk_doc(path: str, lang: str, data: bytes, budget: int, headings: bool = True) -> list[Chunk]:
    """Markdown/reST: sections by heading, merged up to the budget; big ones by paragraph.

    ``headings=False`` is plain text (paragraphs, then lines): the fallback for a code file
    the syntax-aware chunker fails on."""
    t = _Text(data)
    heads = _doc_sections(data, lang) if headings else []
    starts = [0] + [o for o, _ in heads if o > 0]
    titles = {o: h for o, h in heads}
    bounds = list(zip(starts, [*starts[1:], len(data)], strict=False))
    atoms: list[_Piece] = []
    for s, e in bounds:
        sym = ((titles.get(s, ""), "", s),) if titles.get(s) else ()
        if t.nws(s, e) <= budget:
            atoms.append((s, e, sym, (), False))
            continue
        # Paragraphs (blank-line separated), then lines.
        paras = [m.end() for m in re.finditer(rb"\n[ \t]*\n", data[s:e])]
        edges = [s] + [s + p for p in paras if s + p < e] + [e]
        for a, b in zip(edges, edges[1:], strict=False):
            cuts = t.split_lines(a, b, budget)
            ed = [a, *cuts, b]
            atoms.extend((x, y, sym, (), False) for x, y in zip(ed, ed[1:], strict=False))
    merged: list[_Piece] = []
    for a in atoms:
        if merged and t.nws(merged[-1][0], a[1]) <= budget:
            m = merged[-1]
            merged[-1] = (m[0], a[1], m[2] or a[2], (), False)
        else:
            merged.append(a)
    chunks = _finish(t, merged, budget, path, lang)
    for c in chunks:
        c.context = []
    return chunks


# ---------------------------------------------------------------------- symbols


def _docstring(node: Any, lang: str, data: bytes) -> tuple[str, tuple[int, int] | None]:
    """(doc text, byte span of the docstring statement inside the node) — or ("", None)."""
    if lang == "python":
        body = node.child_by_field_name("body")
        # A body tree-sitter could not parse (`def f(:`) is an ERROR node with no children.
        first = body.named_children[0] if body is not None and body.named_child_count else None
        if first is not None and first.type == "expression_statement" and first.named_child_count:
            inner = first.named_children[0]
            if inner is not None and inner.type == "string":
                raw = data[first.start_byte:first.end_byte].decode("utf-8", "replace")
                m = _PY_DOC.match(raw)
                if m:
                    return _clean_doc(m.group(2)), (first.start_byte, first.end_byte)
        return "", None
    # Other languages: the comment block right above the definition (or its wrapper).
    anchor = node
    while anchor.parent is not None and anchor.parent.type in (
            "export_statement", "lexical_declaration", "variable_declaration", "type_declaration"):
        anchor = anchor.parent
    lines: list[str] = []
    prev = anchor.prev_sibling
    row = anchor.start_point[0]
    while prev is not None and prev.type in COMMENT_TYPES and prev.end_point[0] >= row - 1:
        lines.insert(0, data[prev.start_byte:prev.end_byte].decode("utf-8", "replace"))
        row = prev.start_point[0]
        prev = prev.prev_sibling
    if not lines:
        return "", None
    text = _COMMENT_END.sub("", _COMMENT_MARK.sub("", "\n".join(lines)))
    return _clean_doc(text), None


_PY_DOC = re.compile(r'^[rRbBuU]*("""|\'\'\'|"|\')(.*)\1$', re.S)
_COMMENT_MARK = re.compile(r"^\s*(/\*\*?|\*/|\*|///?|//!)\s?", re.M)
_COMMENT_END = re.compile(r"\*/\s*$")


_FLUSH_LINE = re.compile(r"\n\S")


def _clean_doc(s: str) -> str:
    """``inspect.cleandoc(s).strip()``, without its per-line loop where it changes nothing.

    cleandoc removes the smallest indent of the lines after the first; when one of them
    starts in column 0 (one-line docs, and most comment blocks once their ``*`` are gone)
    that indent is 0 and all that is left of it is the strip.
    """
    if "\t" in s:
        s = s.expandtabs()
    if "\n" not in s or _FLUSH_LINE.search(s):
        return s.strip()
    import inspect

    return inspect.cleandoc(s).strip()


def _exception_name(node: Any, data: bytes) -> str:
    """`raise X(...)`, `raise X`, `throw new X(...)` → X."""
    kids = [c for c in node.named_children if c.type not in COMMENT_TYPES]
    if not kids:
        return ""
    e = kids[0]
    if e.type in ("call", "new_expression", "object_creation_expression"):
        f = e.child_by_field_name("function") or e.child_by_field_name("constructor") or \
            e.child_by_field_name("type")
        e = f if f is not None else e
    txt = data[e.start_byte:e.end_byte].decode("utf-8", "replace")
    # Only a plain (dotted) type name is an exact answer; `raise exc` of a variable is not.
    if not re.fullmatch(r"[A-Za-z_][\w.]*", txt):
        return ""
    return txt if txt.rsplit(".", 1)[-1][:1].isupper() else ""


def _def_query(lang: str) -> str:
    """One query for definitions, raise/throw statements and calls: a single tree pass."""
    pats = [f"({t}) @def" for t in DEF_TYPES.get(lang, {})]
    if lang in ("javascript", "typescript", "tsx"):
        pats.append("(variable_declarator name: (identifier) value: [(arrow_function) "
                    "(function_expression)]) @def")
    pats += [RAISE_QUERY.get(lang, ""), CALL_QUERY.get(lang, "")]
    return "\n".join(pats)


def _innermost(spans: list[tuple[int, int]], positions: list[int]) -> list[int]:
    """For each position, the index of the innermost span holding it, or -1.

    Spans are properly nested (syntax nodes) and sorted by start; one sweep with a stack.
    """
    order = sorted(range(len(positions)), key=positions.__getitem__)
    out = [-1] * len(positions)
    stack: list[int] = []
    j = 0
    for k in order:
        p = positions[k]
        while j < len(spans) and spans[j][0] <= p:
            while stack and spans[stack[-1]][1] <= spans[j][0]:
                stack.pop()
            stack.append(j)
            j += 1
        while stack and spans[stack[-1]][1] <= p:
            stack.pop()
        out[k] = stack[-1] if stack else -1
    return out


def _in_order(nodes: list[Any]) -> list[Any]:
    """Captures in source order. py-tree-sitter's capture lists are not: two parses of the
    same text can list them differently, which made two cold mines differ."""
    return sorted(nodes, key=lambda n: (n.start_byte, n.end_byte))


def symbols_of(tree: Any, lang: str, data: bytes, budget: int) -> tuple[list[Symbol], list[Call]]:
    """Definitions with their signature, return type, raised exceptions and doc; and calls."""
    root = tree.root_node
    caps = _query(lang, _def_query(lang)).captures(root)
    nodes = sorted(caps.get("def", []),
                   key=lambda n: (n.start_byte, -n.end_byte))
    spans = [(n.start_byte, n.end_byte) for n in nodes]
    names = [_def_name(n, lang, data) for n in nodes]
    quals: list[str] = []
    stack: list[int] = []
    for i, (s, _e) in enumerate(spans):
        while stack and spans[stack[-1]][1] <= s:
            stack.pop()
        outer = quals[stack[-1]] if stack else ""
        quals.append(f"{outer}.{names[i]}" if outer and names[i] else names[i] or outer)
        stack.append(i)
    symbols: list[Symbol | None] = []
    rf = RETURN_FIELD.get(lang)
    for node, name, qual in zip(nodes, names, quals, strict=True):
        if not name:
            symbols.append(None)
            continue
        kind = _def_kind(node, lang) or ""
        returns = ""
        if rf and kind in ("function", "method"):
            r = node.child_by_field_name(rf)
            if r is not None:
                returns = data[r.start_byte:r.end_byte].decode("utf-8", "replace").lstrip(":").strip()
                if lang == "rust":
                    returns = returns.removeprefix("->").strip()
                if "\n" in returns or len(returns) > 60:
                    returns = ""
        doc, span = _docstring(node, lang, data)
        code = ""
        if doc:
            s, e = node.start_byte, node.end_byte
            raw = data[s:e] if span is None else data[s:span[0]] + data[span[1]:e]
            # Too big for a docstring↔code example: not decoded at all (classes mostly).
            if len(raw) <= 2 * budget or len(raw.translate(None, _WS_CHARS)) <= 2 * budget:
                code = raw.decode("utf-8", "replace")
                # Python: drop the blank line left where the docstring was.
                code = re.sub(r"\n[ \t]*\n", "\n", code, count=1) if span is not None else code
        s, e = node.start_byte, node.end_byte
        nl = data.find(b"\n", s, e)
        sig = data[s:e if nl < 0 else nl].decode("utf-8", "replace").rstrip()
        symbols.append(Symbol(name=name.rsplit(".", 1)[-1], qualname=qual, kind=kind,
                              line=node.start_point[0] + 1, end_line=node.end_point[0] + 1,
                              signature=sig[:200], returns=returns, doc=doc[:2000], code=code))
    if lang in RAISE_QUERY and nodes:
        raised = _in_order(caps.get("raise", []))
        for node, i in zip(raised, _innermost(spans, [n.start_byte for n in raised]), strict=True):
            sym = symbols[i] if i >= 0 else None
            exc = _exception_name(node, data) if sym is not None else ""
            if sym is not None and exc and exc not in sym.raises:
                sym.raises.append(exc)
    calls: list[Call] = []
    if lang in CALL_QUERY and nodes:
        callees = _in_order(caps.get("callee", []))
        where = _innermost(spans, [c.start_byte for c in callees])
        for callee, i in zip(callees, where, strict=True):
            if i >= 0 and quals[i]:
                calls.append(Call(quals[i], data[callee.start_byte:callee.end_byte].decode(
                    "utf-8", "replace"), callee.start_point[0] + 1))
    return [s for s in symbols if s is not None], calls


def analyze(path: str, lang: str, data: bytes, budget: int) -> FileAnalysis:
    """Chunks, symbols and calls of one (already redacted) UTF-8 file."""
    if lang in ("markdown", "rst"):
        return FileAnalysis(chunk_doc(path, lang, data, budget), [], [])
    try:
        chunks, tree = chunk_code(path, lang, data, budget)
        symbols, calls = symbols_of(tree, lang, data, budget)
    except Exception:  # noqa: BLE001 - one file the syntax code cannot handle must not stop a mine
        return FileAnalysis(chunk_doc(path, lang, data, budget, headings=False), [], [])
    return FileAnalysis(chunks, symbols, calls)
