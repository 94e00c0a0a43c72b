"""The `echox` command line: one entry point, subcommands registered by each package."""
