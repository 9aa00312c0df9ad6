"""The HAProxy agent check on ``admin.agent_listen``, served by the admin process.

HAProxy (configuration manual 5.2, ``agent-check``) connects to ``agent-port`` every
``agent-inter``, may send its ``agent-send`` string, and reads one ASCII line ended by
``\\n``: words separated by spaces or commas.  Each connection here gets one line,
made from what the admin process knows (:meth:`mta.admin.metrics.Reports.health`,
the drain flag, the spool's free space), and is closed:

- ``drain #...``: the node is drained (``mta drain``, ``POST /api/admin/drain``):
  HAProxy sends it no new connection.  A cancel through the API is said SEEN_DRAIN
  later, once every acceptor (which looks for the flag twice a second) has seen it
  and no longer answers 421;
- ``down ready #why``: it cannot take mail -- no spool shard is up and able to write,
  no acceptor is up, or every acceptor finds the spool below ``spool.min_free_*``
  (MAIL gets 452);
- ``up ready N%``: N is 100 unless the node is under back-pressure.  The spool's free
  space between ``spool.min_free_*`` and twice it lowers N linearly to FLOOR, and N is
  multiplied by the share of the spool shards that are up and can write (one of two
  that cannot: half); never below FLOOR.

A restarted admin process has heard from no child yet: for a report's lifetime
(3 x admin.push_interval + 2 s) after it starts, a child it has not heard from is
taken as up, so that a restart of the admin process does not take the node out
(at the node's start too: the supervisor made every listening socket before it
started the children, and connections wait in their backlogs).

Every answer names the state, as HAProxy needs ("only the agent may revert its own
actions": the ``ready`` of a later answer ends a ``drain`` it gave, ``up`` a ``down``).
The description follows a space: HAProxy splits the words at spaces, tabs and commas
only, so ``down#why`` would be one unknown word.  Only the processes mail comes in
through count: the webhooks and events processes, and delivery, being down do not
change the answer (they do /api/admin/health's).

What the balancer sends (``agent-send``) is read and dropped, MAX_SEND octets at most;
a connection is closed after TIMEOUT seconds at most, and ``admin.max_connections``
of them are kept at once (over it: the line, then closed at once), apart from the
admin listener's, which they cannot take up.  No token is asked for: the line says
nothing secret, so listen where the balancer reaches it.
"""
from __future__ import annotations

import asyncio
import time

from mta.admin import host
from mta.admin.metrics import SEEN_DRAIN

FLOOR = 10          # percent: the lowest weight of a node that can take mail
MAX_SEND = 1024     # octets of agent-send read; more and the connection is dropped
TIMEOUT = 5.0       # seconds a connection is kept for the balancer to read the line


def space_percent(space: tuple[int, int] | None, spool_cfg) -> float:
    """100 with *space* (free, size) at twice spool.min_free_* or more (or no limit set,
    or unknown), FLOOR at the limit and below, linear between."""
    if space is None:
        return 100.0
    free, size = space
    limit = max(spool_cfg.min_free_bytes, spool_cfg.min_free_percent * size / 100.0)
    if limit <= 0 or free >= 2 * limit:
        return 100.0
    if free <= limit:
        return float(FLOOR)
    return FLOOR + (100 - FLOOR) * (free - limit) / limit


def line(health: dict, space: tuple[int, int] | None, spool_cfg, young: bool = False) -> str:
    """The agent's answer for *health* (Reports.health()) and the spool's *space*
    (free, size), with its line end.  *young*: the admin process started less than a
    report's lifetime ago, so a child that has not reported yet is taken as up."""
    if health["draining"]:
        return "drain #node drained (mta drain): no new connections\n"

    def up(c):
        return c["up"] or (young and c["last_report_age"] is None)
    children = health["children"]
    shards = [c for c in children if c["role"] == "spool"]
    writing = [c for c in shards if up(c) and c.get("healthy", True)]
    acceptors = [c for c in children if c["role"] == "acceptor" and up(c)]
    if not writing:
        return "down ready #no spool shard is up and able to write\n"
    if not acceptors:
        return "down ready #no acceptor is up\n"
    if not any(c.get("healthy", True) for c in acceptors):
        return "down ready #spool free space below spool.min_free_*: MAIL gets 452\n"
    weight = space_percent(space, spool_cfg) * len(writing) / len(shards)
    return f"up ready {max(FLOOR, round(weight))}%\n"


class AgentSession(asyncio.Protocol):
    """One agent check: write the line, read and drop what the balancer sends, close."""

    def __init__(self, admin):
        self.admin = admin
        self.transport = None
        self.timer = None
        self.received = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        a = self.admin
        reports = a.reports
        health = reports.health()       # (reads the supervisor's record: reports.active)
        spool_cfg = (reports.active or a.settings).config.spool
        if a.api is not None and time.monotonic() - a.api.drain_cancelled < SEEN_DRAIN:
            health["draining"] = True   # the acceptors may still answer 421
        young = reports.clock() - reports.started < reports.stale_after
        transport.write(line(health, host.free_space(a.settings.spool_dir), spool_cfg,
                             young).encode())
        if len(a.agent_sessions) >= a.cfg.max_connections:
            transport.close()
            return
        a.agent_sessions.add(self)
        transport.write_eof()
        self.timer = a.loop.call_later(TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_SEND:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False            # the balancer read the line and closed: close too

    def connection_lost(self, exc) -> None:
        self.admin.agent_sessions.discard(self)
        if self.timer is not None:
            self.timer.cancel()
