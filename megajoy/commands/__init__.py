"""Subcommands of the `megajoy` CLI that are not stage drivers."""
