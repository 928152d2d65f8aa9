"""The re-mine shortcut: patch the last mine instead of walking the whole tree.

A re-mine whose ``changed_since`` is the commit the line store last mined takes the
last mine's saved state (:class:`SavedMine`, the store's ``last.bin``: the tree listing
with each file's :class:`Row`, the file lines' write plan, the sorted line hashes and the
totals) and takes out and puts back only the changed paths' entries. The output is the
full mine's (:func:`forged.worker.mine.dataset._mine`), byte for byte; where that cannot
be assured it raises :class:`Fallback` before writing anything and the full mine runs.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import chain, pairwise
from pathlib import Path
from typing import Any, NamedTuple

from forged.worker.mine import dataset as ds
from forged.worker.mine import gitio

Plan = list[tuple[int, int, int, int]]  # (source, offset, length, "changed" flag) ranges
PATCH_MAX = 256  # more changed paths than this, and the full mine is cheaper


class Fallback(Exception):
    """The shortcut does not apply here: mine in full."""


class Row(NamedTuple):
    """A listed path in the last mine: its split and where its lines are in the store."""

    split: int  # -1: not mined, 0: train, 1: valid
    meta_off: int
    meta_len: int
    mlx_off: int
    mlx_len: int

    def end(self, mlx: bool) -> int:
        """Where this file's lines end in the store (its mlx form or its JSON form)."""
        return self.mlx_off + self.mlx_len if mlx else self.meta_off + self.meta_len


NOT_MINED = Row(-1, 0, 0, 0, 0)


class Facts(NamedTuple):
    """A path's name checks, as :meth:`dataset._Ctx.facts` remembers them."""

    reason: str | None  # why it is skipped by its name
    lang: str
    split_hash: float
    shard: int


@dataclass
class SavedMine:
    """What a mine leaves for the next re-mine to patch (stored as a dict in ``last.bin``)."""

    commit: str
    fp: str
    heldout: list[str]
    paths: list[str]
    blobs: list[str]
    sizes: list[int]
    rows: list[Row]
    plans: dict[str, Plan]
    hashes: array  # sorted line hashes ("Q")
    skipped: Counter[str]
    redactions: Counter[str]
    totals: list[int]  # _Totals: chunks, symbols, todo, mined, held
    tally: dict[str, list]
    live: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SavedMine:
        flat = array("q", d["rows"])
        rows = list(map(Row._make, zip(*[iter(flat)] * 5, strict=True)))
        return cls(d["commit"], d["fp"], d["heldout"], d["paths"], d["blobs"], d["sizes"], rows,
                   d["plans"], array("Q", d["hashes"]), Counter(d["skipped"]), Counter(d["redactions"]),
                   list(d["totals"]), d["tally"], d["live"])

    def to_dict(self) -> dict[str, Any]:
        return {"commit": self.commit, "fp": self.fp, "heldout": self.heldout, "paths": self.paths,
                "blobs": self.blobs, "sizes": self.sizes, "rows": array("q", chain.from_iterable(self.rows)).tobytes(),
                "plans": self.plans, "hashes": self.hashes.tobytes(), "skipped": dict(self.skipped),
                "redactions": dict(self.redactions), "totals": self.totals, "tally": self.tally,
                "live": self.live}

    def totals_of(self) -> ds._Totals:
        return ds._Totals(Counter(self.skipped), Counter(self.redactions), *self.totals)

    def find(self, path: str) -> int:
        """Where ``path`` is, or would be inserted, in the listing (``ls-tree`` order)."""
        return bisect_left(self.paths, ds._tree_key(path), key=ds._tree_key)

    def split_of(self, path: str) -> str | None:
        i = self.find(path)
        if i < len(self.paths) and self.paths[i] == path and self.rows[i].split >= 0:
            return "valid" if self.rows[i].split else "train"
        return None


def save(ctx: ds._Ctx, entries: list[gitio.Entry], files: list[ds._File], file_units: list[ds._Unit],
         tally: ds._Tally, tot: ds._Totals, heldout: set[str]) -> dict[str, Any] | None:
    """A full mine's :class:`SavedMine` (as stored), or None if its listing cannot be patched."""
    keys = [ds._tree_key(e.path) for e in entries]
    if any(a >= b for a, b in pairwise(keys)):
        return None  # not in the order insertions assume: never patch this listing
    rows: list[Row] = []
    fi = 0
    for e in entries:
        if fi < len(files) and files[fi].path == e.path:
            s = file_units[fi].seg
            rows.append(Row(int(files[fi].split == "valid"), s.meta_off, s.meta_len, s.mlx_off, s.mlx_len))
            fi += 1
        else:
            rows.append(NOT_MINED)
    hashes = array("Q", sorted(array("Q", b"".join([u.seg.hashes for u in file_units]))))
    return SavedMine(
        ctx.rep.commit, ctx.fp, sorted(heldout), [e.path for e in entries], [e.blob for e in entries],
        [e.size for e in entries], rows, ds._plans(file_units, {}, ctx.store, bytearray(), flips=False),
        hashes, tot.skipped, tot.redactions, [tot.chunks, tot.symbols, tot.todo, tot.mined, tot.held],
        tally.by, tally.live).to_dict()


@dataclass
class _Patch:
    """One re-mine in progress: the saved mine being patched and its running counts."""

    ctx: ds._Ctx
    saved: SavedMine
    tot: ds._Totals
    tally: ds._Tally
    changes: dict[str, str | None]
    stage: Callable[[str], None]


def remine(ctx: ds._Ctx, out_dir: Path, last: dict[str, Any], changes: dict[str, str | None],
           history_f: Future, stage: Callable[[str], None], linked: bool) -> None:
    """Re-mine from the last mined commit in O(changed files); see the module docstring."""
    cfg, rep, idx = ctx.cfg, ctx.rep, ctx.store.index
    heldout = ctx.cache.heldout(rep.repo)
    if len(changes) > PATCH_MAX or sorted(heldout) != last["heldout"]:
        raise Fallback
    saved = SavedMine.from_dict(last)
    tot = saved.totals_of()
    tot.skipped.update(ctx.specials)  # symlinks and submodules gained since the last mine
    p = _Patch(ctx, saved, tot, ds._Tally(saved.tally, saved.live), changes, stage)
    if cfg.kinds.raft > 0 and len(idx.files) != p.tot.mined:
        raise Fallback  # the symbol table's file list is not the last mine's
    order = sorted(changes, key=ds._tree_key)
    old_akeys = _take_out(p, order)
    files = _put_back(p, order, heldout)
    redactions = Counter(p.tot.redactions)
    commit_units = ds._commit_units(ctx, history_f.result(), saved.split_of, redactions)
    stage("commits")
    flagged = _place_lines(p, files)
    raft = _raft(p, files, old_akeys)
    stage("examples")
    rep.teacher = {"status": "off"}
    total = _check_new_lines(p, raft + commit_units)
    ctx.progress({"stage": "write", "examples": total.by["train"][2] + total.by["valid"][2]})
    rep.duplicates_removed = 0
    total.report(rep)
    extra = bytearray()
    out = ds._plans(raft + commit_units, {}, ctx.store, extra,
                    into={rel: ds._refold(flagged.get(rel, r)) for rel, r in saved.plans.items()})
    ds._emit(out_dir, out, extra, ctx.store, linked)
    rep.skipped = dict(sorted((+p.tot.skipped).items()))
    rep.redactions = dict(sorted((+redactions).items()))
    saved.commit, saved.fp = rep.commit, ctx.fp
    saved.skipped, saved.redactions = +p.tot.skipped, +p.tot.redactions
    saved.totals = [p.tot.chunks, p.tot.symbols, p.tot.todo, p.tot.mined, p.tot.held]
    saved.tally, saved.live = p.tally.by, p.tally.live
    ctx.store.last = saved.to_dict()


def _take_out(p: _Patch, order: list[str]) -> dict[str, str]:
    """Take the changed paths' old entries out: totals, stored lines, plan, listing.
    Returns each mined one's analysis key at the last mine."""
    ctx, saved, store = p.ctx, p.saved, p.ctx.store
    info = store.index.info
    old_akeys: dict[str, str] = {}
    for path in order:
        i = saved.find(path)
        if i == len(saved.paths) or saved.paths[i] != path:
            continue
        facts = ctx.facts(path)
        reason = ctx.reason(gitio.Entry(path, saved.blobs[i], saved.sizes[i]), facts)
        akey = "" if reason else ctx.akey(facts.lang, saved.blobs[i])
        if akey and akey not in info:
            raise Fallback
        row = saved.rows[i]
        if p.tot.entry(reason, info[akey] if akey else None, -1):
            split = "valid" if row.split else "train"
            p.tot.held -= row.split == 1
            seg = store.seg(akey + "\0" + path)
            if seg is None or tuple(seg[:4]) != row[1:]:
                raise Fallback  # not the lines the last mine wrote
            p.tally.add(ds._Unit(split, False, facts.lang, seg, akey), -1)
            for h in array("Q", seg.hashes):
                _take(saved.hashes, h)
            for rel, (s, mlx) in ds._FORMS.items():
                if s == split and seg.n:
                    _cut(saved.plans[rel], *((1, seg.mlx_off, seg.mlx_len) if mlx
                                             else (0, seg.meta_off, seg.meta_len)))
            old_akeys[path] = akey
        del saved.paths[i], saved.blobs[i], saved.sizes[i], saved.rows[i]
    return old_akeys


def _put_back(p: _Patch, order: list[str], heldout: set[str]) -> list[tuple[int, ds._File]]:
    """The changed paths' new entries into the listing and totals (analyses loaded or
    parsed); the mined ones as (listing index, file), their store ranges filled later."""
    ctx, saved = p.ctx, p.saved
    info, segs = ctx.store.index.info, ctx.store.index.segs
    sizes_of = gitio.blob_sizes(ctx.repo, [b for b in p.changes.values() if b is not None])
    add: list[tuple[gitio.Entry, Facts, str, str | None]] = []
    need: dict[str, tuple[gitio.Entry, str]] = {}
    for path in order:
        blob = p.changes[path]
        if blob is None:
            continue
        e = gitio.Entry(path, blob, sizes_of[blob])
        facts = ctx.facts(path)
        reason = ctx.reason(e, facts)
        akey = "" if reason else ctx.akey(facts.lang, blob)
        inf = info.get(akey) if akey else None
        if akey and (inf is None or (_parsed(inf) and akey + "\0" + path not in segs)):
            need[akey] = (e, facts.lang)
        add.append((e, facts, akey, reason))
    ctx.total = p.tot.todo + sum(bool(a[2]) for a in add)
    p.stage("enumerate")
    ctx.analyses(need)
    p.stage("parse")
    frac = ctx.cfg.heldout_fraction
    files: list[tuple[int, ds._File]] = []
    for e, facts, akey, reason in add:
        i = saved.find(e.path)
        saved.paths.insert(i, e.path)
        saved.blobs.insert(i, e.blob)
        saved.sizes.insert(i, e.size)
        if not p.tot.entry(reason, info[akey] if akey else None):
            saved.rows.insert(i, NOT_MINED)
            continue
        valid = frac > 0 and (facts.split_hash < frac or e.path in heldout)
        p.tot.held += valid
        saved.rows.insert(i, Row(int(valid), 0, 0, 0, 0))
        files.append((i, ds._File(e, facts.lang, akey, "valid" if valid else "train", True, facts.shard)))
    if frac > 0 and p.tot.mined >= 2 and not p.tot.held:
        raise Fallback  # the full mine picks a file to hold out
    ctx.rep.files_total = len(saved.paths) + sum(p.tot.skipped[k] for k in gitio.SPECIAL_MODES.values())
    p.tot.report(ctx.rep, ctx.parsed, len(files))
    p.stage("load")
    return files


def _parsed(inf: tuple) -> bool:
    """Whether an analysis' facts say it was chunked ("ok"), not skipped for its content."""
    return inf[0] == "ok"


def _place_lines(p: _Patch, files: list[tuple[int, ds._File]]) -> dict[str, Plan]:
    """The changed files' lines, each put in the plan after the nearest file before it in
    its split. The saved plans stay without "changed" flags (they are next time's); the
    flagged copies of the JSON forms are returned for this mine's output."""
    saved = p.saved
    units = ds._file_units([f for _, f in files], p.ctx.results, p.ctx.store, p.ctx.cfg, p.ctx.context_tokens,
                           p.ctx.fim_format)
    flagged = {rel: list(r) for rel, r in saved.plans.items() if not ds._FORMS[rel][1]}
    for (i, f), u in zip(files, units, strict=True):
        s = u.seg
        saved.rows[i] = row = Row(saved.rows[i].split, s.meta_off, s.meta_len, s.mlx_off, s.mlx_len)
        p.tally.add(u)
        for h in array("Q", s.hashes):
            _put(saved.hashes, h)
        if not s.n:
            continue
        j = i - 1
        while j >= 0 and (saved.rows[j].split != row.split or not saved.rows[j].meta_len):
            j -= 1
        for rel, (split, mlx) in ds._FORMS.items():
            if split != f.split:
                continue
            src, off, n = (1, s.mlx_off, s.mlx_len) if mlx else (0, s.meta_off, s.meta_len)
            end = -1 if j < 0 else saved.rows[j].end(mlx)
            _put_after(saved.plans[rel], src, end, (src, off, n, 0))
            if not mlx:
                _put_after(flagged[rel], src, end, (src, off, n, 1))
    saved.plans = {rel: ds._refold(r) for rel, r in saved.plans.items()}
    return flagged


def _raft(p: _Patch, files: list[tuple[int, ds._File]], old_akeys: dict[str, str]) -> list[ds._Unit]:
    """RAFT: the symbol table takes the changed files; lines only where there are questions."""
    ctx, saved, idx = p.ctx, p.saved, p.ctx.store.index
    if ctx.cfg.kinds.raft <= 0:
        ctx.store.note_files(list(idx.files), {})
        return []
    now = {f.path: f.akey for _, f in files}
    ds._symbols(ctx, [path for path in old_akeys if now.get(path) != old_akeys[path]],
                [f for _, f in files if idx.files.get(f.path) != f.akey])
    if not ctx.store.sym.execute("SELECT 1 FROM spec LIMIT 1").fetchone():
        return []
    every = []
    for i, path in enumerate(saved.paths):
        if saved.rows[i].split >= 0:
            facts = ctx.facts(path)
            every.append(ds._File(gitio.Entry(path, saved.blobs[i], saved.sizes[i]), facts.lang,
                                  ctx.akey(facts.lang, saved.blobs[i]), "valid" if saved.rows[i].split else "train",
                                  path in p.changes, facts.shard))
    return ds._raft_lines(ctx, every)


def _check_new_lines(p: _Patch, new: list[ds._Unit]) -> ds._Tally:
    """The last mine had no duplicate line and none may come with the new lines either,
    nor may the store be due for compaction (the full mine removes and compacts). Returns
    the tally with the new lines."""
    seen: set[int] = set()
    hashes = p.saved.hashes
    for u in new:
        for h in array("Q", u.seg.hashes):
            k = bisect_left(hashes, h)
            if h in seen or (k < len(hashes) and hashes[k] == h):
                raise Fallback
            seen.add(h)
    total = p.tally.copy()
    for u in new:
        total.add(u)
    if ds._compaction_due(p.ctx.store, total.live, len(p.saved.paths)):
        raise Fallback  # the full mine compacts the store
    return total


def _take(hashes: array, h: int) -> None:
    """Remove one line hash from the sorted hashes."""
    k = bisect_left(hashes, h)
    if k == len(hashes) or hashes[k] != h:
        raise Fallback
    del hashes[k]


def _put(hashes: array, h: int) -> None:
    """Add a line hash to the sorted hashes; a duplicate line needs the full mine's removal."""
    k = bisect_left(hashes, h)
    if k < len(hashes) and hashes[k] == h:
        raise Fallback
    hashes.insert(k, h)


def _cut(ranges: Plan, src: int, off: int, n: int) -> None:
    """Take the piece ``off``..``off + n`` of ``src`` out of a plan."""
    for k, (s, o, m, fl) in enumerate(ranges):
        if s == src and o <= off < o + m:
            if off + n > o + m:
                break
            ranges[k:k + 1] = [r for r in ((s, o, off - o, fl), (s, off + n, o + m - off - n, fl)) if r[2]]
            return
    raise Fallback


def _put_after(ranges: Plan, src: int, end: int, piece: tuple[int, int, int, int]) -> None:
    """Insert ``piece`` after the piece of ``src`` ending at ``end`` (-1: first)."""
    if end < 0:
        ranges.insert(0, piece)
        return
    for k, (s, o, m, fl) in enumerate(ranges):
        if s == src and o < end <= o + m:
            ranges[k:k + 1] = [r for r in ((s, o, end - o, fl), piece, (s, end, o + m - end, fl)) if r[2]]
            return
    raise Fallback
