"""The command-line jobs: each module provides add_args(parser) and run(args) -> int."""
