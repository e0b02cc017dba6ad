"""Subcommands of the `flowshift` command line, one module each."""
