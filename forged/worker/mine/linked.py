"""The linked dataset layout: big split files kept as byte ranges of the line store.

After a one-file commit in a big repo a re-mine changes kilobytes of a dataset of hundreds
of megabytes, and writing those megabytes again (ext4 has no reflinks) cost more than all
the rest of the re-mine. So :func:`forged.worker.mine.mine_repo` writes the training split
*linked* by default:

* ``lines/`` holds hard links to the line store's data files (the store only ever appends
  to them and never rewrites a byte in place; compaction writes new files, and a linked
  file outlives its store name) plus ``extra.*.bin``, the few lines this mine made
  (commit examples, changed files' lines with duplicates removed);
* ``linked.json`` lists, for each linked file (``train.jsonl``, ``mlx/train.jsonl``), the
  byte ranges that concatenate to it, each with a flag that swaps ``"changed": false`` for
  ``true`` (stored lines always say false).

``valid.jsonl`` and ``mlx/valid.jsonl`` (the small held-out split) are always plain files.
Readers go through :func:`read_bytes`; :func:`materialize` turns a linked dataset into
plain JSONL files (``mlx_lm.lora --data DIR/mlx`` needs them; ``forged mine`` does it by
default). When the store is on another filesystem, the mine writes plain files instead.

Import cost: standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

LINKED = "linked.json"
LINES_DIR = "lines"
_FALSE, _TRUE = b'"changed": false', b'"changed": true'
_PIECE = 1 << 24


def _spec(root: Path) -> dict | None:
    try:
        return json.loads((root / LINKED).read_text())
    except (OSError, ValueError):
        return None


def _locate(path: Path) -> tuple[Path, str, dict] | None:
    """(dataset dir, name inside it, linked spec) for a linked ``path``, else None."""
    for root in (path.parent, path.parent.parent):
        spec = _spec(root)
        if spec is not None:
            rel = path.relative_to(root).as_posix()
            if rel in spec.get("files", {}):
                return root, rel, spec
    return None


def exists(path: Path) -> bool:
    """A dataset file is there: as a plain file or linked."""
    path = Path(path)
    return _locate(path) is not None or path.is_file()


def read_bytes(path: Path) -> bytes:
    """The content of dataset file ``path`` (e.g. ``DIR/train.jsonl``), plain or linked."""
    path = Path(path)
    hit = _locate(path)
    if hit is None:
        return path.read_bytes()
    root, rel, spec = hit
    out = bytearray()
    fds = [os.open(root / s, os.O_RDONLY) for s in spec["sources"]]
    try:
        for src, off, n, flip in spec["files"][rel]:
            data = os.pread(fds[src], n, off)
            if len(data) != n:
                raise OSError(f"{root / spec['sources'][src]}: truncated linked dataset")
            out += data.replace(_FALSE, _TRUE) if flip else data
    finally:
        for fd in fds:
            os.close(fd)
    return bytes(out)


def write_ranges(fd: int, src: int, off: int, n: int, flip: bool) -> None:
    """Append ``n`` bytes of ``src`` at ``off`` to ``fd`` (flag swapped when ``flip``)."""
    if not flip:
        from forged.worker.mine.store import copy_range

        copy_range(src, off, n, fd)
        return
    while n > 0:
        data = os.pread(src, min(n, _PIECE), off)
        if not data:
            raise OSError("line store truncated")
        if len(data) < n:  # cut at a line end, so the pattern never straddles two pieces
            cut = data.rfind(b"\n") + 1
            data = data[:cut] if cut else data
        _write_all(fd, data.replace(_FALSE, _TRUE))
        off += len(data)
        n -= len(data)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def materialize(root: Path) -> list[str]:
    """Write every linked file of dataset ``root`` out as a plain file; drop the links.

    Returns the names written. A plain dataset is left as it is.
    """
    root = Path(root)
    spec = _spec(root)
    if spec is None:
        return []
    fds = [os.open(root / s, os.O_RDONLY) for s in spec["sources"]]
    try:
        for rel, ranges in spec["files"].items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                for src, off, n, flip in ranges:
                    write_ranges(fd, fds[src], off, n, bool(flip))
            finally:
                os.close(fd)
            os.replace(tmp, path)
    finally:
        for fd in fds:
            os.close(fd)
    unlink(root)
    return list(spec["files"])


def unlink(root: Path) -> None:
    """Remove the linked layout of dataset ``root`` (its plain files stay)."""
    (root / LINKED).unlink(missing_ok=True)
    _prune(root, set())
    with contextlib.suppress(OSError):
        (root / LINES_DIR).rmdir()


def _prune(root: Path, keep: set[str]) -> None:
    d = root / LINES_DIR
    if d.is_dir():
        for p in d.iterdir():
            if f"{LINES_DIR}/{p.name}" not in keep:
                p.unlink(missing_ok=True)


def write_spec(root: Path, sources: list[str], files: dict[str, list[tuple[int, int, int, int]]]) -> None:
    """Replace ``linked.json`` atomically, then drop sources no longer named and any plain
    copies of the linked files (a reader prefers the linked form, so the order is safe)."""
    tmp = root / (LINKED + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "sources": sources,
                               "files": {k: [list(r) for r in v] for k, v in files.items()}}))
    os.replace(tmp, root / LINKED)
    _prune(root, set(sources))
    for rel in files:
        (root / rel).unlink(missing_ok=True)


if __name__ == "__main__":  # python -m forged.worker.mine.linked DIR: write a linked dataset out
    import sys

    for d in sys.argv[1:]:
        print(d, *materialize(Path(d)) or ["(not linked)"])
