"""Exceptions that the CLI turns into one-line messages and exit codes.

A user mistake must never end in a bare traceback: bad data exits 1, bad usage exits 2.
"""
from __future__ import annotations


class MrisynthError(Exception):
    """Base class: a problem the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class DataError(MrisynthError):
    """An input file or folder is not what mrisynth needs (exit code 1)."""

    exit_code = 1


class UsageError(MrisynthError):
    """The command was called wrongly: bad option value, missing folder argument (exit code 2)."""

    exit_code = 2
