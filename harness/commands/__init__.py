"""Subcommands of `harness`; every module here is imported by `harness.cli` and adds one command."""
