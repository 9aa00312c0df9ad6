"""The event log: one JSON object per line for every reception and every outcome.

Types (KumoMTA's names, lower-case as SparkPost's): ``reception``,
``delivery``, ``transient_failure``, ``bounce``, ``expiration``.
Fields: ``type``, ``timestamp`` (epoch seconds), ``queue_id``, ``message_id``,
``sender``, ``recipient``, and where known ``remote_host``, ``remote_ip``,
``response`` {code, enhanced, text}, ``attempt``, ``time_in_queue``,
``next_attempt``, ``size``, ``client``, for outcomes the ``source`` (egress
source), ``sending_ip`` and ``site`` the delivery process reported, and the
message's ``campaign_id``,
``metadata``, ``tags``, ``ip_pool``, ``transactional`` when it was injected
with them.

Written by the spool shard that owns the message, the process that records
the state change durably, so the log never claims more than the spool knows.
Records are encoded with orjson into a buffer and written with one ``write``
per group commit (O_APPEND: whole lines from several shards never interleave
inside a line), after the fsync that made the change durable.  An event is
therefore logged at least once; after a crash between the fsync and the write
it may be missing the line for a recipient whose state was recorded, which is
why readers should treat the spool (``mta queue``) as the source of truth.
"""
from __future__ import annotations

import logging
import os
import time

import orjson

log = logging.getLogger("mta.events")

RECEPTION = "reception"
DELIVERY = "delivery"
TRANSIENT_FAILURE = "transient_failure"
BOUNCE = "bounce"
EXPIRATION = "expiration"

FLUSH_BYTES = 1 << 20   # write early when this much is buffered

# Injection attributes (SparkPost's campaign_id, metadata, tags; X-MSYS-API on
# SMTP) stored in a message's params and repeated in each of its events.
CARRIED = ("campaign_id", "metadata", "tags", "ip_pool", "transactional")
_CARRIED_KEYS = frozenset(CARRIED)

_dumps = orjson.dumps
_LINE = orjson.OPT_APPEND_NEWLINE


def carried(params: dict) -> dict:
    """The injection attributes of a message that every event about it repeats."""
    if _CARRIED_KEYS.isdisjoint(params):
        return {}  # the common case, decided in C (no loop over CARRIED)
    return {k: params[k] for k in CARRIED if k in params}


class EventLog:
    """Buffered JSON-lines writer; ``emit`` is cheap, ``flush`` does the I/O."""

    def __init__(self, path: str | None):
        self.path = path
        self.buf: list[bytes] = []
        self.size = 0
        self.fd = -1
        self.failed = False
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    @property
    def enabled(self) -> bool:
        """False when there is no log (or it is closed): events need not be built."""
        return self.fd >= 0

    def emit(self, event: dict) -> None:
        if self.fd < 0:
            return
        if "timestamp" not in event:
            event["timestamp"] = time.time()
        line = _dumps(event, option=_LINE)  # the newline appended without a copy
        self.buf.append(line)
        self.size += len(line)
        if self.size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.buf or self.fd < 0:
            return
        data = b"".join(self.buf)
        self.buf.clear()
        self.size = 0
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            if self.failed:
                log.info("event log writes are succeeding again")
                self.failed = False
        except OSError as exc:
            if not self.failed:
                log.error("event log write to %s failed: %s; events are being dropped",
                          self.path, exc.strerror)
            self.failed = True

    def close(self) -> None:
        self.flush()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
