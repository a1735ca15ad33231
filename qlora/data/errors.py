"""The data pipeline's two exceptions, shared by the formatters, the sources and the Spider reader, and the one
test of what is not text that they all apply."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data: the message names the file, row or field and what to do."""


class SkipRow(Exception):
    """A row the formatter cannot use (e.g. its Spider database file is absent): skipped and counted by reason."""


def lone_surrogate(text: str) -> str | None:
    """The escape (e.g. "\\ud800") of the first lone UTF-16 surrogate in `text`, None when there is none. JSON can
    spell one (`"\\ud800"`, half of an emoji's pair); such a string is not text: it cannot be written as UTF-8
    or tokenised. A surrogate pair is decoded to one character and is fine."""
    bad = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
    return f"\\u{ord(bad):04x}" if bad else None
