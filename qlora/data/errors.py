"""The data pipeline's two exceptions, shared by the formatters, the sources and the Spider reader."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data: the message names the file, row or field and what to do."""


class SkipRow(Exception):
    """A row the formatter cannot use (e.g. its Spider database file is absent): skipped and counted by reason."""
