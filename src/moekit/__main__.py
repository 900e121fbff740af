"""``python -m moekit``: the same as the ``moekit`` console script."""

from moekit.cli import main

raise SystemExit(main())
