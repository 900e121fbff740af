"""Command-line jobs that are more than a page of glue: each module provides ``add_args`` and ``run``."""
