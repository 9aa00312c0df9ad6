"""Which lanes a reload let send more: the spool makes due again what they handed back.

Delivery hands a job back to the spool untried (REQUEUED) when its lane cannot send it
in time: no unit of the site's message rate comes before it must be sent (up to an
hour at "1/h"), or its source is at its warm-up cap (overflow "wait": until the hour
or day rolls over), or no source of its pool may send there.  The spool keeps those
messages by the lane that handed them back (:class:`mta.spool.dispatch.HandedBack`).
A reload that raises or removes a [[shaping]] rule's limits, or changes a [[warmup]]
plan, lets those lanes send more at once; after the supervisor has replaced the
delivery processes (they apply the new limits) it tells the shards (SIGUSR1), and
each compares, per lane it holds mail of, the limits of the configuration before and
after (:func:`risen`): only those lanes' mail is due again, and a lane still limited
hands it back again.  Cost: one look-up of the shaping rules per lane with mail
handed back, per reload; no message is looked at for it.
"""
from __future__ import annotations

from collections.abc import Iterator

from mta.shaping import Shaping


def site_hosts(name: str) -> tuple[str, ...] | None:
    """The host names of the site called *name* (the inverse of delivery's site_name():
    "(alt1.|)mx.example" -> alt1.mx.example, mx.example); None when the name does not
    tell (shortened with a digest)."""
    if not name or "~" in name:
        return None
    if name.startswith("("):
        end = name.find(")")
        if end < 0:
            return None
        suffix = name[end + 1:]
        return tuple(sorted(head + suffix for head in name[1:end].split("|")))
    return tuple(sorted(name.split("|")))


def _more_rate(old, new) -> bool:
    return old is not None and (new is None or new > old)


def rose(old, new) -> bool:
    """Whether limits *new* let a lane send more than *old* did (its message rate, its
    connections, its connection rate)."""
    return (_more_rate(old.max_message_rate, new.max_message_rate)
            or new.connection_limit > old.connection_limit
            or _more_rate(old.max_connection_rate, new.max_connection_rate))


def _shaping(cfg) -> Shaping:
    return Shaping(cfg.shaping, cfg.delivery, presets=cfg.delivery.shaping_presets,
                   nodes=cfg.cluster.nodes)


def _plans(cfg) -> dict[str, list]:
    out: dict[str, list] = {}
    for w in cfg.warmup:
        out.setdefault(w.source, []).append(w)
    return out


PAUSE_EVERY = 2000     # lanes looked at between the points compare() lets its caller pause


def risen(old, new, lanes) -> list[tuple[str, str]]:
    """:func:`compare` at once: the lanes released."""
    return [lane for lane in compare(old, new, lanes) if lane is not None]


def compare(old, new, lanes) -> Iterator[tuple[str, str] | None]:
    """Of *lanes* ((site, source) -> the recipient domains whose mail they handed back),
    those whose limits configuration *new* raises from *old* (mta.config.Config): their
    shaping limits rose, their source's warm-up plan changed, or the egress sources
    and pools changed (another source may take the mail); source "": no source of a
    pool could send (a suspension, warm-up caps), released when a plan or the egress
    changed.  A lane whose site's hosts cannot be told from its name is released when
    the shaping changed at all (a lane still limited hands its mail back again).
    Yields each lane released, and None every PAUSE_EVERY lanes looked at: the spool
    shard takes it a slice per turn of its loop (mta.spool.shard)."""
    egress = old.egress != new.egress
    old_plans, new_plans = _plans(old), _plans(new)
    warmed = {s for s in set(old_plans) | set(new_plans)
              if old_plans.get(s) != new_plans.get(s)}
    shaped = (old.shaping != new.shaping or old.delivery != new.delivery
              or old.cluster.nodes != new.cluster.nodes)
    if not (egress or warmed or shaped):
        return
    before = after = concern = None
    if shaped:
        before, after = _shaping(old), _shaping(new)
        # Only a lane a changed rule matches can have other limits (unless the defaults,
        # the node count or the rules' order changed): the few changed rules are tried
        # per lane, the whole set only for those -- 100,000 lanes with 200 rules took
        # seconds of the shard's loop when every lane was looked up twice in full.
        concern = before.changed(after)
    for n, ((site, source), domains) in enumerate(lanes.items(), 1):
        if not n % PAUSE_EVERY:
            yield None
        if egress or (source in warmed if source else warmed):
            yield site, source
            continue
        if not shaped or not source:
            continue
        hosts = site_hosts(site)
        if hosts is not None and concern is not None and \
                not concern.matching(site, hosts, domains, source):
            continue
        if hosts is None or rose(before.limits(site, hosts, domains, source),
                                 after.limits(site, hosts, domains, source)):
            yield site, source
