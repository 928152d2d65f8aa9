"""A small Go ``text/template`` evaluator: the subset Ollama's model templates use.

Written for the Ollama double, so its prompts are what Ollama would render. It is not a
port of Go's package: it parses and executes this subset, and refuses anything else with
:class:`TemplateError` rather than rendering it differently from Go.

Supported:

- text, ``{{ pipeline }}``, comments ``{{/* … */}}``, trim markers ``{{-`` / ``-}}``;
- ``if`` / ``else if`` / ``else`` / ``end``, ``range`` (``range $i, $v := …`` and
  ``range $v := …`` too) with ``else``, ``with`` / ``else`` / ``end``;
- operands: ``.``, fields ``.A.B``, ``$``, ``$x``, ``$x.A``, string (``"…"``, backquoted),
  integer and boolean literals, parenthesised pipelines, pipes ``a | f``;
- variables ``$x := …`` and ``$x = …``;
- functions ``and or not eq ne lt le gt ge len index slice print json``.

Data is Python dicts (``map[string]any``: a missing key is nil and prints ``<no value>``,
as ``missingkey=zero`` does for an interface map) and objects with attributes (Go
structs: a missing field is an error). :meth:`GoTemplate.vars` lists the lower-cased
identifiers the way Ollama's ``Template.Vars`` does, which is how Ollama decides a
model's capabilities (``suffix`` → "insert").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class TemplateError(ValueError):
    """A template outside the subset, malformed, or failing at execution."""


NO_VALUE = "<no value>"

_TOKEN = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
  | (?P<num>-?\d+)
  | (?P<decl>:=|=)
  | (?P<punct>[()|,])
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
)""", re.X)


# -- the parse tree ---------------------------------------------------------------

@dataclass
class Text:
    text: str


@dataclass
class Action:
    pipe: list  # the commands of a pipeline, each a list of operands
    decl: tuple[str, ...] = ()  # variables declared (:=) or assigned (=)
    assign: bool = False  # "=": set the variable where it was declared


@dataclass
class Branch:
    kind: str  # "if" | "range" | "with"
    pipe: Action
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


# -- lexing and parsing --------------------------------------------------------------

def _action_end(src: str, pos: int) -> int:
    """Where the action opened before ``pos`` closes (``}}`` outside quoted strings)."""
    i = pos
    while i < len(src):
        if src.startswith("}}", i):
            return i
        if src[i] in "\"`":
            close = src[i]
            i += 1
            while i < len(src) and src[i] != close:
                i += 2 if src[i] == "\\" and close == '"' else 1
        i += 1
    raise TemplateError("unclosed action")


def _pieces(src: str) -> list[tuple[str, str]]:
    """Text and action pieces, trim markers applied."""
    out: list[tuple[str, str]] = []
    pos = 0
    while (start := src.find("{{", pos)) >= 0:
        text = src[pos:start]
        body_at = start + 2
        if src.startswith("- ", body_at) or src.startswith("-\n", body_at):
            text, body_at = text.rstrip(" \t\r\n"), body_at + 1
        end = _action_end(src, body_at)
        body = src[body_at:end]
        pos = end + 2
        if body.endswith((" -", "\n-")):
            body = body[:-1]
            pos += len(src[pos:]) - len(src[pos:].lstrip(" \t\r\n"))
        out += [("text", text), ("action", body.strip())]
    out.append(("text", src[pos:]))
    return [p for p in out if p != ("text", "")]


def _tokens(expr: str) -> list[tuple[str, str]]:
    toks, pos = [], 0
    while pos < len(expr.rstrip()):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"unsupported syntax in action: {expr[pos:].strip()!r}")
        kind = m.lastgroup or ""
        toks.append((kind, m.group(kind)))
        pos = m.end()
    return toks


def _pipeline(toks: list[tuple[str, str]]) -> list:
    """Commands separated by ``|``; each a list of operands (nested pipelines in parens)."""
    cmds: list[list] = [[]]
    i = 0
    while i < len(toks):
        kind, val = toks[i]
        if val == "|" and kind == "punct":
            cmds.append([])
        elif val == "(" and kind == "punct":
            depth, j = 1, i + 1
            while j < len(toks) and depth:
                depth += {"(": 1, ")": -1}.get(toks[j][1], 0) if toks[j][0] == "punct" else 0
                j += 1
            if depth:
                raise TemplateError("unclosed parenthesis")
            cmds[-1].append(("pipe", _pipeline(toks[i + 1:j - 1])))
            i = j
            continue
        elif kind in ("punct", "decl"):
            raise TemplateError(f"unexpected {val!r}")
        else:
            cmds[-1].append((kind, val))
        i += 1
    if any(not c for c in cmds):
        raise TemplateError("empty command in pipeline")
    return cmds


def _action(expr: str) -> Action:
    toks = _tokens(expr)
    for i, (kind, val) in enumerate(toks):
        if kind == "decl":
            names = [v for k, v in toks[:i] if k == "var"]
            if not names or len(names) != len([t for t in toks[:i] if t[1] != ","]):
                raise TemplateError(f"bad variable declaration: {expr!r}")
            return Action(_pipeline(toks[i + 1:]), tuple(names), val == "=")
    return Action(_pipeline(toks))


def _parse(pieces: list[tuple[str, str]]) -> list:
    root: list = []
    stack: list[tuple[Branch, list]] = []  # open branch, the list being filled
    cur = root
    for kind, body in pieces:
        if kind == "text":
            cur.append(Text(body))
            continue
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise TemplateError("unclosed comment")
            continue
        word, _, rest = body.partition(" ")
        if word in ("if", "range", "with"):
            b = Branch(word, _action(rest))
            cur.append(b)
            stack.append((b, cur))
            cur = b.body
        elif word == "else":
            if not stack:
                raise TemplateError("unexpected {{else}}")
            b, parent = stack[-1]
            if rest.startswith("if ") and b.kind == "if":
                inner = Branch("if", _action(rest[3:]))
                b.orelse = [inner]
                stack[-1] = (inner, parent)  # one {{end}} closes the whole chain
                cur = inner.body
            elif rest:
                raise TemplateError(f"unsupported {{{{else {rest}}}}}")
            else:
                cur = b.orelse
        elif word == "end":
            if not stack:
                raise TemplateError("unexpected {{end}}")
            _b, cur = stack.pop()
        elif word in ("define", "template", "block", "break", "continue"):
            raise TemplateError(f"{{{{{word}}}}} is outside the supported subset")
        else:
            cur.append(_action(body))
    if stack:
        raise TemplateError(f"unexpected EOF: unclosed {{{{{stack[-1][0].kind}}}}}")
    return root


# -- execution ------------------------------------------------------------------------

def truth(v: Any) -> bool:
    """Go's notion of a true value: not false, 0, nil or empty."""
    return v is not None and v is not False and not (isinstance(v, (int, float, str, list, tuple, dict)) and not v)


def show(v: Any) -> str:
    """A value as Go's fmt prints it in a template."""
    if v is None:
        return NO_VALUE
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(show(x) for x in v) + "]"
    return str(v)


def _eq(a: Any, *bs: Any) -> bool:
    return any(a == b for b in bs)


def _slice(x: Any, *ix: int) -> Any:
    if len(ix) > 2:
        raise TemplateError("slice: at most two indices supported")
    lo, hi = (ix + (0, len(x)))[:2] if ix else (0, len(x))
    if not 0 <= lo <= hi <= len(x):
        raise TemplateError(f"slice: index out of range [{lo}:{hi}] with length {len(x)}")
    return x[lo:hi]


FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not truth(v),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "len": len,
    "index": lambda x, *ix: _index(x, ix),
    "slice": _slice,
    "print": lambda *a: "".join(show(x) for x in a),
    "json": lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False),
}


def _index(x: Any, ix: tuple[Any, ...]) -> Any:
    for i in ix:
        try:
            x = x.get(i) if isinstance(x, dict) else x[i]
        except (IndexError, TypeError, KeyError):
            raise TemplateError(f"index of {show(i)} out of range") from None
    return x


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)  # missingkey=zero on map[string]any: nil
    if obj is None:
        raise TemplateError(f"nil pointer evaluating .{name}")
    if not hasattr(obj, name):
        raise TemplateError(f"can't evaluate field {name} in type {type(obj).__name__}")
    return getattr(obj, name)


class _Run:
    def __init__(self, data: Any) -> None:
        self.vars: list[dict[str, Any]] = [{"$": data}]

    def var(self, name: str) -> Any:
        for scope in reversed(self.vars):
            if name in scope:
                return scope[name]
        raise TemplateError(f'undefined variable "{name}"')

    def set(self, name: str, value: Any, assign: bool) -> None:
        scope = next((s for s in reversed(self.vars) if name in s), None) if assign else self.vars[-1]
        if scope is None:
            raise TemplateError(f'undefined variable "{name}"')
        scope[name] = value

    def operand(self, op: tuple[str, Any], dot: Any) -> Any:
        kind, val = op
        if kind == "pipe":
            return self.pipe(val, dot)
        if kind == "str":
            return val[1:-1] if val[0] == "`" else json.loads(val)
        if kind == "num":
            return int(val)
        if kind == "field":
            out = dot
            for name in val.split(".")[1:] if val != "." else []:
                out = _field(out, name)
            return out
        if kind == "var":
            head, *rest = val.split(".")
            out = self.var(head)
            for name in rest:
                out = _field(out, name)
            return out
        if val in ("true", "false"):
            return val == "true"
        if val == "nil":
            return None
        raise TemplateError(f'function "{val}" not defined')

    def command(self, cmd: list, dot: Any, piped: list[Any]) -> Any:
        kind, val = cmd[0]
        if kind != "ident" or val in ("true", "false", "nil"):
            if len(cmd) > 1 or piped:
                raise TemplateError(f"can't give argument to non-function {val}")
            return self.operand(cmd[0], dot)
        if val in ("and", "or"):  # short-circuit, return the deciding operand (Go 1.18+)
            args = [lambda op=op: self.operand(op, dot) for op in cmd[1:]] + [lambda v=v: v for v in piped]
            out = None
            for get in args:
                out = get()
                if truth(out) != (val == "and"):
                    return out
            return out
        if val not in FUNCS:
            raise TemplateError(f'function "{val}" not defined')
        args = [self.operand(op, dot) for op in cmd[1:]] + piped
        try:
            return FUNCS[val](*args)
        except TypeError as e:
            raise TemplateError(f"error calling {val}: {e}") from None

    def pipe(self, cmds: list, dot: Any) -> Any:
        out: list[Any] = []
        for cmd in cmds:
            out = [self.command(cmd, dot, out)]
        return out[0]

    def nodes(self, nodes: list, dot: Any, w: list[str]) -> None:
        for n in nodes:
            if isinstance(n, Text):
                w.append(n.text)
            elif isinstance(n, Action):
                v = self.pipe(n.pipe, dot)
                if n.decl:
                    self.set(n.decl[-1], v, n.assign)
                else:
                    w.append(show(v))
            else:
                self.branch(n, dot, w)

    def branch(self, b: Branch, dot: Any, w: list[str]) -> None:
        v = self.pipe(b.pipe.pipe, dot)
        self.vars.append({})
        try:
            if b.kind == "range":
                items = list(v.items()) if isinstance(v, dict) else list(enumerate(v or []))
                for i, item in items:
                    if b.pipe.decl:
                        self.vars[-1].update(dict(zip(b.pipe.decl[::-1], (item, i), strict=False)))
                    self.nodes(b.body, item, w)
                if not items:
                    self.nodes(b.orelse, dot, w)
                return
            if b.pipe.decl:
                self.vars[-1][b.pipe.decl[-1]] = v
            if truth(v):
                self.nodes(b.body, v if b.kind == "with" else dot, w)
            else:
                self.nodes(b.orelse, dot, w)
        finally:
            self.vars.pop()


def _idents(nodes: list) -> list[str]:
    out: list[str] = []

    def pipe(cmds: list) -> None:
        for cmd in cmds:
            for kind, val in cmd:
                if kind == "pipe":
                    pipe(val)
                elif kind == "field":
                    out.extend(p for p in val.split(".") if p)
                elif kind == "var":
                    out.extend(val.split("."))

    for n in nodes:
        if isinstance(n, Action):
            pipe(n.pipe)
        elif isinstance(n, Branch):
            pipe(n.pipe.pipe)
            out.extend(_idents(n.body) + _idents(n.orelse))
    return out


class GoTemplate:
    """A parsed template: ``GoTemplate(src).execute(data)``."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.root = _parse(_pieces(src))

    def vars(self) -> list[str]:
        """Lower-cased identifiers of fields and variables (Ollama's ``Template.Vars``)."""
        return sorted({v.lower() for v in _idents(self.root)})

    def execute(self, data: Any, *, cut_at: str | None = None) -> str:
        """Render with ``data`` as dot. ``cut_at``: drop everything from the first action
        naming that field on (Ollama cuts a legacy template after ``.Response``)."""
        nodes = _cut(self.root, cut_at)[0] if cut_at else self.root
        w: list[str] = []
        _Run(data).nodes(nodes, data, w)
        return "".join(w)


def _cut(nodes: list, name: str) -> tuple[list, bool]:
    """The nodes before the first one mentioning field ``name`` (depth-first), and whether
    it was found (then every later node, at every level, is dropped too)."""
    out: list = []
    for n in nodes:
        if isinstance(n, Action) and name.lower() in [i.lower() for i in _idents([n])]:
            return out, True
        if isinstance(n, Branch):
            body, hit = _cut(n.body, name)
            orelse, hit2 = _cut(n.orelse, name) if not hit else ([], True)
            out.append(Branch(n.kind, n.pipe, body, orelse))
            if hit or hit2:
                return out, True
            continue
        out.append(n)
    return out, False
