"""The label log read back: the labels it holds, oldest first, and how offsets order.

For an operator or a test harness checking that acknowledged feedback was neither lost nor
duplicated, and that the trainer applied it (``reliability/outages.py`` does after each
outage): every label answered 2xx is in the log once (by its event id), and the trainer has
applied them all once the offset it consumed (``GET /model``: ``trainer.consumed``) reaches
the last entry's. Offsets are strings of either backend (SQLite row ids ``"17"``, Redis ids
``"1700-3"``): compare them with ``offset_key``, never as strings.

    from patterns.online_learning.label_log import labels, last_offset, offset_key
    entries = labels("sqlite:///artifacts/online_learning/feedback.db")
    done = offset_key(consumed) >= offset_key(last_offset(entries))
"""

from __future__ import annotations

from collections.abc import Iterable

from patterns.online_learning.feedback_log import START, Entry, offset_key, open_log
from patterns.online_learning.learning import LABELS_STREAM

__all__ = ["Entry", "labels", "last_offset", "offset_key"]

# Above every offset either backend hands out: "everything up to now".
_NEWEST = "999999999999999-0"


def labels(log_url: str, *, limit: int = 1_000_000) -> list[Entry]:
    """The last ``limit`` labels of the log at ``log_url`` (``sqlite:///...`` or
    ``redis://...``), oldest first; each has its ``offset``, ``event_id`` and ``payload``."""
    log = open_log(log_url)
    try:
        return log.tail(LABELS_STREAM, _NEWEST, limit)
    finally:
        log.close()


def last_offset(entries: Iterable[Entry]) -> str:
    """The highest offset among ``entries``; the log's start (``"0"``) when there are none."""
    return max((e.offset for e in entries), key=offset_key, default=START)
