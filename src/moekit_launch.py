"""The entry point of the ``moekit`` console script, kept outside the ``moekit`` package.

Importing ``moekit`` imports torch, which takes seconds; a Ctrl-C in that time would otherwise end
the command with a traceback from the middle of torch's import. Here nothing heavy is imported
before the guard, so an interrupt during start-up ends it as one anywhere else does: one line on
stderr and exit status 130. ``python -m moekit`` imports the package first and has no such guard.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Import the command line and run it; 130 when interrupted during the import."""
    try:
        from moekit.cli import main as run
    except KeyboardInterrupt:
        print("moekit: interrupted while starting up", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    raise SystemExit(main())
