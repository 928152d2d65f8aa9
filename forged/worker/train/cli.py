"""``forged train DATASET_DIR --out DIR [--config FILE]``: train, streaming JSON lines on stdout.

Each progress event is one JSON object per line; the last line is the result
(``{"event": "done", ...}``) or an error (``{"event": "error", "message": ...}``).
SIGTERM/SIGINT set the stop flag: the run checkpoints and exits 0 with
``"stopped": true``; run the same command again to resume.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path


def _print(event: dict) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="forged train", description="Fine-tune an adapter on a mined dataset.")
    ap.add_argument("dataset_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="output directory (adapter/ and checkpoints/)")
    ap.add_argument("--config", type=Path, help="config.toml (default: forged's config file)")
    ap.add_argument("--warm-start", type=Path, help="adapter directory to continue from")
    ap.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a [train] key, e.g. --set max_steps=20 (TOML value)")
    args = ap.parse_args(argv)

    from forged.common import config as config_mod
    from forged.common import paths

    try:
        cfg_file = args.config or paths.resolve().config_file
        cfg = config_mod.load(cfg_file, check_paths=False)
        if args.set:
            import tomllib

            text = "\n".join(args.set)
            overrides = tomllib.loads(text)
            merged = {**config_mod.to_dict(cfg)["train"], **overrides}
            cfg = config_mod.parse("", None, check_paths=False)
            cfg.train = config_mod._build(type(cfg.train), merged, "train", lambda _k: "")
    except (config_mod.ConfigError, ValueError) as e:
        _print({"event": "error", "message": str(e)})
        return 2

    stop = threading.Event()

    def on_signal(_sig: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from forged.common.backends import BackendError
    from forged.common.models import ModelError
    from forged.worker.train import train
    from forged.worker.train.data import DatasetError
    from forged.worker.train.run import TrainError

    try:
        res = train(args.dataset_dir, args.out, cfg.train, warm_start=args.warm_start,
                    resume=not args.no_resume, progress=_print, stop=stop)
    except (DatasetError, ModelError, BackendError, MemoryError) as e:
        _print({"event": "error", "message": str(e)})
        return 2
    except TrainError as e:
        _print({"event": "error", "message": str(e), "checkpoint": str(e.checkpoint) if e.checkpoint else None})
        return 3
    _print({"event": "result", **res.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
