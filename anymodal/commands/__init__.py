"""One module per CLI subcommand: `add_arguments(parser)` and `run(args) -> int | None`.

Command modules parse arguments and call into the library; they hold no logic of their own.
"""
