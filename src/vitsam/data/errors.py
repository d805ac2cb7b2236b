"""The one exception type of the data layer."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data configuration or unreadable data; the message names the problem and the fix."""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for a setting quoted in a one-line error (a
    damaged config can hold a 200,000-character string)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
