"""The node's queue as the operator sees it: spool shard summaries and delivery status merged.

A library (no role imports): the admin process serves it as ``GET /api/admin/queue``
and the status page draws it; the command line reads it from there.

Sources of the figures:

- each spool shard's answer to SPOOL_QUEUE_SUMMARY (:func:`mta.spool.queries.summary`):
  messages, recipients pending and deferred, per recipient domain, per pool and per
  campaign;
- the delivery processes' status files ``<run>/delivery-<d>.status.json`` (written about
  once a second): sources (suspended and why) and the (source x site) lanes with the
  jobs waiting in them; and their sites files ``<run>/delivery-<d>.sites.json``
  (rewritten when a site gained or lost a domain, at most every few seconds): the sites,
  their domains and hosts.  A sites file is parsed again only when it changed (a site
  can hold hundreds of thousands of domains); a status file written before there were
  sites files has the sites in it.

- the webhooks process's status file ``<state_dir>/webhooks/status.json``
  (rewritten every second, :func:`webhook_status`): per webhook the events not
  delivered yet, the bound of its backlog, and whether its POSTs are failing.

A message has no site or source until a delivery process has it in a lane, so the
``by_site`` and ``by_source`` figures count jobs waiting in delivery, while
``by_domain``, ``by_pool`` and ``by_campaign`` count what the spool holds.
Each site names at most SITE_DOMAINS_MAX of its domains (``domains_total``: how
many it has).
"""
from __future__ import annotations

import glob
import heapq
import json
import os
import time

import orjson

from mta.api import webhookdb

STATUS_FRESH = 10.0     # seconds: an older status file is a process that is gone
DOMAINS_MAX = 1000      # recipient domains named in a queue view; the rest under OTHER
CAMPAIGNS_MAX = 1000    # campaigns named in a queue view; the rest under OTHER
SITES_MAX = 1000        # sites named in a queue view (the most queued); the rest under OTHER
SITE_DOMAINS_MAX = 20   # domains named per site in a queue view (domains_total: all of them)
LANES_MAX = 1000        # (source x site) lanes listed (the most queued); the rest counted
OTHER = "(other)"


def delivery_status_path(run_dir: str, index: int) -> str:
    """The status file delivery[index] rewrites about once a second."""
    return os.path.join(run_dir, f"delivery-{index}.status.json")


def delivery_sites_path(run_dir: str, index: int) -> str:
    """The sites file delivery[index] rewrites when a site gained or lost a domain."""
    return os.path.join(run_dir, f"delivery-{index}.sites.json")


# sites file path -> ((inode, size, mtime) of the file parsed, its sites)
_sites_read: dict[str, tuple[tuple, dict]] = {}
# the sites of each process last merged (the objects), and what they made
_sites_merged: list = [[], {}]
_NO_SITES: dict = {}      # (the same object each time: what is merged from it is kept)


def read_sites(status_path: str, status: dict) -> dict:
    """Site name -> domains and hosts of the delivery process whose status file is
    *status_path* (*status*, its contents): from its sites file, parsed only when it
    changed since the last call, or from the status file itself (written so by a
    process older than sites files: an upgrade).  {} if there is none yet."""
    if "sites" in status:
        return status["sites"]
    path = status_path.removesuffix(".status.json") + ".sites.json"
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            known = _sites_read.get(path)
            if known is not None and known[0] == stamp:
                return known[1]
            doc = orjson.loads(fh.read())      # (megabytes: a few times faster than json)
    except (OSError, ValueError):
        return _NO_SITES
    sites = doc.get("sites") if isinstance(doc, dict) else None
    if not isinstance(sites, dict):
        return _NO_SITES
    _sites_read[path] = (stamp, sites)
    return sites


def _merge_sites(each: list[dict]) -> dict:
    """Site name -> its domains (sorted) and hosts over the processes' sites *each*;
    the last answer again while every process's sites are the same objects (their
    files did not change: hundreds of thousands of domains are not sorted again)."""
    last, merged = _sites_merged
    if len(last) == len(each) and all(a is b for a, b in zip(last, each)):
        return merged
    merged = {}
    for sites in each:
        for name, site in sites.items():
            cur = merged.setdefault(name, {"domains": set(), "hosts": site.get("hosts", [])})
            cur["domains"].update(site.get("domains", []))
    for site in merged.values():
        site["domains"] = sorted(site["domains"])
    _sites_merged[:] = [each, merged]
    return merged


def read_status(path: str) -> dict | None:
    """A status file's contents; None if it is missing, being replaced or not a status."""
    try:
        with open(path, "rb") as fh:
            st = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    return st if isinstance(st, dict) else None


def delivery_status(run_dir: str, now: float | None = None) -> dict:
    """Sources, sites and (source x site) lanes summed over the delivery processes, and
    the warm-up plans' counts node-wide.

    A site's ``domains`` list is shared with the next calls: not to be changed."""
    sources: dict = {}
    lanes: dict = {}
    warmup: dict = {}
    each = []
    processes = 0
    nodes = 1       # [cluster] nodes: the lanes' limits are 1/nodes of the shaping rules'
    now = time.time() if now is None else now
    for path in sorted(glob.glob(os.path.join(run_dir, "delivery-*.status.json"))):
        st = read_status(path)
        if st is None or now - st.get("time", 0) > STATUS_FRESH:
            continue
        processes += 1
        nodes = max(nodes, int(st.get("nodes", 1) or 1))
        for name, w in st.get("warmup", {}).items():      # warm-up: node-wide counts
            cur = warmup.setdefault(name, {"day": None, "hourly": None, "daily": None,
                                           "first_use": None, "sites": {}})
            for k in ("day", "hourly", "daily", "first_use"):
                if w.get(k) is not None:
                    cur[k] = w[k]
            for site, counts in w.get("sites", {}).items():
                have = cur["sites"].setdefault(site, {})
                for k, v in counts.items():
                    have[k] = max(have.get(k, 0), v)
        for name, src in st.get("sources", {}).items():
            cur = sources.setdefault(name, {"address": src.get("address"),
                                            "proxy": src.get("proxy"),
                                            "suspended_until": 0.0, "reason": "",
                                            "connections": 0, "rate": 0.0, "queued": 0})
            if src.get("suspended_until", 0) > cur["suspended_until"]:
                cur["suspended_until"] = src["suspended_until"]
                cur["reason"] = src.get("reason", "")
        each.append(read_sites(path, st))
        for ln in st.get("lanes", []):
            key = (ln["source"], ln["site"])
            cur = lanes.setdefault(key, {"source": ln["source"], "site": ln["site"],
                                         "queued": 0, "transactional": 0, "connections": 0,
                                         "node_connections": 0, "rate": 0.0,
                                         "connection_limit": ln.get("connection_limit"),
                                         "max_message_rate": ln.get("max_message_rate"),
                                         "max_connection_rate": ln.get("max_connection_rate")})
            for k in ("queued", "transactional", "connections", "rate"):
                cur[k] += ln.get(k, 0)
            cur["node_connections"] = max(cur["node_connections"],
                                          ln.get("node_connections", 0))
    sites = {name: {"domains": s["domains"], "hosts": s["hosts"], "queued": 0,
                    "connections": 0, "rate": 0.0}
             for name, s in _merge_sites(each).items()}
    for ln in lanes.values():
        if ln["source"] in sources:
            for k in ("connections", "rate", "queued"):
                sources[ln["source"]][k] += ln[k]
        site = sites.get(ln["site"])
        if site is None:    # newer than its process's sites file (written every few seconds)
            site = sites[ln["site"]] = {"domains": [], "hosts": [], "queued": 0,
                                        "connections": 0, "rate": 0.0}
        for k in ("connections", "rate", "queued"):
            site[k] += ln[k]
    return {"processes": processes, "nodes": nodes, "sources": sources, "sites": sites,
            "lanes": sorted(lanes.values(), key=lambda x: (x["site"], x["source"])),
            "warmup": warmup}


def webhook_status(state_dir: str, enabled: bool = True, now: float | None = None) -> dict:
    """Each webhook's backlog, from the webhooks process's status file.

    Per webhook: ``undelivered_events`` (events not yet acknowledged by its
    target: the ``backlog_events`` after its cursor, which
    ``webhooks.max_backlog_events`` bounds, plus the ``pending_events`` of
    stored batches being sent or waiting for a retry), the bound and how much
    of it is used, ``retrying_batches`` with the ``next_retry`` and the
    ``last_failure``, and a ``state``: ``ok``, ``retrying`` (POSTs failed and
    are tried again), ``at bound`` (``on_backlog_full`` applies: oldest events
    dropped, or the events store's pruning paused), or ``not reporting`` (the
    status file is older than STATUS_FRESH: the process is gone or stuck; the
    figures are its last).  ``reporting`` is False then, and when there is no
    such file or webhooks are off.
    """
    out = {"reporting": False, "time": None, "webhooks": []}
    if not enabled:
        return out
    now = time.time() if now is None else now
    try:
        with open(webhookdb.status_path(state_dir), "rb") as fh:
            doc = json.loads(fh.read())
    except (OSError, ValueError):
        return out
    if not isinstance(doc, dict):
        return out
    fresh = now - (doc.get("time") or 0) <= STATUS_FRESH
    out.update(reporting=fresh, time=doc.get("time"))
    for w in doc.get("webhooks") or ():
        backlog = w.get("backlog_events", 0)
        bound = w.get("max_backlog_events") or 0
        retrying = w.get("retrying_batches", 0)
        state = "ok"
        if not fresh:
            state = "not reporting"
        elif bound and backlog >= bound:
            state = "at bound"
        elif retrying:
            state = "retrying"
        out["webhooks"].append({
            "id": w.get("id"), "name": w.get("name"), "state": state,
            "undelivered_events": backlog + w.get("pending_events", 0),
            "backlog_events": backlog, "max_backlog_events": bound,
            "backlog_percent": round(100.0 * backlog / bound, 1) if bound else None,
            "on_backlog_full": w.get("on_backlog_full"),
            "pending_batches": w.get("pending_batches", 0), "retrying_batches": retrying,
            "next_retry": w.get("next_retry"), "last_failure": w.get("last_failure"),
            "dropped_events": w.get("dropped_events", 0)})
    return out


def last_reply_line(last: dict | None) -> str:
    """The line under a recipient in ``mta inspect`` and ``mta queue show``: its last
    deferral's reply and host (as mailq shows why a message waits); "" when none."""
    if not last:
        return ""
    at = f" ({last['host']}[{last['ip']}])" if last.get("host") else ""
    words = " ".join(str(x) for x in (last["code"], last["enhanced"], last["text"]) if x)
    return f"  last reply: {words}{at}"


def suspended_line(messages: int) -> str:
    """What the operator's suspensions hold back, under the queue views ("" for none)."""
    return f"suspended: {messages} message(s) held back by the operator's suspensions " \
        "(mta suspend --list)" if messages else ""


def webhook_rows(status: dict, when) -> list[tuple]:
    """The webhooks table of ``mta queue``: a header row, then one row per webhook;
    *when(ts)* says a time to come ("in 0:00:12")."""
    rows = [("WEBHOOK", "UNDELIVERED", "BACKLOG", "BOUND", "USED", "STATE")]
    for w in status.get("webhooks", ()):
        state = w["state"]
        if w["retrying_batches"]:
            state += f" ({w['retrying_batches']} batch(es), next {when(w['next_retry'])}"
            if w["last_failure"]:
                state += f"; last: {w['last_failure'].get('response')}"
            state += ")"
        if w["state"] == "at bound":
            state += f" ({w['on_backlog_full']})"
        pct = "-" if w["backlog_percent"] is None else f"{w['backlog_percent']:g}%"
        rows.append((w["name"], str(w["undelivered_events"]), str(w["backlog_events"]),
                     str(w["max_backlog_events"]), pct, state))
    return rows


def _min(values):
    return min((v for v in values if v is not None), default=None)


def top(groups: dict, n: int, by: str) -> dict:
    """*groups* (name -> counts) cut to the *n* largest by count *by*, the others summed
    under OTHER (``next_attempt``: the earliest); *groups* itself when there are no more.

    A queue of 100,000 recipient domains is a view of n + 1 of them, not 100,000
    (a shard's summary, the admin API, ``mta queue summary --by domain``); the totals
    are kept.  Cut in each shard and again over the node, a domain that is large on
    one shard and small on another may be counted partly under OTHER.
    """
    if len(groups) <= n:
        return groups
    keep = heapq.nlargest(n, (k for k in groups if k != OTHER), key=lambda k: groups[k][by])
    out = {k: groups[k] for k in keep}
    rest: dict = {}
    for k, v in groups.items():
        if k in out:
            continue
        for f, x in v.items():
            rest[f] = _min((rest.get(f), x)) if f == "next_attempt" else rest.get(f, 0) + x
    out[OTHER] = rest
    return out


def merge(shards: list[dict], delivery: dict, webhooks: dict | None = None,
          not_answering: list[dict] | None = None) -> dict:
    """One view of the node's queue from the shards' summaries, :func:`delivery_status`
    and :func:`webhook_status`.

    *not_answering*: the shards that did not answer (``{"shard": N, "error": ...}``):
    listed under ``not_answering`` (``state`` "not answering"), not counted; each shard
    that answered has a ``state``, "ok" or "recovering" (still reading its queue at
    start: its counts are of what it has read so far).  ``total.partial`` is true when
    either is so: the totals are then not the node's whole queue (a drain is not done,
    whatever they say)."""
    missing = [{"shard": x["shard"], "state": "not answering", "error": x.get("error", "")}
               for x in not_answering or ()]
    total = {
        "messages": sum(x.get("messages", 0) for x in shards),
        "recipients": sum(x.get("recipients", 0) for x in shards),
        "pending": sum(x.get("pending", 0) for x in shards),
        "deferred": sum(x.get("deferred", 0) for x in shards),
        "bytes": sum(x.get("bytes", 0) for x in shards),
        "in_flight": sum(x.get("in_flight", 0) for x in shards),
        "scheduled": sum(x.get("scheduled", 0) for x in shards),
        "suspended_messages": sum(x.get("suspended_messages", 0) for x in shards),
        # waiting for a free slot of their domain (delivery.max_in_flight_per_domain)
        "blocked": sum(x.get("blocked", 0) for x in shards),
        # a shard still reading its queue after a start: the counts are not whole yet
        "recovering": any(x.get("recovering", False) for x in shards),
        "oldest_arrival": _min(x.get("oldest_arrival") for x in shards),
        "next_attempt": _min(x.get("next_attempt") for x in shards),
    }
    total["partial"] = bool(missing) or total["recovering"]
    by_domain: dict[str, dict] = {}
    by_pool: dict[str, dict] = {}
    by_campaign: dict[str, dict] = {}
    for x in shards:
        for d, v in x.get("domains", {}).items():
            t = by_domain.setdefault(d, {"recipients": 0, "deferred": 0, "next_attempt": None})
            t["recipients"] += v["recipients"]
            t["deferred"] += v["deferred"]
            t["next_attempt"] = _min((t["next_attempt"], v.get("next_attempt")))
        for name, v in x.get("pools", {}).items():
            t = by_pool.setdefault(name, {"messages": 0, "recipients": 0})
            t["messages"] += v["messages"]
            t["recipients"] += v["recipients"]
        for name, v in x.get("campaigns", {}).items():
            t = by_campaign.setdefault(name, {"messages": 0, "recipients": 0})
            t["messages"] += v["messages"]
            t["recipients"] += v["recipients"]
    # (a site of a provider holds every domain it hosts that mail went to, hundreds of
    # thousands after a broadcast: a few are named, to know the site by)
    by_site = {name: {"domains": s["domains"][:SITE_DOMAINS_MAX],
                      "domains_total": len(s["domains"]), "hosts": s["hosts"],
                      "queued": s["queued"], "connections": s["connections"], "rate": s["rate"]}
               for name, s in delivery.get("sites", {}).items()}
    by_source = {name: {"address": s["address"], "queued": s["queued"],
                        "connections": s["connections"], "rate": s["rate"],
                        "suspended": s["suspended_until"] > time.time(),
                        "suspended_until": s["suspended_until"] or None,
                        "reason": s["reason"]}
                 for name, s in delivery.get("sources", {}).items()}
    lanes = delivery.get("lanes", [])
    omitted = max(0, len(lanes) - LANES_MAX)
    if omitted:
        lanes = sorted(heapq.nlargest(LANES_MAX, lanes, key=lambda x: x["queued"]),
                       key=lambda x: (x["site"], x["source"]))
    return {"total": total,
            "shards": [{**{k: v for k, v in x.items() if k not in ("domains", "campaigns")},
                        "state": "recovering" if x.get("recovering") else "ok"}
                       for x in shards],
            "not_answering": missing,
            "by_domain": top(by_domain, DOMAINS_MAX, "recipients"),
            "by_site": _top_sites(by_site),
            "by_pool": by_pool, "by_source": by_source,
            "by_campaign": top(by_campaign, CAMPAIGNS_MAX, "messages"),
            "lanes": lanes, "lanes_omitted": omitted,
            "delivery_processes": delivery.get("processes", 0),
            "nodes": delivery.get("nodes", 1),
            "webhooks": webhooks if webhooks is not None else webhook_status("", False)}


def _top_sites(sites: dict) -> dict:
    """*sites* cut to the SITES_MAX with the most queued, the others summed under OTHER
    (``sites``: how many; no domains or hosts listed).  A broadcast to a million
    domains has tens of thousands of sites in delivery at once: the admin API and the
    status page name the ones that matter, as for domains (:func:`top`)."""
    if len(sites) <= SITES_MAX:
        return sites
    keep = heapq.nlargest(SITES_MAX, sites, key=lambda k: (sites[k]["queued"],
                                                           sites[k]["connections"]))
    out = {k: sites[k] for k in keep}
    rest = {"domains": [], "domains_total": 0, "hosts": [], "queued": 0, "connections": 0,
            "rate": 0.0, "sites": 0}
    for k, v in sites.items():
        if k not in out:
            for f in ("domains_total", "queued", "connections", "rate"):
                rest[f] += v[f]
            rest["sites"] += 1
    out[OTHER] = rest
    return out


def recipients_view(entry: dict, now: float | None = None) -> dict:
    """A message as ``GET /api/admin/messages/QID`` shows it, from a SPOOL_MESSAGE_SHOW entry."""
    now = time.time() if now is None else now
    params = entry.get("params") or {}
    rcpts = []
    last = entry.get("last") or []
    suspended = entry.get("suspended") or []
    for i, addr in enumerate(entry.get("recipients", [])):
        state = entry["state"][i]
        attempts = entry["attempts"][i]
        due = entry["due"][i] if state == "pending" else None
        rcpts.append({"address": addr, "state": state, "attempts": attempts,
                      "next_attempt": due,
                      "due_in_seconds": None if due is None else round(max(0.0, due - now), 3),
                      # the last deferral's reply (known since the shard's start), as
                      # Postfix's mailq shows why a message waits
                      "last_reply": last[i] if i < len(last) else None,
                      # the operator's suspension that holds it back ({id, until, reason})
                      "suspended": suspended[i] if i < len(suspended) else None})
    pending = [r["next_attempt"] for r in rcpts if r["next_attempt"] is not None]
    return {"queue_id": entry.get("qid"), "sender": entry.get("sender"),
            "arrival_time": entry.get("arrival"), "message_size": entry.get("size"),
            "client": entry.get("client"),
            "campaign_id": params.get("campaign_id"), "ip_pool": params.get("ip_pool"),
            "params": params, "recipients": rcpts,
            "next_attempt": min(pending, default=None),
            # what holds every recipient back whatever its next_attempt ("[delivery] hold")
            "held": entry.get("held")}
