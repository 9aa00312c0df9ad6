"""RFC 5322 dates for header fields, formatted at most once a second.

``formatdate`` costs several microseconds; Received and Date headers are
written for every message, so the text is cached for the current second.
"""
import time
from email.utils import formatdate


class DateCache:
    __slots__ = ("second", "text")

    def __init__(self):
        self.second = -1
        self.text = ""

    def now(self) -> str:
        """The current local time as an RFC 5322 date."""
        s = int(time.time())
        if s != self.second:
            self.second = s
            self.text = formatdate(s, localtime=True)
        return self.text


now = DateCache().now
