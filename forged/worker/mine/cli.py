"""`forged mine REPO [--out DIR] [--config FILE] [--since COMMIT] [--commit REV]`."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path


def _progress(d: dict) -> None:
    """One overwritten line on stderr: files mined, then teacher questions asked."""
    if d.get("stage") == "mine":
        print(f"\rmining {d['files_done']}/{d['files_total']} files", end="", file=sys.stderr)
    elif d.get("stage") == "teacher":
        print(f"\rteacher {d['questions_done']}/{d['questions_total']} questions", end="", file=sys.stderr)


def _quiet(d: dict) -> None:
    pass


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="forged mine",
                                 description="Mine a git repo at a commit into a JSONL dataset.")
    ap.add_argument("repo", type=Path, help="a git repository (its committed state is mined)")
    ap.add_argument("--out", type=Path, help="output directory (default: <cache>/datasets/<repo>-<sha>)")
    ap.add_argument("--config", type=Path, help="config.toml to read [mine] from (default: defaults)")
    ap.add_argument("--since", help="mark examples from files changed since this commit")
    ap.add_argument("--commit", default="HEAD", help="commit to mine (default: HEAD)")
    ap.add_argument("--cache", type=Path, help="chunk cache directory (default: forged's cache)")
    ap.add_argument("--linked", action="store_true",
                    help="keep the training split as links into the line store (fast re-mines; "
                         "`python -m forged.worker.mine.linked DIR` writes it out for mlx-lm)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)

    from forged.common import config, paths
    from forged.worker.mine import mine_repo
    from forged.worker.mine.gitio import GitError, resolve

    try:
        full = config.load(args.config, check_paths=False) if args.config else config.Config()
    except config.ConfigError as e:
        print(f"forged mine: {e}", file=sys.stderr)
        return 2
    if args.config and not args.config.exists():
        print(f"forged mine: {args.config}: no such config file", file=sys.stderr)
        return 2
    cfg = full.mine
    p = paths.resolve()
    cache = args.cache or p.cache_dir / "mine"
    from forged.common import fim
    from forged.common.models import ModelError, resolve_base

    try:  # FIM examples are rendered in the configured base's format
        base = resolve_base(full.train.base_model)
        fmt = fim.for_base(base.kind, base.path)
    except (ModelError, fim.FimError) as e:
        print(f"forged mine: {e}", file=sys.stderr)
        return 1
    try:
        sha = resolve(args.repo, args.commit)
        out = args.out or p.state_dir / "datasets" / f"{config.default_repo_name(args.repo)}-{sha[:12]}"
        rep = mine_repo(args.repo, out, cfg, cache, commit=sha, changed_since=args.since,
                        progress=_quiet if args.quiet else _progress, linked=args.linked,
                        ollama_host=full.publish.ollama_host, context_tokens=full.train.seq_len,
                        fim_format=fmt)
    except GitError as e:
        print(f"\nforged mine: {e}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as e:  # a full disk, an unwritable --out or cache
        print(f"\nforged mine: {paths.describe_failure(e)}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(file=sys.stderr)
    summary = {k: getattr(rep, k) for k in ("commit", "files_total", "files_mined", "files_parsed",
                                            "chunks", "examples", "skipped", "redactions")}
    if rep.teacher.get("status", "off") != "off":
        summary["teacher"] = rep.teacher
    summary["seconds"] = rep.durations.get("total")
    print(json.dumps(summary, indent=1))
    print(f"dataset written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
