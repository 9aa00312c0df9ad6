"""acceptor[i]: the SMTP and HTTP injection server process, on uvloop.

What it does: takes mail in from clients over SMTP (``smtp.py``, STARTTLS and
AUTH in ``tls_auth.py``) and over SparkPost's transmissions API (``http.py``),
signs each message once with DKIM, gives it a queue id and sends it to the
spool shard that owns that id; a client hears "accepted" only once the shard
says the message is on disk.  It never touches spool files.

Reads:   client connections on the listening sockets the supervisor made for
         slot i, SMTP and HTTP (SO_REUSEPORT: each slot has its own sockets and
         accept queues; the supervisor keeps them open, so a crashed or
         replaced acceptor's queued connections wait for its successor instead
         of being reset); the idempotency database (state_dir, shared); the
         free space of the spool file system (statvfs, twice a second, less
         what was sent to the spool since: see :meth:`Acceptor.submit`).
Writes:  SPOOL_MESSAGE_COMMIT to the shard chosen by the queue id;
         SPOOL_EVENTS_COMMIT with the events of a report sent to a bounce
         domain (``reports.py``) and that report's suppression entries; SMTP
         replies and HTTP responses; log lines.
Peers:   SMTP and HTTP clients; spool[0..S) over the bus (one DEALER socket per
         shard: SPOOL_MESSAGE_COMMIT out, SPOOL_MESSAGE_COMMITTED back); the
         supervisor only through the ready fd and signals.
Config:  [feedback] bounce_domains, bounce_rules; [smtp] (all keys), [http] (all keys; max_json_depth for X-MSYS-API
         too), [spool] queue_high_water,
         min_free_bytes, min_free_percent, [server] hostname, log_level,
         ready_timeout, shutdown_timeout, [dkim].

Hot path: :class:`mta.acceptor.smtp.Session` / :class:`mta.acceptor.http.Session`
per connection.  An SMTP session hands each finished message over as one
:class:`mta.acceptor.smtp.Submission` to :meth:`Acceptor.commit`, which parses
an ``X-MSYS-API`` header into the message's params (campaign_id, metadata,
tags, ip_pool, transactional: carried into every event) and removes it; HTTP
builds its messages itself.  Both end in :meth:`Acceptor.submit`, which signs,
reads the Message-ID, From address and Subject once (one pass over the header
block; From and Subject go into the params, bounded, for every event of the
message; with ``smtp.add_missing_headers`` the same pass looks for Date, and a
Message-ID ``<qid@hostname>`` and a Date missing from SMTP mail are put in front
before signing), prepends the Received header and queues the message for its shard; what is
queued in one loop iteration goes to each shard as one bus request, and
replies are matched to messages by request number.

Failure and pressure: a shard that does not answer within
``smtp.spool_timeout``, a full bus queue or a storage error → 451 4.3.0 for
that message (HTTP: that recipient fails, 503 if all do); low free space on
the spool file system → 452 4.3.1 at MAIL (HTTP 503).  Both clear by
themselves.  Free space is the last statvfs less the octets sent to the spool
since (and those still unanswered then), so a burst between two statvfs calls
meets 452 at MAIL before it meets a real ENOSPC (451); what the other
acceptors send meanwhile is not counted, so ``spool.min_free_bytes`` should
leave room for a burst of each.  A DKIM signing error is logged and the message queued unsigned.
SIGTERM: stop accepting, let sessions finish (idle ones are closed with 421
4.3.2), after ``server.shutdown_timeout`` close the rest, wait for
outstanding spool answers, exit 0.  SIGHUP is ignored: the supervisor
starts all new acceptors on reload, then stops the old ones.
Node drain (``mta drain``): while ``<run>/drain`` exists (looked for at each
sweep) new SMTP connections and transactions get 421 4.3.2 and HTTP
injections 503 with Retry-After; sessions and transactions under way finish.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import operator
import os
import signal
import socket
import ssl
import threading
import time

import uvloop

from mta import bus, feedback, mime, native, proc, rfcdate
from mta.acceptor import http, smtp, tls_auth
from mta.acceptor.state import State
from mta.acceptor import reports as oob_reports
from mta.acceptor.metrics import AcceptorMetrics
from mta.acceptor import replies as R
from mta.acceptor.peers import peer_address
from mta.api.transmissions import parse_msys_api
from mta.config import DEFAULT as DEFAULT_POOL
from mta.config import load_tls
from mta.feedback import events_store as events_store_mod
from mta.feedback import suppression as suppression_list
from mta.obs import events as ev
from mta.obs.stats import Pusher
from mta.queueid import new_qid, shard_of
from mta.store import START_AT

log = logging.getLogger("mta.acceptor")

SWEEP_INTERVAL = 0.5     # seconds between timeout / free-space checks
SPOOL_CONNECT_WAIT = 5.0  # seconds a starting acceptor waits for the shards' bus, at most
DRAIN_FLAG = "drain"     # file in the run directory: the node is drained (mta drain)
# a session in MAIL, RCPT (DATA included), BDAT or WAITING holds a transaction
_IN_TRANSACTION, _WAITING = int(State.MAIL), int(State.WAITING)
RECORD_OVERHEAD = 1024   # octets: generous estimate of a spool record's envelope and framing

# MAIL parameters kept with the message; with DSN's (RFC 3461) ENVID and RET,
# and its per-recipient NOTIFY and ORCPT (lists parallel to the recipients).
SPOOLED_SMTP_PARAMS = ("BODY", "SMTPUTF8", "ENVID", "RET", "NOTIFY", "ORCPT")

# Outbox entries are (done, envelope, body, peer); pulled apart in C, not in a
# list comprehension (a function call per use on 3.11).
_ENVELOPE = operator.itemgetter(1)
_BODY = operator.itemgetter(2)

MAX_MESSAGE_ID = 998     # octets of a Message-ID kept in the envelope (a header line's limit)
# The fields every event of a message repeats, read once here (the spool reads no content);
# with Date, the fields smtp.add_missing_headers looks for, in the same pass.
_EVENT_FIELDS = (b"Message-ID", b"From", b"Subject")
_EVENT_AND_DATE = _EVENT_FIELDS + (b"Date",)

# smtp.add_missing_headers, as the acceptor compares it per message
ADD_OFF, ADD_LOCAL, ADD_ALL = 0, 1, 2
_ADD_MODES = {"off": ADD_OFF, "local": ADD_LOCAL, "all": ADD_ALL}
_utc_date = rfcdate.DateCache(utc=True)


def _put_from_subject(params: dict, frm, subject) -> None:
    if ev.FRIENDLY_FROM not in params and ev.SUBJECT not in params:
        ev.put_headers(params, mime.first_address(frm) if frm else None,
                       mime.header_text(subject) if subject else None)


def _event_fields(message: bytes, params: dict) -> str:
    """The Message-ID header's value ('' if none); the From address and Subject go into
    *params* (bounded, mta.obs.events.put_headers) unless they are there already (HTTP
    inline content: the builder knows them).  One pass over the header block."""
    mid, frm, subject = mime.find_first(message, _EVENT_FIELDS)
    _put_from_subject(params, frm, subject)
    if mid is None:
        return ""
    return mid.strip().decode("utf-8", "replace")[:MAX_MESSAGE_ID]


def add_missing_headers(message: bytes, params: dict, qid: str, domain: str) -> tuple[bytes, str]:
    """*message* with a Message-ID and a Date put in front when its header block has none
    (smtp.add_missing_headers), and its Message-ID as _event_fields gives it.

    The Message-ID made is ``<qid@domain>`` (a queue id is unique on its node, the
    host name tells the nodes apart); the Date is now, in UTC.  The From address and
    Subject go into *params* as _event_fields puts them: one pass over the header block
    finds all four.  A message that has both is returned as it is (the same object).
    """
    mid, frm, subject, date = mime.find_first(message, _EVENT_AND_DATE)
    _put_from_subject(params, frm, subject)
    if mid is not None:
        made = b""
        mid_text = mid.strip().decode("utf-8", "replace")[:MAX_MESSAGE_ID]
    else:
        mid_text = f"<{qid}@{domain}>"
        made = f"Message-ID: {mid_text}\r\n".encode()
    if date is None:
        made += f"Date: {_utc_date.now()}\r\n".encode()
    return (made + message if made else message), mid_text


def _is_loopback(ip: str) -> bool:
    addr = peer_address(ip)
    return addr is not None and addr.is_loopback


def _in_networks(ip: str, nets) -> bool:
    """Whether client address *ip* (as the transport gives it) is in one of *nets*."""
    addr = peer_address(ip)
    return addr is not None and any(addr in net for net in nets)


class Acceptor:
    """State shared by the sessions of one acceptor process."""

    def __init__(self, settings, slot: int, loop):
        cfg = settings.config
        self.settings = settings
        self.smtp = cfg.smtp
        self.spool_cfg = cfg.spool
        self.max_json_depth = cfg.http.max_json_depth   # X-MSYS-API metadata, as over HTTP
        self.add_missing = _ADD_MODES[cfg.smtp.add_missing_headers]
        self.slot = slot
        self.loop = loop
        self.hostname = settings.hostname
        self.scanner_mod = native.load("scanner")
        self.greeting = R.GREETING.format(host=self.hostname, banner=cfg.smtp.banner).encode()
        self.helo_reply = R.HELO.format(host=self.hostname).encode()
        # RCPT TO:<Postmaster> (RFC 5321 4.5.1): the mailbox it stands for here.
        self.postmaster = cfg.smtp.postmaster or f"postmaster@{self.hostname}"
        # delivery.ipv6 = false connects to no IPv6 address: an IPv6 address literal is
        # delivered only through a '*' route (a smarthost) or a route of its own (its
        # domain the literal, as routes are looked up), else refused at RCPT.  None:
        # every literal is delivered; else the literals routed.
        routes = cfg.delivery.route
        self.ipv6_literal_routes = None if cfg.delivery.ipv6 or \
            any(r.domain == "*" for r in routes) else \
            frozenset(r.domain.lower() for r in routes if r.domain.startswith("["))
        self.ssl_context = self._ssl_context()
        self.auth_users = settings.auth_users
        self.auth_failures = tls_auth.Failures(   # per client address
            cfg.smtp.max_auth_failures, cfg.smtp.auth_failure_window, loop.time)
        self.relay_networks = settings.relay_networks
        self.proxy_networks = settings.proxy_networks
        self.proxy_timeout = cfg.server.proxy_protocol_timeout
        self.proxy_pending: set = set()    # connections (SMTP, HTTP) waiting for their header
        self._ehlo = {}
        self.sessions: set = set()
        self.per_ip: dict[str, int] = {}
        self.pending: dict[int, tuple] = {}   # req -> (batch, deadline, shard)
        self.outbox: list[list] = []          # per shard: messages not yet sent
        self._flush_scheduled = False
        self.reqs = itertools.count(1)
        self.draining = False
        self.stopped_fd: int | None = None      # the supervisor's pipe (main())
        # mta drain: the node refuses new mail while run/drain exists (checked each sweep).
        self.drain_flag = os.path.join(settings.run_dir, DRAIN_FLAG)
        self.node_draining = os.path.exists(self.drain_flag)
        self.space_low = False
        self.space_free = 0         # octets free at the last statvfs (-1: unknown)
        self.space_total = 1
        self.space_pending = 0      # octets sent to the spool and not answered yet
        self.space_unmeasured = 0   # octets the last statvfs may not have seen
        # space_unmeasured above this: below spool.min_free_* (set with each statvfs)
        self.space_margin = self._space_margin()
        self.stats = {"rejected_connections": 0, "accepted": 0, "temp_failed": 0,
                      "dkim_failed": 0}
        self.m = AcceptorMetrics(self, cfg.admin.max_label_values)   # /metrics
        self.clients: list[bus.StreamClient] = []
        self.servers: list = []
        self._drained = asyncio.Event()
        self.http: http.Service | None = None    # set by serve() when HTTP sockets were given
        # The node's suppression list (opened in serve(), after fork); the
        # same list when RCPTs of suppressed recipients are refused.
        self.suppression: suppression_list.SuppressionList | None = None
        self.refuse_suppressed: suppression_list.SuppressionList | None = None
        # Reports to the return paths' domains (feedback.bounce_domains): read, never relayed.
        self.bounce_domains = oob_reports.normalize_domains(cfg.feedback.bounce_domains)
        self.classifier = None          # made at the first report (feedback.bounce_rules)
        self.report_tasks: set = set()  # reports being read, stored or committed
        # Reports being parsed or waiting for a reader (feedback.report_readers
        # at once; feedback.max_waiting_reports more wait, beyond that 451).
        self.reports_unread = 0
        self._report_readers = asyncio.Semaphore(cfg.feedback.report_readers)
        self.report_stats = {"dsn": 0, "arf": 0, "unparsed": 0, "matched": 0, "deferred": 0}
        # The events store, read-only, opened when first needed (the events
        # process may create it after this acceptor starts); one handle per
        # process (LMDB), shared with the events API (http.Service.events_store).
        self._events = None
        self._events_lock = threading.Lock()
        self.signer = None
        if cfg.dkim.enabled and cfg.dkim.keys:
            from mta.dkim import Signer

            # keys parsed once, after fork, from the bytes the supervisor validated
            # (the files may have been deleted or broken since, without a reload)
            self.signer = Signer.from_config(cfg.dkim, files=self.settings.dkim_key_files)

    def _ssl_context(self):
        if not self.smtp.tls_certificate:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # from the bytes the supervisor validated (the files may have been deleted or
        # broken since, without a reload: a restarted acceptor would die at its start)
        load_tls(ctx, self.smtp.tls_certificate, self.smtp.tls_key, self.settings.tls_files)
        return ctx

    def ehlo_reply(self, tls: bool, authed: bool) -> bytes:
        """The EHLO reply for a session with or without TLS and AUTH (built once each)."""
        key = (tls, authed)
        r = self._ehlo.get(key)
        if r is None:
            words = [k.format(size=self.smtp.max_message_size) for k in R.EHLO_KEYWORDS]
            if self.ssl_context is not None and not tls:
                words.append(R.EHLO_STARTTLS)
            if tls and self.auth_users and not authed:
                words.append(R.EHLO_AUTH)
            words.append(R.EHLO_HELP)
            r = self._ehlo[key] = R.ehlo(self.hostname, words)
        return r

    def events_store(self):
        """The events store (read-only), None when off or not created yet; blocking (a thread).

        A store the events process set aside and made anew is followed here (one stat
        per call: EventStore.successor).  The old handle is not closed: a request in
        another thread may be reading it; it closes when the last one lets it go.
        """
        with self._events_lock:
            if self._events is None:
                try:
                    self._events = events_store_mod.open_for(self.settings, readonly=True)
                except FileNotFoundError:
                    return None
            else:
                new = self._events.successor()
                if new is not None:
                    self._events = new
            return self._events

    def close_events_store(self) -> None:
        with self._events_lock:
            if self._events is not None:
                self._events.close()
                self._events = None

    def behind_proxy(self, ip: str) -> bool:
        """Whether a connection from *ip* comes through a load balancer that sends a
        PROXY header (server.proxy_protocol_from)."""
        return _in_networks(ip, self.proxy_networks)

    def relay_allowed(self, ip: str) -> bool:
        return _in_networks(ip, self.relay_networks)

    # ------------------------------------------------------------- the spool

    def connect_spool(self) -> None:
        hwm = self.spool_cfg.queue_high_water
        for n in range(self.settings.shards):
            self.clients.append(bus.StreamClient(
                self.loop, self.settings.stream_path(n), hwm,
                (bus.SpoolMessageCommitted,), self._on_reply, log, "reply from the spool",
                on_lost=functools.partial(self._shard_lost, n)))
            self.outbox.append([])

    async def spool_connected(self, timeout: float) -> None:
        """Wait until the bus to every spool shard is up, so the first message is not refused.

        A shard that stays away is logged and its messages get 451 until it comes
        (back).
        """
        deadline = self.loop.time() + timeout
        missing = list(range(len(self.clients)))
        while missing and self.loop.time() < deadline:
            missing = [n for n in missing if not self.clients[n].connected()]
            if missing:
                await asyncio.sleep(0.01)
        for n in missing:
            log.warning("spool shard %d is not reachable yet; its messages get 451 until it is", n)

    def commit(self, msg: smtp.Submission) -> bytes | None:
        """Queue a finished SMTP message; the session hears back through msg.committed().

        A message refused by policy (an ``X-MSYS-API`` ``options.ip_pool`` that
        names no pool: 550 5.7.1) is not spooled: its recipients' policy_rejection
        events are made durable first (:meth:`refuse`), then msg.refused(reply)
        is called.  Returns None, or with events off the refusing reply at once
        (then neither callback is called).
        """
        if self.bounce_domains and oob_reports.bounce_domain(msg.rcpts[0], self.bounce_domains):
            return self.take_report(msg)   # (the session keeps reports and other mail apart)
        payload = msg.payload
        hops = len(mime.find_headers(payload, b"Received"))
        if hops > self.smtp.max_hops:
            # A mail loop (two servers each routing the domain to the other, an MX that
            # leads back here through a balancer): refused before it is queued again.
            log.warning("client=%s: a message with %d Received fields (smtp.max_hops %d) "
                        "refused as a mail loop; from=<%s>", msg.peer_ip, hops,
                        self.smtp.max_hops, msg.sender)
            return R.TOO_MANY_HOPS
        sp = msg.params
        params = {k: v for k, v in sp.items() if k in SPOOLED_SMTP_PARAMS} if sp else {}
        api = mime.find_header(payload, b"X-MSYS-API")
        if api is not None:
            # SparkPost's SMTP injection attributes: recorded, then removed.
            attrs = parse_msys_api(api, self.max_json_depth)
            if attrs is None:
                log.warning("client=%s: X-MSYS-API is not a JSON object; ignored", msg.peer_ip)
            else:
                params.update(attrs)
            payload = mime.remove_headers(payload, b"X-MSYS-API")
        # The message's egress pool: X-MSYS-API options.ip_pool, else by the
        # sending domain; recorded only when it is not "default".
        pool = self.settings.pool_for(params.get("ip_pool"), msg.sender)
        if pool is None:
            log.info("client=%s: X-MSYS-API names an unknown ip_pool %r; refused",
                     msg.peer_ip, params["ip_pool"][:64])
            reply = R.unknown_pool(params["ip_pool"])
            del params["ip_pool"]       # (not a pool: not shown as the events' ip_pool)
            _event_fields(payload, params)
            if self.refuse(msg.sender, msg.rcpts, msg.client, msg.peer_ip, reply, params,
                           lambda ok: msg.refused(reply if ok else R.STORAGE_TEMP)):
                return None
            return reply
        if pool != DEFAULT_POOL:
            params["ip_pool"] = pool
        else:
            params.pop("ip_pool", None)
        sup = self.suppression
        if sup is not None and params.get("skip_suppression") is not True:
            # Suppressed recipients are accepted with the others and recorded
            # failed by the spool at the commit, with their class-25 bounce.
            check = sup.check
            tr = params.get("transactional") is True
            idxs = [i for i, r in enumerate(msg.rcpts) if check(r, tr)]
            if idxs:
                params[suppression_list.PARAM] = idxs
        mode = self.add_missing
        self.submit(msg.sender, msg.rcpts, params, msg.client, payload,
                    msg.received, msg.committed, msg.peer_ip,
                    add_missing=mode == ADD_ALL or (mode == ADD_LOCAL and
                                                    _is_loopback(msg.peer_ip)))
        return None

    def refuse(self, sender: str, rcpts: list[str], client: str, peer_ip: str, reply: bytes,
               params: dict, done) -> bool:
        """Record that this node's policy refused *rcpts* with SMTP *reply*; *done(ok)*.

        One ``policy_rejection`` event per recipient (SparkPost's: bounce class
        25, the reply given as the reason, ``remote_addr`` the client, the
        attributes of *params* SparkPost repeats), durable through a spool
        shard before the client hears the refusal (:meth:`commit_events`):
        done(True) then; done(False) when they could not be recorded -- the
        client should then get a temporary failure and try again, so that no
        refusal goes unrecorded.  The refused message gets a queue id of its
        own (the events' ``message_id``).  Returns False, and done is not
        called, when events are off ([events] enabled = false): refuse at once.
        """
        if not self.settings.events_enabled:
            return False
        qid = new_qid(self.slot)
        now = time.time()
        code, enhanced, text = R.parts(reply)
        base = {"type": ev.POLICY_REJECTION, "timestamp": now, "arrival": now, "queue_id": qid,
                "sender": sender, "client": client, "remote_addr": peer_ip,
                "response": {"code": code, "enhanced": enhanced, "text": text},
                "bounce_class": ev.POLICY_CLASS, **ev.carried(params)}
        self.commit_events(qid, [dict(base, recipient=r) for r in rcpts], done,
                           f"{qid}: the policy rejection of <{rcpts[0]}>")
        return True

    # ------------------------------------------------------------- reports

    def take_report(self, msg: smtp.Submission) -> bytes | None:
        """A message to a bounce domain: read it as a report; msg.committed() when done.

        Returns the 451 reply instead when ``feedback.max_waiting_reports``
        reports already wait for one of the ``feedback.report_readers``: a
        report comes from anyone, unauthenticated, and costs CPU by the octet
        (only ``feedback.max_report_size`` octets of it are parsed).

        In a worker thread: parse it and find its original message in the
        events store (:mod:`mta.acceptor.reports`), then add its suppression
        entries (the list is synced on commit).  Then its events go to a spool
        shard (``SpoolEventsCommit``; the shard of the original message when it
        was found) and the client hears 250 only once the shard has them on
        disk (451 otherwise, like a message).  A report that is not a DSN or
        ARF report is accepted, logged and dropped; nothing is ever relayed.
        """
        fb = self.settings.config.feedback
        if self.reports_unread >= fb.report_readers + fb.max_waiting_reports:
            self.report_stats["deferred"] += 1
            log.warning("a report from %s deferred: %d report(s) being read or waiting "
                        "(feedback.report_readers %d, max_waiting_reports %d)", msg.peer_ip,
                        self.reports_unread, fb.report_readers, fb.max_waiting_reports)
            return R.REPORTS_BUSY
        self.reports_unread += 1
        rid = new_qid(self.slot)
        task = self.loop.create_task(self._report(msg, rid))
        self.report_tasks.add(task)
        task.add_done_callback(self._report_done)

    def _report_done(self, task) -> None:
        self.report_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reading a report failed: %r", task.exception())
        if self.draining and self._idle():
            self._drained.set()

    async def _report(self, msg: smtp.Submission, rid: str) -> None:
        loop = self.loop
        try:
            async with self._report_readers:
                got = await loop.run_in_executor(None, self._read_report, msg)
        except Exception:
            log.exception("%s: reading a report from %s failed; accepted and dropped", rid,
                          msg.peer_ip)
            got = oob_reports.Reading()
        finally:
            self.reports_unread -= 1
        st = self.report_stats
        if not got.kind:
            st["unparsed"] += 1
            log.info("%s: mail from %s to %s is not a DSN or ARF report; accepted, not "
                     "relayed, dropped", rid, msg.client, ", ".join(msg.rcpts[:3]))
            msg.committed(rid, True)
            return
        st[got.kind] += 1
        st["matched"] += got.matched
        log.info("%s: %s report from %s: %d event(s), original message %s", rid,
                 got.kind.upper(), msg.client, len(got.events),
                 got.queue_id or "not found")
        if got.suppress:
            await loop.run_in_executor(None, self._suppress, rid, got.suppress)
        if not got.events or not self.settings.events_enabled:
            msg.committed(rid, True)
            return
        self.commit_events(got.queue_id or rid, got.events,
                           lambda ok: msg.committed(rid, ok), f"report {rid}")

    def commit_events(self, key: str, events: list[dict], done, what: str) -> None:
        """Make *events* durable through the spool shard of *key*; *done(ok)* once.

        The events of a report (:data:`mta.obs.events.REPORT_TYPES`) or of
        refusals at injection (``REFUSAL_TYPES``) go in ``SpoolEventsCommit``
        requests (at most ``bus.MAX_REPORT_EVENTS`` events each) and are
        written in that shard's group commit like its own events, so the
        events process carries them to the log, the events store and webhooks.
        ok only when the shard has every one on disk; False on a storage
        error, a full bus or no answer within ``smtp.spool_timeout`` (*what*
        names them in the log).
        """
        shards = len(self.clients)
        shard = shard_of(key, shards) if shards > 1 else 0
        deadline = self.loop.time() + self.smtp.spool_timeout
        chunks = [events[i:i + bus.MAX_REPORT_EVENTS]
                  for i in range(0, len(events), bus.MAX_REPORT_EVENTS)]
        left = [len(chunks), True]       # answers still to come, all ok so far

        def answered(_qid: str, ok: bool) -> None:
            left[0] -= 1
            left[1] = left[1] and ok
            if left[0] == 0:
                done(left[1])

        for chunk in chunks:
            env = bus.Envelope(qid=key, sender="", rcpts=[""], params={}, client=what,
                               arrival=0.0)     # (what _on_reply and sweep read)
            box = [(answered, env, b"", "")]
            req = next(self.reqs)
            self.space_pending += RECORD_OVERHEAD
            if not self.clients[shard].send(bus.SpoolEventsCommit(req, chunk)):
                self.stats["temp_failed"] += 1
                log.warning("spool shard %d is not taking events; %s not recorded", shard,
                            what)
                self._answered(box)
                self.loop.call_soon(answered, key, False)   # (never inside the caller)
                continue
            self.pending[req] = (box, deadline, shard)

    def _read_report(self, msg: smtp.Submission) -> oob_reports.Reading:
        """Parse and match one report (in a worker thread)."""
        if self.classifier is None:
            # the rules the supervisor validated (its copy: the operator's file may
            # have been broken or deleted since)
            self.classifier = feedback.Classifier.from_file(feedback.validated_file(
                self.settings.run_dir, self.settings.config.feedback.bounce_rules,
                self.settings.bounce_rules_digest))
        fb = self.settings.config.feedback
        return oob_reports.read(msg.payload[:fb.max_report_size], msg.rcpts, self.events_store(),
                                self.classifier, unmatched=fb.suppress_unmatched)

    def _suppress(self, rid: str, items: list) -> None:
        """Add a report's suppression entries (in a worker thread); failures are logged.

        ``Spam Complaint`` entries always (with the list on); ``Bounce Rule``
        ones (a hard invalid-recipient out-of-band bounce) when
        ``suppression.bounce_rule`` is on, as for in-band bounces.
        """
        sup = self.suppression
        if sup is None:
            return
        bounce_rule = self.settings.config.suppression.bounce_rule
        by_source: dict[str, list] = {}
        for addr, source, desc in items:
            if source == suppression_list.BOUNCE_RULE and not bounce_rule:
                continue
            by_source.setdefault(source, []).append(
                (addr, suppression_list.NON_TRANSACTIONAL, desc))
        for source, entries in by_source.items():
            try:
                sup.put_many(entries, source)
            except Exception as exc:    # ListFull, lmdb.Error: logged; the report is taken
                log.error("%s: suppression list: %d address(es) not added (%s): %s", rid,
                          len(entries), source, exc)
            else:
                log.info("%s: suppression list: added %s (%s)", rid,
                         ", ".join(a for a, _, _ in entries[:10]), source)

    def submit(self, sender: str, rcpts: list[str], params: dict, client_info: str,
               message: bytes, trace, done, peer: str = "",
               message_id: str | None = None, add_missing: bool = False) -> str:
        """Send one message to its spool shard; the common path of SMTP and HTTP injection.

        *trace(qid)* returns the Received header to prepend; *done(qid, ok)* is
        called once: ok=True only after the shard has the message on disk,
        False on a storage error, back-pressure or timeout.  Returns the queue id.

        Messages are not sent one by one: every message submitted during this
        loop iteration for the same shard goes out as one bus request
        (:meth:`_flush_outbox`, scheduled once per iteration).

        *message_id*: the Message-ID the caller wrote into *message* itself (HTTP
        inline content, whose builder has put the From address and Subject in
        *params* too): the header block is then not read.  *add_missing*
        (smtp.add_missing_headers, SMTP only): a Message-ID and a Date are put in
        front of a header block that has none (:func:`add_missing_headers`), before the
        message is signed, so that a signature covers them when its h= names them.
        """
        qid = new_qid(self.slot)
        if add_missing:
            message, message_id = add_missing_headers(message, params, qid, self.hostname)
        # DKIM: every message is signed here, once, before it is spooled, so the
        # signature is made once however many delivery attempts follow, and a
        # retry sends exactly the bytes that were signed.  The spool and the
        # delivery processes never modify the message after this point.  A message
        # held until options.start_time gets its x= counted from then.
        if self.signer is not None:
            try:
                message = self.signer.sign_message(message, None, params.get(START_AT))
            except Exception:
                self.stats["dkim_failed"] += 1
                log.exception("%s: DKIM signing failed; the message is queued unsigned", qid)
        body = trace(qid) + message
        envelope = bus.Envelope(qid=qid, sender=sender, rcpts=rcpts, params=params,
                                client=client_info, arrival=time.time(),
                                message_id=_event_fields(message, params) if message_id is None
                                else message_id[:MAX_MESSAGE_ID])
        shards = len(self.clients)
        shard = shard_of(qid, shards) if shards > 1 else 0
        self.outbox[shard].append((done, envelope, body, peer))
        size = len(body) + RECORD_OVERHEAD
        self.space_pending += size
        self.space_unmeasured += size
        if not self.space_low and self.space_unmeasured > self.space_margin:
            self.space_low = True
            self._log_space(True)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_outbox)
        return qid

    def _flush_outbox(self) -> None:
        self._flush_scheduled = False
        deadline = self.loop.time() + self.smtp.spool_timeout
        outbox = self.outbox
        for shard, box in enumerate(outbox):
            if not box:
                continue
            outbox[shard] = []
            req = next(self.reqs)
            commit = bus.SpoolMessageCommit(req, list(map(_ENVELOPE, box)),
                                            list(map(_BODY, box)))
            if not self.clients[shard].send(commit):
                self.stats["temp_failed"] += len(box)
                log.warning("spool shard %d is not taking messages; answered 451 for %d",
                            shard, len(box))
                self._answered(box)
                for done, env, _, _ in box:
                    done(env.qid, False)
                continue
            self.pending[req] = (box, deadline, shard)

    def _on_reply(self, reply: bus.SpoolMessageCommitted) -> None:
        entry = self.pending.pop(reply.req, None)
        if entry is None:
            return  # it timed out and was already answered 451
        ok = reply.status == bus.STATUS_OK
        self._answered(entry[0])
        # One line per message only at debug: the spool's event log records
        # every reception (with queue id, sender, recipients, size, client)
        # far more cheaply, and at info this line cost a third of the throughput.
        info = log.isEnabledFor(logging.DEBUG)
        for done, env, body, peer in entry[0]:
            if ok and info:
                log.info("%s: from=<%s> nrcpt=%d size=%d client=%s", env.qid, env.sender,
                         len(env.rcpts), len(body), peer)
            done(env.qid, ok)
        self.stats["accepted" if ok else "temp_failed"] += len(entry[0])
        if self.draining and self._idle():
            self._drained.set()

    # --------------------------------------------------------- housekeeping

    def transactions_open(self) -> int:
        """Mail on its way in (for a drain's end): SMTP sessions with a transaction begun
        and not answered, HTTP messages not answered yet or waiting to be built."""
        n = sum(1 for s in self.sessions if _IN_TRANSACTION <= s.state <= _WAITING)
        # SMTP messages at the spool, not answered yet: some of their clients have gone
        # (so no session counts them), and the message may still land (an overcount only
        # makes a drain's end wait for the answer)
        n += len(self.pending)
        if self.http is not None:
            n += self.http.pending + len(self.http.paused)
        return n

    def _idle(self) -> bool:
        """No session open and no message waiting for the spool."""
        return not self.sessions and not self.pending and not self.report_tasks and (
            self.http is None or not self.http.sessions) and not self.proxy_pending

    def sweep(self) -> None:
        now = self.loop.time()
        if self.pending:
            expired = [r for r, e in self.pending.items() if e[1] <= now]
            self._give_up(expired, f"no answer from the spool in {self.smtp.spool_timeout:g}s")
        force = self.draining and now >= self.drain_deadline
        for s in list(self.sessions):
            s.idle_check(now, self.draining, force)
        if self.http is not None:
            self.http.sweep(now, self.draining, force)
        self.space_low = self._space_low()
        self._check_node_drain()
        if self.draining and self._idle():
            self._drained.set()
        self.loop.call_later(SWEEP_INTERVAL, self.sweep)

    def _shard_lost(self, shard: int) -> None:
        """The connection to *shard* ended (it died or was killed) with requests on it:
        no answer can come for them now (the shard may have them on disk or not): 451
        at once rather than after smtp.spool_timeout."""
        self._give_up([r for r, e in self.pending.items() if e[2] == shard],
                      f"spool shard {shard} went away before it answered")

    def _give_up(self, reqs: list[int], why: str) -> None:
        """Answer 451 for the messages of the requests *reqs*, saying *why* in the log."""
        for r in reqs:
            box = self.pending.pop(r)[0]
            self._answered(box)
            self.stats["temp_failed"] += len(box)
            for done, env, _, _ in box:
                log.warning("%s: %s; answered 451", env.qid, why)
                done(env.qid, False)
        if reqs and self.draining and self._idle():
            self._drained.set()

    def _check_node_drain(self) -> None:
        draining = os.path.exists(self.drain_flag)
        if draining != self.node_draining:
            self.node_draining = draining
            log.info("node %s", "draining: new connections and transactions get 421 4.3.2, "
                     "HTTP 503" if draining else "drain cancelled: accepting mail again")

    def _answered(self, box: list) -> None:
        """The spool answered (or gave up on) the messages of *box*: no longer pending."""
        self.space_pending -= sum(map(len, map(_BODY, box))) + RECORD_OVERHEAD * len(box)

    def _below_threshold(self, unmeasured: int) -> bool:
        """Whether the free space, less *unmeasured* octets the last statvfs may not have
        seen, is too low."""
        cfg = self.spool_cfg
        if self.space_free < 0 or (cfg.min_free_bytes <= 0 and cfg.min_free_percent <= 0):
            return False        # unknown, or the check is off
        free = self.space_free - unmeasured
        return free < cfg.min_free_bytes or 100.0 * free / self.space_total < cfg.min_free_percent

    def _space_margin(self) -> float:
        """The most octets that may go unmeasured (space_unmeasured, never below 0) before
        the space is too low: _below_threshold(u) is exactly u > this, so that a message
        costs one comparison.  (_below_threshold only grows with u, and is true once the
        free space is gone: the last u it is false for is found by bisection, at most 64
        steps, at each statvfs.)"""
        if not self._below_threshold(self.space_free + 1):
            return math.inf     # unknown, or the check is off
        if self._below_threshold(0):
            return -1
        ok, low = 0, self.space_free + 1
        while low - ok > 1:
            mid = (ok + low) // 2
            if self._below_threshold(mid):
                low = mid
            else:
                ok = mid
        return ok

    def _log_space(self, low: bool) -> None:
        if low:
            log.warning("spool file system is low on space (%d bytes free, %d more on their "
                        "way to the spool); MAIL gets 452", self.space_free,
                        self.space_unmeasured)
        else:
            log.info("spool file system has space again; accepting mail")

    def _space_low(self) -> bool:
        """Measure the spool file system (statvfs): is it below spool.min_free_*?

        What was answered by now is in the measurement; what is still on its
        way to the spool may not be, and stays counted.
        """
        try:
            st = os.statvfs(self.settings.spool_dir)
        except OSError:
            self.space_free = -1
        else:
            self.space_free = st.f_bavail * st.f_frsize
            self.space_total = st.f_blocks * st.f_frsize or 1
        self.space_unmeasured = self.space_pending
        self.space_margin = self._space_margin()
        low = self.space_unmeasured > self.space_margin
        if low != self.space_low:
            self._log_space(low)
        return low

    def session_gone(self) -> None:
        if self.draining and self._idle():
            self._drained.set()

    # -------------------------------------------------------------- serving

    async def serve(self, socks: list[socket.socket],
                    http_socks: list[socket.socket] = ()) -> None:
        self.suppression = suppression_list.open_for(self.settings)
        if self.suppression is not None and \
                self.settings.config.suppression.smtp_action == "refuse":
            self.refuse_suppressed = self.suppression
        for sock in socks:
            srv = await self.loop.create_server(lambda: smtp.Session(self), sock=sock,
                                                backlog=4096)
            self.servers.append(srv)
        if http_socks:
            svc = self.http = http.Service(self)
            svc.open()
            for sock in http_socks:
                srv = await self.loop.create_server(lambda: http.Session(svc), sock=sock,
                                                    backlog=4096)
                self.servers.append(srv)
        self.space_low = self._space_low()
        self.loop.call_later(SWEEP_INTERVAL, self.sweep)

    async def drain(self) -> None:
        """Stop accepting; let sessions finish within the shutdown timeout."""
        if self.draining:
            return
        self.draining = True
        timeout = self.settings.config.server.shutdown_timeout
        self.drain_deadline = self.loop.time() + timeout
        for srv in self.servers:
            srv.close()
        # A connection accepted in this loop iteration, before the close, still has
        # its connection_made() queued (uvloop calls it soon, not at the accept), so
        # its session is not in self.sessions yet.  Let those callbacks run first:
        # otherwise the drain can find the acceptor idle and the process exit under
        # a client it has just greeted (seen as a reset at EHLO during a reload).
        await asyncio.sleep(0)
        http_sessions = self.http.sessions if self.http is not None else set()
        log.info("draining: %d SMTP and %d HTTP session(s) open", len(self.sessions),
                 len(http_sessions))
        proc.report_stopped_accepting(self.stopped_fd)
        self.stopped_fd = None
        # (the event may have been set during that sleep(0): a session that ended then
        # found the acceptor idle before the queued connection_made() added its own --
        # waiting on it as it was let the process exit under a client whose request it
        # was reading; so idle is what is waited for, the event only says when to look)
        end = self.loop.time() + timeout + self.smtp.spool_timeout + 2 * SWEEP_INTERVAL
        while not self._idle():
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), max(0.0, end - self.loop.time()))
            except asyncio.TimeoutError:
                for s in list(self.sessions) + list(http_sessions):
                    if s.transport is not None:
                        s.transport.abort()
                break


def main(settings, slot: int, ready_fd: int | None, listen_fds: list[int],
         http_fds: list[int] = ()) -> None:
    """Entry point of the acceptor[i] child: SMTP on *listen_fds*, HTTP on *http_fds*."""
    name = proc.start_role("acceptor", slot, settings.config.server.log_level)
    # Before any thread (the bus's) starts: the table for every connection allowed.
    cfg = settings.config
    proc.presize_fd_table(cfg.smtp.max_connections + proc.FD_TABLE_MARGIN +
                          (cfg.http.max_connections if http_fds else 0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor replaces us on reload
    log.info("starting %s; hot-path implementation %s", name, native.implementation())
    socks = [socket.socket(fileno=fd) for fd in listen_fds]
    http_socks = [socket.socket(fileno=fd) for fd in http_fds]
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    ctx = bus.new_context()
    acc = Acceptor(settings, slot, loop)
    stop = asyncio.Event()
    proc.on_sigterm(loop, stop.set)

    pusher = Pusher.create(acc.m.reg, ctx, settings, "acceptor", slot)

    async def run():
        acc.connect_spool()
        if pusher is not None:
            pusher.run_on(loop)
        proc.GcSettler().run_on(loop)     # short collector pauses with many connections
        # (a shard that answers connects within milliseconds; one that hangs must not keep
        # this acceptor from serving the others for ready_timeout)
        await acc.spool_connected(min(SPOOL_CONNECT_WAIT, settings.config.server.ready_timeout))
        await acc.serve(socks, http_socks)
        proc.report_ready(ready_fd, keep=True)
        acc.stopped_fd = ready_fd       # (drain(): "S", its listeners closed)
        await stop.wait()
        await acc.drain()

    try:
        loop.run_until_complete(run())
    finally:
        if acc.http is not None:
            acc.http.close()
        if acc.suppression is not None:
            acc.suppression.close()
        acc.close_events_store()
        for c in acc.clients:
            c.close()
        if pusher is not None:
            pusher.push()       # the final totals
            pusher.close()
        bus.close_context(ctx)
        loop.close()
    log.info("stopped: accepted=%d temp_failed=%d", acc.stats["accepted"],
             acc.stats["temp_failed"])
    if any(acc.report_stats.values()):
        log.info("reports: dsn=%(dsn)d arf=%(arf)d unparsed=%(unparsed)d matched=%(matched)d",
                 acc.report_stats)
    if acc.http is not None:
        st = acc.http.stats
        log.info("http: requests=%d recipients_accepted=%d recipients_rejected=%d errors=%d",
                 st["requests"], st["accepted"], st["rejected"], st["errors"])
