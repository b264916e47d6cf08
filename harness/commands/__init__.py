"""Subcommands of `harness`: `harness.cli` imports every module here, and each adds one command
(`path_options` holds the options several of them share)."""
