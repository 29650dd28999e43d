"""Subcommands of the ``compt`` tool: each module here is one subcommand.

A module registers itself with ``register(subparsers)`` and sets ``func`` on its parser.
"""
