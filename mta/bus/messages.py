"""Every message that crosses a process boundary, declared once, and its codec.

Each message is a msgspec Struct: its fields, their types and their bounds are
written once, here, next to the route the message travels.  The records a
message carries (an envelope, a delivery job's recipient, a delivery result)
are Structs too, declared next to the message that carries them.  Senders
build these values and receivers read them by attribute; nothing outside this
package builds or unpacks a bus record by position.

Wire format: one ZeroMQ frame per message, a msgpack array whose first item
is the message's code (msgspec's array-like tagged union) followed by the
fields in declared order.  ``array_like`` keeps field names off the wire, so a
record costs what the bare list did.  Bodies (raw RFC 5322 messages) are
msgpack ``bin`` fields.  One frame, not one per body: each extra frame costs a
separate zmq_msg_send (measured 17 µs for three frames against 7 µs for one,
send and receive included).

Decoding is strict: a message of an unknown code, a missing or extra field, a
field of the wrong type or outside its bounds raises :class:`BusError`, so a
receiver never fails later on a value it took in (a shard must not die on its
input).  :func:`receive` is the one place that decodes, logs what it drops and
checks that the message is one the receiver takes.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "BusError", "Message", "MESSAGES", "encode", "encode_request", "decode", "receive", "MAX_QID",
    "STATUS_OK", "STATUS_STORAGE", "STATUS_UNKNOWN",
    "DELIVERED", "DEFERRED", "FAILED", "REQUEUED", "OUTCOMES",
    "PRIORITY_BULK", "PRIORITY_TRANSACTIONAL",
    "Envelope", "JobRecipient", "Result", "FiredRule", "QueueEntry",
    "SpoolMessageCommit", "SpoolMessageCommitted", "SpoolEventsCommit", "MAX_REPORT_EVENTS", "SpoolQueueSummary",
    "SpoolQueueSummaryReply", "SpoolQueueList", "SpoolQueueListReply", "SpoolMessageShow",
    "SpoolMessageShowReply", "SpoolMessageDelete", "SpoolMessageDeleteReply",
    "SpoolQueueFlush", "SpoolQueueFlushReply", "SpoolAdminBounce", "SpoolAdminProgress",
    "SpoolAdminRefresh", "SpoolAdminReply", "DeliveryMessageReady", "DeliveryOutcome",
    "DeliveryOutcomes", "MAX_OUTCOMES_PER_SEND", "DeliveryJobs", "MAX_JOBS_PER_SEND",
    "DeliveryQueueFlush", "MAX_FLUSH_NAMES",
    "MAX_JOB_BATCH_BYTES",
    "SPOOL_REQUESTS", "SPOOL_REPLIES", "DELIVERY_JOBS", "DELIVERY_OUTCOMES",
    "StatSample", "StatHistogram", "StatsReport", "STATS_REPORTS",
]


class BusError(Exception):
    """A malformed or undeclared bus message."""


# ---------------------------------------------------------------- vocabularies

# Reply status of *_COMMITTED and *_REPLY messages.
STATUS_OK = 0
STATUS_STORAGE = 1   # the spool could not make it durable (EIO, ENOSPC, ...)
STATUS_UNKNOWN = 2   # no such queue id / request not understood

# What a delivery attempt did to one recipient (DELIVERY_OUTCOME results).
DELIVERED = "delivered"   # the receiver took it (2xx after DATA)
DEFERRED = "deferred"     # try again later (4xx, connection or DNS trouble)
FAILED = "failed"         # permanent failure (5xx, null MX, NXDOMAIN): bounce
# Not attempted: no source of the message's pool may send to the site now
# (suspended), or the site's ready queue is full.  Not an attempt: the spool
# tries again after the outcome's retry_after, counts nothing, logs no failure.
REQUEUED = "requeued"
OUTCOMES = (DELIVERED, DEFERRED, FAILED, REQUEUED)

MAX_QID = 64        # longest queue id a message may carry

# DELIVERY_MESSAGE_READY priority: transactional messages go first in every
# queue they share with bulk ones (options.transactional).
PRIORITY_BULK = 0
PRIORITY_TRANSACTIONAL = 1

QueueId = Annotated[str, Meta(min_length=1, max_length=MAX_QID)]
MAX_FLUSH_NAMES = 1000   # domains or queue ids one selective flush names at most
Domain = Annotated[str, Meta(min_length=1, max_length=255)]
LaneName = Annotated[str, Meta(max_length=1000)]    # a site's or a source's name, or "*"
Outcome = Literal["delivered", "deferred", "failed", "requeued"]


class Message(Struct, array_like=True, forbid_unknown_fields=True, tag=True):
    """Base of every bus message: ``req`` is chosen by the sender, echoed by the reply."""

    NAME: ClassVar[str] = ""
    ROUTE: ClassVar[str] = ""


# ------------------------------------------------------------ acceptor -> spool

class Envelope(Struct, array_like=True, forbid_unknown_fields=True):
    """One message's envelope, as the acceptor hands it to its spool shard."""

    qid: QueueId
    sender: str                                         # "" for the null sender
    rcpts: Annotated[list[str], Meta(min_length=1)]
    params: dict                                        # MAIL parameters kept, X-MSYS-API, ...
    client: str                                         # "helo [ip] user=..." for the log
    arrival: float                                      # epoch seconds
    message_id: str = ""                                # the Message-ID header's value


class SpoolMessageCommit(Message, tag=1):
    """Make these messages durable, then answer once for all of them."""

    req: int
    envelopes: list[Envelope]
    bodies: list[bytes]                                 # one per envelope, in order

    def __post_init__(self):
        if len(self.envelopes) != len(self.bodies):
            raise ValueError("one body per envelope")


class SpoolMessageCommitted(Message, tag=2):
    req: int
    status: int                                         # STATUS_*


MAX_REPORT_EVENTS = 2000    # events in one SpoolEventsCommit (a larger batch is split)


class SpoolEventsCommit(Message, tag=15):
    """Make these events durable (no message to deliver), then answer SpoolMessageCommitted.

    The ``out_of_band`` / ``spam_complaint`` events of one report sent to a
    bounce domain, or the refusals of recipients at injection (policy_rejection,
    generation_failure, generation_rejection), as internal events
    (``mta.obs.events.ACCEPTOR_TYPES``); the shard writes them in its group
    commit like its own, so the events process carries them to the log, the
    events store and webhooks.
    """

    req: int
    events: Annotated[list[dict], Meta(min_length=1, max_length=MAX_REPORT_EVENTS)]


# --------------------------------------------------------------- cli -> spool

class SpoolQueueSummary(Message, tag=3):
    req: int


class SpoolQueueSummaryReply(Message, tag=4):
    req: int
    summary: dict


class SpoolQueueList(Message, tag=5):
    """One page of the queue (mta.spool.queries.listing): ask again from the reply's
    ``last`` until it is ""."""

    req: int
    limit: int                                          # 0: no limit (up to the shard's own)
    after: str = ""                                     # from the queue id after this one


class QueueEntry(Struct, array_like=True, forbid_unknown_fields=True):
    """One queued message as ``mta queue list`` shows it."""

    qid: str
    sender: str
    rcpts: list[str]
    arrival: float
    size: int
    states: list[str]                                   # per recipient: "pending", ...
    attempts: list[int]
    due: list[float]                                    # next attempt, per recipient


class SpoolQueueListReply(Message, tag=6):
    req: int
    entries: list[QueueEntry]
    last: str = ""                                      # the next page's ``after``; "": done


class SpoolMessageShow(Message, tag=7):
    req: int
    qid: str


class SpoolMessageShowReply(Message, tag=8):
    req: int
    status: int
    entry: Union[dict, None]
    body: bytes
    # the shard is still reading its queue at start: not known yet whether the message
    # is queued (status STATUS_STORAGE, entry None: a reader that does not know this
    # field takes it for "try again", never for "not queued")
    recovering: bool = False


class SpoolMessageDelete(Message, tag=9):
    req: int
    qids: list[str]


class SpoolMessageDeleteReply(Message, tag=10):
    req: int
    status: int
    deleted: list[str]


class SpoolQueueFlush(Message, tag=13):
    req: int
    # only the messages delivery REQUEUED (a site or source suspension ended)
    requeued: bool = False
    # only the recipients at these domains (mta queue flush --domain), of these messages
    # (--queue-id); neither: every deferred recipient
    domains: Annotated[list[Domain], Meta(max_length=MAX_FLUSH_NAMES)] = []
    qids: Annotated[list[QueueId], Meta(max_length=MAX_FLUSH_NAMES)] = []
    # with requeued: only what these lanes handed back, (site, source) pairs ("*": any;
    # source "": none of the pool's could send); none: every lane's
    lanes: Annotated[list[tuple[LaneName, LaneName]], Meta(max_length=MAX_FLUSH_NAMES)] = []


class SpoolQueueFlushReply(Message, tag=14):
    req: int
    count: int
    unknown: list[str] = []         # the qids asked for that are not queued
    # the shard is reading its queue at start: the flush is done once it has (count and
    # unknown are not known now: 0, [])
    recovering: bool = False


class SpoolAdminBounce(Message, tag=16):
    """Start bouncing every pending recipient *selector* matches (mta.controls)."""

    req: int
    op: Annotated[str, Meta(min_length=1, max_length=64)]   # the operation's id (node-wide)
    selector: dict                                      # controls.Selector's fields
    reason: Annotated[str, Meta(max_length=1000)]
    dsn: bool                                           # a DSN to each sender too


class SpoolAdminProgress(Message, tag=17):
    req: int
    op: str                                             # "": every operation the shard knows


class SpoolAdminRefresh(Message, tag=19):
    """The suspensions file changed: read it now (answered with SpoolAdminReply)."""

    req: int


class SpoolAdminReply(Message, tag=18):
    req: int
    status: int                                         # STATUS_UNKNOWN: no such op / bad selector
    ops: list[dict]                                     # [{id, total, done, finished, started}]
    error: str = ""


# ------------------------------------------------------- spool <-> delivery

class JobRecipient(Struct, array_like=True, forbid_unknown_fields=True):
    index: int                                          # the recipient's index in its message
    address: str


class DeliveryMessageReady(Message, tag=11):
    """A message's recipients for one domain, ready to be delivered now."""

    req: int
    qid: QueueId
    sender: str
    domain: str
    rcpts: Annotated[list[JobRecipient], Meta(min_length=1)]
    params: dict                                        # BODY / SMTPUTF8 of the reception
    attempt: int
    body: bytes
    pool: str = "default"                               # egress pool (checked at injection)
    priority: int = PRIORITY_BULK                       # PRIORITY_*


class Result(Struct, array_like=True, forbid_unknown_fields=True):
    """What one delivery attempt did to one recipient."""

    index: int
    outcome: Outcome                                    # DELIVERED | DEFERRED | FAILED
    code: int                                           # the SMTP reply code (or ours)
    enhanced: str                                       # "4.4.1"; "" when none
    text: str
    host: str                                           # remote host name; "" before connect
    ip: str
    dsn: bool = False                                   # the next hop took NOTIFY/ORCPT (DSN)
    bounce_class: str = ""                              # set by a response rule's bounce action
    # the response rule its own reply fired (none: None); trailing, so that a Result
    # of a delivery process of the version before (no rule) still decodes
    rule: FiredRule | None = None
    # the text is ours, though *host* is set ("... does not accept 8-bit messages", a
    # connection lost, a reply the delivery client made up): no reply received
    local: bool = False


class FiredRule(Struct, array_like=True, forbid_unknown_fields=True):
    """The response rule a receiver's reply matched during one job (mta/delivery/adaptive.py)."""

    name: str                                           # the rule's name ("yahoo-tss04")
    id: str                                             # the entry in effect ("" for bounce/defer)
    action: str                                         # suspend | throttle | bounce | defer
    scope: str                                          # source_site | site | source
    reply: str                                          # the reply it matched, one line
    stage: str                                          # connect greeting ehlo mail rcpt data
    until: float = 0.0                                  # wall-clock end of a suspend/throttle


class DeliveryOutcome(Message, tag=12):
    """One job's results, back to the shard that owns the message."""

    req: int
    qid: QueueId
    results: list[Result]
    source: str = ""                                    # egress source used; "" if none
    source_ip: str = ""                                 # its address ("" = system's choice)
    site: str = ""                                      # the receiving site's name
    retry_after: float = 0.0                            # REQUEUED: seconds before the next try
    #                                                     (also set by a rule's defer action)
    rule: FiredRule | None = None                       # the job's first fired rule (its
    #                                                     log line; each Result has its own)
    # the receiver's session: "1" TLS used, "0" plaintext (STARTTLS not offered or not
    # asked for), "-1" offered but refused or failed; "" no session (SparkPost's outbound_tls)
    outbound_tls: Literal["", "1", "0", "-1"] = ""


MAX_OUTCOMES_PER_SEND = 256     # DeliveryOutcome items in one DeliveryOutcomes


class DeliveryOutcomes(Message, tag=20):
    """Several jobs' outcomes in one message, in the order they were finished.

    A delivery process sends what finished in one turn of its loop together
    (one ZeroMQ message, one wake-up of the shard, instead of one each); the
    shard takes them exactly as it would the single DeliveryOutcome messages.
    """

    outcomes: Annotated[list[DeliveryOutcome], Meta(min_length=1, max_length=MAX_OUTCOMES_PER_SEND)]


MAX_JOBS_PER_SEND = 64          # DeliveryMessageReady items in one DeliveryJobs
MAX_JOB_BATCH_BYTES = 1 << 20   # octets of message bodies in one DeliveryJobs (a bigger job
                                # goes alone)


class DeliveryJobs(Message, tag=21):
    """Several jobs for one delivery process in one message, in dispatch order.

    A shard sends the jobs of one dispatch pass to each process together (one
    ZeroMQ message, one wake-up of the process, instead of one each); the
    process takes them exactly as it would the single DeliveryMessageReady
    messages.  Bounded in count and in octets of bodies (MAX_JOB_BATCH_BYTES).
    """

    jobs: Annotated[list[DeliveryMessageReady], Meta(min_length=1, max_length=MAX_JOBS_PER_SEND)]


class DeliveryQueueFlush(Message, tag=22):
    """The operator flushed the queue (mta queue flush): end every dead-site hold now
    (with *domains*: only those of the sites these domains go to).

    Sent by each shard to every delivery process ahead of the jobs the flush made
    due, so that they find the sites that failed a moment ago open again.
    """

    domains: Annotated[list[Domain], Meta(max_length=MAX_FLUSH_NAMES)] = []


# ------------------------------------------------------------ every child -> admin

class StatSample(Struct, array_like=True, forbid_unknown_fields=True):
    """One counter or gauge value of a family declared in :mod:`mta.obs.catalog`."""

    name: str
    labels: list[str]                                   # values, in the family's label order
    value: float


class StatHistogram(Struct, array_like=True, forbid_unknown_fields=True):
    """One histogram of a declared family: a count per bucket (not cumulative) and the sum."""

    name: str
    labels: list[str]
    counts: list[int]                                   # len(buckets) + 1: the last is +Inf
    sum: float


class StatsReport(Message, tag=40):
    """A child's statistics snapshot, pushed about once a second, dropped when nobody reads.

    Counters and histograms are cumulative since the child started, so a
    dropped snapshot loses nothing: the next one carries the same totals.
    """

    req: int                                            # the child's snapshot number
    role: str
    index: int
    pid: int
    counters: list[StatSample]
    gauges: list[StatSample]
    histograms: list[StatHistogram]


# ------------------------------------------------------------------- the table

_TABLE = (
    (SpoolMessageCommit, "SPOOL_MESSAGE_COMMIT", "acceptor -> spool"),
    (SpoolMessageCommitted, "SPOOL_MESSAGE_COMMITTED", "spool -> acceptor"),
    (SpoolEventsCommit, "SPOOL_EVENTS_COMMIT", "acceptor -> spool"),
    (SpoolQueueSummary, "SPOOL_QUEUE_SUMMARY", "cli -> spool"),
    (SpoolQueueSummaryReply, "SPOOL_QUEUE_SUMMARY_REPLY", "spool -> cli"),
    (SpoolQueueList, "SPOOL_QUEUE_LIST", "cli -> spool"),
    (SpoolQueueListReply, "SPOOL_QUEUE_LIST_REPLY", "spool -> cli"),
    (SpoolMessageShow, "SPOOL_MESSAGE_SHOW", "cli -> spool"),
    (SpoolMessageShowReply, "SPOOL_MESSAGE_SHOW_REPLY", "spool -> cli"),
    (SpoolMessageDelete, "SPOOL_MESSAGE_DELETE", "cli -> spool"),
    (SpoolMessageDeleteReply, "SPOOL_MESSAGE_DELETE_REPLY", "spool -> cli"),
    (DeliveryMessageReady, "DELIVERY_MESSAGE_READY", "spool -> delivery"),
    (DeliveryJobs, "DELIVERY_JOBS", "spool -> delivery"),
    (DeliveryOutcome, "DELIVERY_OUTCOME", "delivery -> spool"),
    (DeliveryOutcomes, "DELIVERY_OUTCOMES", "delivery -> spool"),
    (DeliveryQueueFlush, "DELIVERY_QUEUE_FLUSH", "spool -> delivery"),
    (SpoolQueueFlush, "SPOOL_QUEUE_FLUSH", "cli -> spool"),
    (SpoolQueueFlushReply, "SPOOL_QUEUE_FLUSH_REPLY", "spool -> cli"),
    (SpoolAdminBounce, "SPOOL_ADMIN_BOUNCE", "admin -> spool"),
    (SpoolAdminProgress, "SPOOL_ADMIN_PROGRESS", "admin -> spool"),
    (SpoolAdminRefresh, "SPOOL_ADMIN_REFRESH", "admin -> spool"),
    (SpoolAdminReply, "SPOOL_ADMIN_REPLY", "spool -> admin"),
    (StatsReport, "ADMIN_STATS_REPORT", "every child -> admin"),
)

for _cls, _name, _route in _TABLE:
    _cls.NAME = _name
    _cls.ROUTE = _route

MESSAGES: dict[str, type[Message]] = {name: cls for cls, name, _ in _TABLE}

# What each receiver takes (receive() drops anything else, logged).
SPOOL_REQUESTS = (SpoolMessageCommit, SpoolEventsCommit, SpoolQueueSummary, SpoolQueueList, SpoolMessageShow,
                  SpoolMessageDelete, SpoolQueueFlush, SpoolAdminBounce, SpoolAdminProgress,
                  SpoolAdminRefresh)
SPOOL_REPLIES = (SpoolMessageCommitted, SpoolQueueSummaryReply, SpoolQueueListReply,
                 SpoolMessageShowReply, SpoolMessageDeleteReply, SpoolQueueFlushReply,
                 SpoolAdminReply)
DELIVERY_JOBS = (DeliveryMessageReady, DeliveryJobs, DeliveryQueueFlush)
DELIVERY_OUTCOMES = (DeliveryOutcome, DeliveryOutcomes)
STATS_REPORTS = (StatsReport,)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Union[tuple(cls for cls, _, _ in _TABLE)]).decode
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError)


def encode(msg: Message) -> bytes:
    """The one wire frame of *msg*."""
    return _encode(msg)


def encode_request(msg: Message) -> bytes:
    """The frame of *msg* without its trailing fields that are at their default: a
    request of the command-line tools, which a running daemon of the version before
    (the package upgraded, ``mta upgrade`` not run yet) decodes too -- decoding refuses
    an extra field, and fields are only ever added at the end, with a default.  (A walk
    of the message's fields: not for the hot path.)"""
    cls = type(msg)
    values = [getattr(msg, name) for name in cls.__struct_fields__]
    n = len(values)
    for f in reversed(msgspec.structs.fields(cls)):
        if f.default is not msgspec.NODEFAULT:
            default = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            default = f.default_factory()
        else:
            break
        if values[n - 1] != default:
            break
        n -= 1
    return _encode([cls.__struct_config__.tag, *values[:n]])


def decode(frame) -> Message:
    """Parse one wire frame into its message; BusError when it is not a declared message."""
    try:
        return _decode(frame)
    except _DECODE_ERRORS as exc:
        raise BusError(f"{_name_of(frame)}: {exc}") from None


def receive(frames: list, takes: tuple, log, source: str):
    """Decode the frames of one message a receiver got; None (logged) unless it takes it.

    *takes* are the message classes this receiver handles; *source* names the
    peer in the log line ("request", "outcome", "reply from the spool").
    """
    if len(frames) != 1:
        log.warning("dropped a malformed %s: %d frames", source, len(frames))
        return None
    try:
        msg = _decode(frames[0])
    except _DECODE_ERRORS as exc:
        log.warning("dropped a malformed %s: %s: %s", source, _name_of(frames[0]), exc)
        return None
    if not isinstance(msg, takes):
        log.warning("dropped an unexpected %s: %s", source, msg.NAME)
        return None
    return msg


def _name_of(frame) -> str:
    """The declared name of a frame's message, as far as its code can be read (for errors)."""
    b = bytes(frame[:2])
    # A msgpack array header (fixarray, array16/32) followed by a positive fixint code.
    if len(b) == 2 and 0x90 <= b[0] <= 0x9f and b[1] < 0x80:
        for cls, name, _ in _TABLE:
            if cls.__struct_config__.tag == b[1]:
                return name
        return f"unknown message code {b[1]}"
    return "undecodable message"
