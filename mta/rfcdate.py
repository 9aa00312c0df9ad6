"""RFC 5322 dates for header fields, formatted at most once a second.

``formatdate`` costs several microseconds; Received and Date headers are
written for every message, so the text is cached for the current second.
"""
import time
from email.utils import formatdate


class DateCache:
    """The current time as an RFC 5322 date: local time, or with *utc* in UTC written
    with the offset ``+0000`` (``formatdate`` writes ``-0000``, which RFC 5322 3.3
    reserves for "the local time zone is unknown")."""

    __slots__ = ("second", "text", "utc")

    def __init__(self, utc: bool = False):
        self.second = -1
        self.text = ""
        self.utc = utc

    def now(self) -> str:
        """The current time as an RFC 5322 date."""
        s = int(time.time())
        if s != self.second:
            self.second = s
            if self.utc:
                self.text = formatdate(s)[:-5] + "+0000"
            else:
                self.text = formatdate(s, localtime=True)
        return self.text


now = DateCache().now
