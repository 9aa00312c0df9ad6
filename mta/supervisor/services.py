"""The process table: which roles run, how many, on which sockets, restarted how.

Like Postfix's master.cf this is plain data, built from the configuration by
:func:`table` and printed by ``mta print-services``.  Roles start in table
order and stop in reverse order: acceptors first (no new mail), then delivery
(transactions in progress finish and report), then the events process (it
stops at a checkpoint; what the spool writes after it is read at the next
start), then the spool, which records those outcomes before it stops.
"""
from dataclasses import dataclass

from mta.config import hostport


@dataclass(frozen=True)
class Service:
    role: str            # process role, also the package under mta/
    count: int           # how many processes (slots)
    entry: str           # "module:function" run in the child
    listen: tuple        # (host, port) pairs each slot listens on; () for none
    restart: str         # "always": a child that exits is started again, with back-off
    reload: str          # what SIGHUP does: "replace" (one slot at a time, always),
                         # "if-changed" (the same when its sections changed: ROLLED in
                         # supervisor.main), "sighup" (kept; takes what it can, the
                         # spool's [delivery] keys) or "keep"
    http_listen: tuple = ()   # (host, port) pairs of the HTTP injection API, per slot


def table(settings) -> list[Service]:
    """The services for *settings*, in start order.

    The admin process comes first (and stops last), so ``/metrics`` sees the
    whole start and the whole drain; it has its own listening sockets (held
    here, like the acceptors', so a restarted admin process finds them: the
    HAProxy agent-check port, ``admin.agent_listen``, in its ``listen``, and the
    admin listener in its ``http_listen``) and no row at all when
    ``admin.enabled`` is false.
    """
    admin = [Service("admin", 1, "mta.admin.main:main", settings.agent_listen, "always",
                     "keep", settings.admin_listen)] if settings.admin_listen else []
    return admin + [
        Service("spool", settings.shards, "mta.spool.main:main", (), "always", "sighup"),
    ] + ([Service("events", 1, "mta.events.main:main", (), "always", "if-changed")]
         if settings.events_enabled else []) + (
        [Service("webhooks", 1, "mta.webhooks.main:main", (), "always", "if-changed")]
        if settings.config.webhooks.enabled else []) + [
        Service("delivery", settings.deliveries, "mta.delivery.main:main", (), "always",
                "if-changed"),
        Service("acceptor", settings.acceptors, "mta.acceptor.main:main", settings.listen,
                "always", "replace", settings.http_listen),
    ]


def render(services: list[Service]) -> str:
    """A human-readable table for ``mta print-services``."""
    def addrs(pairs) -> str:
        return ",".join(hostport(h, p) for h, p in pairs) or "-"

    rows = [("ROLE", "COUNT", "LISTEN", "RESTART", "ON RELOAD", "ENTRY", "HTTP")]
    for s in services:
        rows.append((s.role, str(s.count), addrs(s.listen), s.restart, s.reload, s.entry,
                     addrs(s.http_listen)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
