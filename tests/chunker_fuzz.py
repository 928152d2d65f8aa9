"""Chunker fuzz: broken files must never raise out of the syntax-aware chunker.

Used by tests/test_mine_chunker.py (small and seeded) and bench/mine/fuzz_chunker.py (all of
/usr/lib/python3*). It calls the strict path (``chunk_code`` then ``symbols_of``), not
``analyze``, whose text fallback would hide the very exceptions the fuzz is looking for.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field

from forged.worker.mine.chunker import budget_bytes, chunk_code, chunk_doc, symbols_of

# Bytes that change how a parser reads the rest of a file.
_SYNTAX = b"()[]{}:;,.'\"`#/\\*=<>-@\n\t "

# One small file per language with the constructs the chunker inspects: definitions with
# docs and comments, nested scopes, raises/throws, calls, decorators, generics.
SAMPLES: dict[str, tuple[str, str]] = {
    "python": ("m.py", '''"""Module doc."""
import os


@decorator(1)
class Box(Base):
    """A box."""

    def put(self, x: int) -> int:
        """Put x."""
        if x < 0:
            raise ValueError("neg")
        return os.path.join(str(x), helper(x))

    async def get(self, *a, **k):
        return [i for i in a if i]


def helper(y):
    # comment
    return lambda z: y + z
'''),
    "javascript": ("a.js", '''/** Adds. */
export function add(a, b) {
  if (a < 0) throw new RangeError("neg");
  return helper(a) + b;
}
// arrow
const mul = (a, b) => a * b;
class K extends Base {
  /** method */
  m(x) { return this.n(x, `t${x}`); }
}
'''),
    "typescript": ("a.ts", '''interface P { a: number; b?: string }
/** Sum. */
export function sum<T extends P>(xs: T[]): number {
  return xs.reduce((s, x) => s + x.a, 0);
}
export const g = (x: number): number => x * 2;
export class C<T> implements I {
  private v: T;
  get(): T { if (!this.v) { throw new Error("none"); } return this.v; }
}
type U = P | null;
'''),
    "tsx": ("a.tsx", '''import React from "react";
/** A view. */
export function View({ n }: { n: number }): JSX.Element {
  const f = () => setN(n + 1);
  return <div onClick={f}>{n > 0 ? <b>{n}</b> : null}</div>;
}
export const W = (p: Props) => <View n={p.n} />;
'''),
    "go": ("a.go", '''package main

import "fmt"

// Srv serves.
type Srv struct{ n int }

// F doubles.
func (s *Srv) F(x int) (int, error) {
	if x < 0 {
		return 0, fmt.Errorf("neg %d", x)
	}
	return x * s.n, nil
}

func main() { fmt.Println(new(Srv).F(2)) }
'''),
    "rust": ("a.rs", '''/// A point.
pub struct P { x: u32 }

impl P {
    /// New.
    pub fn new(x: u32) -> Self { P { x } }
    fn get(&self) -> Result<u32, String> {
        if self.x == 0 { return Err("zero".into()); }
        Ok(helper(self.x))
    }
}

fn helper<T: Into<u32>>(v: T) -> u32 { v.into() + 1 }
'''),
    "java": ("A.java", '''package p;

/** A thing. */
public class A<T> extends B implements C {
  /** Make one. */
  public A(int x) throws Exception {
    if (x < 0) throw new IllegalStateException("neg");
    this.x = helper(x);
  }
  @Override
  int m(int x) { return x + List.of(1).size(); }
  interface I { void f(); }
}
'''),
}


@dataclass
class FuzzResult:
    inputs: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # "path/variant: traceback tail"


def mutate(data: bytes, rng: random.Random, edits: int) -> bytes:
    """``edits`` random byte insertions, deletions and replacements (half from _SYNTAX)."""
    b = bytearray(data)
    for _ in range(edits):
        pos = rng.randrange(len(b) + 1)
        byte = rng.choice(_SYNTAX) if rng.random() < 0.5 else rng.randrange(256)
        op = rng.randrange(3)
        if op == 0 or not b:
            b.insert(pos, byte)
        elif op == 1:
            del b[min(pos, len(b) - 1)]
        else:
            b[min(pos, len(b) - 1)] = byte
    return bytes(b)


def as_mined(data: bytes) -> bytes:
    """What the miner hands the chunker: UTF-8 (invalid bytes replaced, as after decoding)."""
    return data.decode("utf-8", "replace").encode("utf-8")


def check(path: str, lang: str, data: bytes, budget: int) -> str | None:
    """None, or the tail of the traceback the chunker raised on this input."""
    try:
        if lang in ("markdown", "rst"):
            chunk_doc(path, lang, data, budget)
        else:
            _chunks, tree = chunk_code(path, lang, data, budget)
            symbols_of(tree, lang, data, budget)
    except Exception:  # noqa: BLE001 - the fuzz records whatever is raised
        return traceback.format_exc().strip().splitlines()[-1]
    return None


def run(cases: Iterable[tuple[str, str, bytes]], deadline_s: float, tokens: int = 96) -> FuzzResult:
    """Check each (label, lang, data) until ``deadline_s`` seconds have passed."""
    res = FuzzResult()
    budget = budget_bytes(tokens)
    t0 = time.monotonic()
    for label, lang, data in cases:
        if time.monotonic() - t0 > deadline_s:
            break
        res.inputs += 1
        err = check(label, lang, as_mined(data), budget)
        if err:
            res.failures.append(f"{label}: {err}")
    res.seconds = time.monotonic() - t0
    return res


def truncations(step: int = 1) -> Iterable[tuple[str, str, bytes]]:
    """Every sample cut at every ``step``-th byte (and mutated copies of the cut)."""
    for lang, (path, src) in SAMPLES.items():
        data = src.encode()
        for n in range(0, len(data) + 1, step):
            yield f"{path}[:{n}]", lang, data[:n]


def edited(files: Iterable[tuple[str, str, bytes]], rng: random.Random, variants: int,
           max_edits: int) -> Iterable[tuple[str, str, bytes]]:
    """``variants`` randomly edited copies of each file (1..max_edits edits each)."""
    for path, lang, data in files:
        for v in range(variants):
            yield f"{path}#{v}", lang, mutate(data, rng, rng.randint(1, max_edits))
