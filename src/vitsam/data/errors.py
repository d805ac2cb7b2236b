"""The one exception type of the data layer."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data configuration or unreadable data; the message names the problem and the fix."""
