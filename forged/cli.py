"""``forged``: no command runs the daemon; subcommands run one stage standalone.

The subcommands are imported by name only when asked for, so running the daemon never
loads a worker module.
"""

from __future__ import annotations

import importlib
import sys

from forged import __version__

SUBCOMMANDS = {
    "mine": "forged.worker.mine.cli",
    "train": "forged.worker.train.cli",
    "worker": "forged.worker.main",
    "demo": "forged.daemon.demo",
}


def main(argv: list[str] | None = None) -> int:
    from forged.daemon.main import default_home, run_daemon

    argv = sys.argv[1:] if argv is None else argv
    default_home()
    if argv and argv[0] in SUBCOMMANDS:
        mod = importlib.import_module(SUBCOMMANDS[argv[0]])
        return int(mod.main(argv[1:]) or 0)
    if argv and argv[0] in ("-V", "--version"):
        print(f"forged {__version__}")
        return 0
    if argv and not argv[0].startswith("-"):
        print(f"forged: unknown command {argv[0]!r} (commands: {', '.join(SUBCOMMANDS)}; "
              "no command runs the daemon)", file=sys.stderr)
        return 2
    return run_daemon(argv)


if __name__ == "__main__":
    raise SystemExit(main())
