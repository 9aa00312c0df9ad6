"""The ``mta`` command: run the daemon and look after it.

    mta serve [-c FILE]            run in the foreground (built-in defaults without -c)
    mta check-config [-c FILE]     validate; errors name the key
    mta print-config --example     every key with its default and doc, as TOML
    mta print-services [-c FILE]   the process table
    mta dkim-records [-c FILE]     the DNS TXT records of the [dkim] keys, to publish
    mta queue [-c FILE] [--json]   live queue summary, asked of the running daemon
    mta queue list|show|delete     list queued messages, show one, delete some
    mta queue flush                retry every deferred recipient now (--domain D,
                                   --queue-id QID: theirs only)
    mta rules list [--json]        suspensions, throttles and back-offs in effect
    mta rules cancel NAME|ID       end them (every delivery process sees it within a second)
    mta queue summary [--by KEY]   by domain, site, pool, source, campaign (admin API)
    mta status / inspect QID       the node at a glance / one message (admin API)
    mta drain [--cancel]           stop accepting, report what remains until zero
    mta upgrade                    hand the sockets to a new supervisor (SIGUSR2)
    mta reload                     reload (SIGHUP) and wait until it is over (ExecReload)
    mta spool-dump [-c FILE]       read the spool files directly (daemon stopped), like postcat
    mta passwd USER                make an auth_file line (password from stdin)

Exit status: 0 ok, 1 failure, 69 daemon unavailable, 78 configuration error.
"""
from __future__ import annotations

import datetime
import getpass
import hashlib
import json
import os
import sys
import time

import click

EX_UNAVAILABLE = 69
EX_CONFIG = 78
DELETE_CHUNK = 1000     # queue ids in one request of `mta queue delete`
FLUSH_CHUNK = 100       # of `mta queue flush --queue-id` (the admin API's FLUSH_QIDS)
ASK_THREADS = 64        # spool shards asked at once by `mta queue`, `mta queue flush`
PAGE_TIMEOUT = 30.0     # for one that shows it is there (a page, a chunk; its recovery)
LANES_SHOWN = 20        # source x site lanes `mta queue` lists (the busiest; --json: all)

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), envvar="MTA_CONFIG",
    default=None, help="TOML configuration file (default: built-in defaults; env MTA_CONFIG)")


def _settings(config_path, read_files: bool = True):
    """The configuration at *config_path*, or exit 78 naming what is wrong.  *read_files*
    False: a command that uses only its addresses and paths (mconfig.load)."""
    from mta import config as mconfig

    try:
        return mconfig.load(config_path, read_files=read_files)
    except mconfig.ConfigError as exc:
        click.echo(f"mta: configuration error: {exc}", err=True)
        sys.exit(EX_CONFIG)


def _shard_count(settings) -> int:
    try:
        with open(os.path.join(settings.spool_dir, "SHARDS")) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return settings.shards


@click.group()
@click.version_option(package_name="mta")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML configuration file for the command that follows (as its own "
                   "-c; that one wins)")
def main(config_path):
    """mta: a high-volume outbound Mail Transfer Agent."""
    if config_path is not None:
        # Each command reads its -c, else $MTA_CONFIG: `mta -c FILE queue` as
        # `mta queue -c FILE`, the way postfix -c and postqueue -c are typed.
        os.environ["MTA_CONFIG"] = config_path


@main.command()
@config_option
def serve(config_path):
    """Run the MTA in the foreground until SIGTERM."""
    from mta.supervisor.main import serve as run

    sys.exit(run(config_path))


@main.command("check-config")
@config_option
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object: ok, and the keys that need a restart (an error is "
                   "still said on stderr with exit status 78)")
def check_config(config_path, as_json):
    """Validate the configuration and say what is wrong, naming the key; against a
    running daemon, also name the keys a reload (SIGHUP) would leave for a restart."""
    from mta import config as mconfig

    from mta.opscli import daemon_running

    s = _settings(config_path)
    # (the supervisor leaves active-config.json behind when it stops: the pid decides)
    active = mconfig.read_active(s.run_dir) if daemon_running(s) else None
    later = mconfig.restart_keys(active, s) if active is not None else None
    if as_json:
        click.echo(json.dumps({"ok": True, "config": config_path, "acceptors": s.acceptors,
                               "shards": s.shards, "state_dir": s.state_dir,
                               "running": active is not None, "needs_restart": later or [],
                               "nodes": s.config.cluster.nodes, "notes": list(s.notes)}))
        return
    click.echo(f"ok: {config_path or 'built-in defaults'} ({s.acceptors} acceptor(s), "
               f"{s.shards} spool shard(s), state in {s.state_dir})")
    for note in s.notes:
        click.echo(f"note: {note}")
    if s.config.cluster.nodes > 1:
        from mta.shaping import share_note
        click.echo(share_note(s.config.cluster.nodes))
    if active is None:
        return
    if later:
        click.echo("needs a restart (a reload leaves these as they are): " + ", ".join(later))
    else:
        click.echo("a reload (SIGHUP) applies every change")


@main.command("print-config")
@click.option("--example", is_flag=True, required=True,
              help="print every key with its default and a one-line doc")
def print_config(example):
    """Print the example configuration."""
    from mta.config import example_toml

    click.echo(example_toml(), nl=False)


@main.command("print-services")
@config_option
def print_services(config_path):
    """Print the process table the supervisor runs."""
    from mta.supervisor.services import render, table

    s = _settings(config_path)
    click.echo(render(table(s)))


class _ShardWait:
    """How long `mta queue list/delete` wait for a shard's answer: *bound* seconds, unless
    the shard shows it is there -- it answers a summary at once, which it does also
    while it reads its queue at start (a list or delete waits for that end) -- then up
    to PAGE_TIMEOUT (a page of a big queue, a chunk of deletes); at once when no daemon
    runs.  A shard stopped or wedged costs *bound* and a second, not PAGE_TIMEOUT."""

    PROBE = 1.0         # seconds the summary that shows the shard is there is waited for

    def __init__(self, settings, ctx, endpoint: str, bound: float):
        self.settings, self.ctx, self.endpoint, self.bound = settings, ctx, endpoint, bound
        self.there = False
        self.since = 0.0

    def call(self, cl, request, *values):
        self.since = time.monotonic()
        return cl.call(request, *values, timeout=max(self.bound, PAGE_TIMEOUT),
                       check=self.check)

    def check(self) -> None:
        from mta import bus
        from mta.opscli import daemon_running

        if not daemon_running(self.settings):
            raise TimeoutError("no daemon runs")
        if self.there or time.monotonic() - self.since < self.bound:
            return
        probe = bus.SyncClient(self.ctx, self.endpoint)
        try:
            probe.call(bus.SpoolQueueSummary, timeout=self.PROBE)
        except TimeoutError:
            raise TimeoutError(f"did not answer within {self.bound:g}s") from None
        finally:
            probe.close()
        self.there = True


def _missed(settings, missed: list[str], what: str, longer: bool = True):
    """Name the shards that did not answer, and what that leaves out; exit 69."""
    click.echo(f"mta: {'; '.join(missed)}: {what} (is it stopped or wedged? see 'mta status' "
               f"and the daemon's log{'; --timeout waits longer' if longer else ''})",
               err=True)
    sys.exit(EX_UNAVAILABLE)


def _not_answering(settings, why: str):
    click.echo(f"mta: the daemon is not answering ({why}); is 'mta serve' running "
               f"with state in {settings.state_dir}?", err=True)
    sys.exit(EX_UNAVAILABLE)


def _listens(endpoint: str) -> bool:
    """Whether something listens on the ipc *endpoint* (a spool shard's socket): False
    when its file is missing or a connection to it is refused (a daemon stopped, or
    killed and its file left behind), as `mta status` is refused by the admin listener;
    True when it is taken, also in the kernel's backlog (a shard stopped or wedged, to
    be waited for), and when it cannot be told (then waited for, as before)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)     # (a full backlog: EAGAIN at once, not a wait)
    try:
        sock.connect(endpoint[len("ipc://"):])
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError:
        return True
    finally:
        sock.close()
    return True


def _no_daemon_at(settings, endpoint: str) -> bool:
    """Whether nothing can answer at the spool shard's *endpoint*: nothing listens there
    and no daemon runs (its pid file names none that runs) -- known at once, where
    the request would wait its whole bound.  A shard that a running daemon restarts
    (its socket not yet bound again) is waited for, as before."""
    from mta.opscli import daemon_running

    # (the pid file first: a running daemon's sockets are not touched)
    return not daemon_running(settings) and not _listens(endpoint)


def _ask_each_shard(settings, request, *values, timeout: float | None = None):
    """Send a request to every spool shard of the running daemon, all at once (a thread
    each): (the replies of the shards that answered, in shard order, what became of the
    others: "spool[N] ...").  Shards that do not answer (stopped, wedged, no daemon)
    cost *timeout* in all, not each, and do not keep the request from the others (a
    flush: theirs is done all the same)."""
    from concurrent.futures import ThreadPoolExecutor

    from mta import bus

    timeout = timeout or settings.config.admin.shard_timeout
    ctx = bus.new_context()

    def ask(n: int):
        endpoint = settings.spool_endpoint(n)
        if not os.path.exists(endpoint[len("ipc://"):]):
            return None, f"spool[{n}] is not running"
        if _no_daemon_at(settings, endpoint):
            return None, f"spool[{n}] is not running (nothing listens on its socket)"
        cl = bus.SyncClient(ctx, endpoint)     # (a socket used by this thread only)
        try:
            return cl.call(request, *values, timeout=timeout), None
        except TimeoutError:
            return None, f"spool[{n}] did not answer within {timeout:g}s"
        finally:
            cl.close()

    count = _shard_count(settings)
    try:
        with ThreadPoolExecutor(max(1, min(count, ASK_THREADS))) as pool:
            got = list(pool.map(ask, range(count)))
    finally:
        ctx.term()
    return [r for r, _ in got if r is not None], [e for _, e in got if e is not None]


def _queue_pages(settings, missed: list[str], limit: int = 0, timeout: float | None = None):
    """The queued messages (QueueEntry), shard after shard, at most *limit* per shard (0:
    all), asked a page at a time (mta.spool.queries.listing): the shard reads a page of
    envelopes between two batches, not the whole queue at once, and the entries are
    given out as each page comes.  Every shard's first page is asked at once (a thread
    each), so shards that do not answer (stopped, wedged) cost one *timeout* in all; a
    shard is waited for as :class:`_ShardWait` says, and one that does not answer is
    named in *missed* and left out.  No daemon at all ends the command."""
    from concurrent.futures import ThreadPoolExecutor

    from mta import bus
    from mta.opscli import daemon_running

    timeout = timeout or settings.config.admin.shard_timeout
    ctx = bus.new_context()
    count = _shard_count(settings)
    clients: dict[int, tuple] = {}

    def page(n: int, after: str, left: int):
        cl, wait = clients[n]
        return wait.call(cl, bus.SpoolQueueList, max(left, 0), after)

    def first(n: int):
        endpoint = settings.spool_endpoint(n)
        if not os.path.exists(endpoint[len("ipc://"):]):
            return None
        if _no_daemon_at(settings, endpoint):
            raise TimeoutError(f"spool[{n}] is not running (nothing listens on its socket)")
        # (made in this thread, used on by the command's after its result: a socket
        # handed over through the future, one thread at a time)
        clients[n] = (bus.SyncClient(ctx, endpoint), _ShardWait(settings, ctx, endpoint,
                                                                 timeout))
        return page(n, "", limit)

    try:
        with ThreadPoolExecutor(max(1, min(count, ASK_THREADS))) as pool:
            firsts = [pool.submit(first, n) for n in range(count)]
            for n, fut in enumerate(firsts):
                try:
                    reply = fut.result()
                    if reply is None:
                        missed.append(f"spool[{n}] is not running")
                        continue
                    left = limit
                    while True:
                        yield from reply.entries[:left] if limit else reply.entries
                        left -= len(reply.entries)
                        if not reply.last or (limit and left <= 0):
                            break
                        reply = page(n, reply.last, left)
                except TimeoutError as exc:
                    if not daemon_running(settings):
                        _not_answering(settings, str(exc))
                    missed.append(f"spool[{n}]: {exc}")
    finally:
        for cl, _ in clients.values():
            cl.close()
        ctx.term()


def _age(arrival) -> str:
    if arrival is None:
        return "-"
    secs = max(0, int(time.time() - arrival))
    return str(datetime.timedelta(seconds=secs))


def _table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())


def _when(ts) -> str:
    if ts is None:
        return "-"
    secs = int(ts - time.time())
    return "now" if secs <= 0 else f"in {datetime.timedelta(seconds=secs)}"


def _delivery_status(settings) -> dict:
    """What the delivery processes are doing, from the status files they write each second
    (:func:`mta.obs.queue.delivery_status`, as the admin API shows it): sources
    (suspended and why, by any process), sites (their domains and hosts), the (source x
    site) lanes summed over the processes, and the warm-up counts."""
    from mta.obs.queue import delivery_status

    return delivery_status(settings.run_dir)


_UNTIL_RESUMED = 10 * 366 * 86400.0     # a suspension ending later reads "until resumed"


def _source_suspensions(s, sources: dict) -> None:
    """Add to each source's status the operator's and the response rules' suspensions of
    the whole source (the adaptive store, as `mta rules list` shows them): the delivery
    processes' files only know a source they found unusable (its address gone)."""
    from mta.shaping.state import SUSPEND, list_entries

    now = time.time()
    for e in list_entries(_adaptive_dir(s), now):
        src = sources.get(e.source)
        if e.kind != SUSPEND or e.site or src is None:
            continue
        until = e.until or now + _UNTIL_RESUMED
        if until > (src.get("suspended_until") or 0):
            src["suspended_until"] = until
            src["reason"] = f"{e.rule}: {e.reply}" if e.reply else e.rule


def _print_delivery(d: dict) -> None:
    if d.get("nodes", 1) > 1:
        click.echo("")
        from mta.shaping import share_note
        click.echo(share_note(d["nodes"]))
    if d.get("pools"):
        click.echo("")
        rows = [("POOL", "MESSAGES", "RECIPIENTS")]
        for name, p in sorted(d["pools"].items()):
            rows.append((name, str(p["messages"]), str(p["recipients"])))
        _table(rows)
    if d["sources"]:
        click.echo("")
        rows = [("SOURCE", "ADDRESS", "CONNECTIONS", "RATE/S", "STATE")]
        for name, src in sorted(d["sources"].items()):
            state = "ok"
            if src["suspended_until"]:
                until = src["suspended_until"]
                state = "suspended " + ("until resumed" if until - time.time() > _UNTIL_RESUMED
                                        else _when(until)) + f": {src['reason']}"
            addr = (src["address"] or "(system's choice)") + (" via SOCKS5" if src["proxy"] else "")
            rows.append((name, addr, str(src["connections"]), f"{src['rate']:.1f}", state))
        _table(rows)
    if d.get("warmup"):
        click.echo("")
        rows = [("WARM-UP SOURCE", "DAY", "CAPS (HOUR/DAY)", "SITE", "THIS HOUR", "TODAY")]
        for name, w in sorted(d["warmup"].items()):
            for site, c in sorted(w["sites"].items()) or [("-", {})]:
                rows.append((name, str(w["day"] or "-"),
                             f"{w['hourly'] or '-'}/{w['daily'] or '-'}", site,
                             str(c.get("hour", "-")), str(c.get("day", "-"))))
        _table(rows)
    if d.get("lanes"):
        # the limits in effect per source x site: shaping's (this node's share of them
        # with [cluster] nodes), lowered by a throttle or back-off
        click.echo("")
        lanes = sorted(d["lanes"], key=lambda x: (-x["queued"], -x["connections"]))
        rows = [("SOURCE", "SITE", "QUEUED", "CONNECTIONS", "CONN LIMIT", "RATE/S",
                 "RATE LIMIT/S")]
        for ln in lanes[:LANES_SHOWN]:
            lim = ln.get("max_message_rate")
            rows.append((ln["source"], ln["site"], str(ln["queued"]),
                         str(ln.get("node_connections", ln["connections"])),
                         str(ln.get("connection_limit") or "-"), f"{ln['rate']:.1f}",
                         "-" if lim is None else f"{lim:g}"))
        _table(rows)
        if len(lanes) > LANES_SHOWN:
            click.echo(f"(and {len(lanes) - LANES_SHOWN} more source x site lanes: --json)")
    if d["sites"]:
        click.echo("")
        rows = [("SITE", "DOMAINS", "QUEUED", "CONNECTIONS", "RATE/S")]
        for name, site in sorted(d["sites"].items()):
            doms = ",".join(site["domains"][:3]) + (
                f" +{len(site['domains']) - 3}" if len(site["domains"]) > 3 else "")
            rows.append((name, doms or "-", str(site["queued"]), str(site["connections"]),
                         f"{site['rate']:.1f}"))
        _table(rows)


@main.group(invoke_without_command=True)
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object for machines")
@click.option("--domains", "by_domain", is_flag=True, help="also a line per recipient domain")
@click.pass_context
def queue(ctx, config_path, as_json, by_domain):
    """Summary of the live queue: per shard, pool, source and site (and domain), deferred,
    scheduled, oldest age, suspended sources and why; each webhook's undelivered events,
    backlog bound and whether it is retrying."""
    ctx.obj = config_path
    if ctx.invoked_subcommand is not None:
        return
    s = _settings(config_path, read_files=False)
    from mta import bus

    replies, errors = _ask_each_shard(s, bus.SpoolQueueSummary)
    if not replies:
        _not_answering(s, "; ".join(errors))
    # (a shard that did not answer: the others' counts, it named, exit 69)
    shards = [r.summary for r in replies]
    domains: dict[str, dict] = {}
    for x in shards:
        for d, v in x.get("domains", {}).items():
            t = domains.setdefault(d, {"recipients": 0, "deferred": 0, "next_attempt": None})
            t["recipients"] += v["recipients"]
            t["deferred"] += v["deferred"]
            if v["next_attempt"] is not None and (t["next_attempt"] is None
                                                  or v["next_attempt"] < t["next_attempt"]):
                t["next_attempt"] = v["next_attempt"]
    total = {
        "messages": sum(x["messages"] for x in shards),
        "recipients": sum(x["recipients"] for x in shards),
        "pending": sum(x.get("pending", 0) for x in shards),
        "deferred": sum(x.get("deferred", 0) for x in shards),
        "bytes": sum(x["bytes"] for x in shards),
        "oldest_arrival": min((x["oldest_arrival"] for x in shards
                               if x["oldest_arrival"] is not None), default=None),
        "next_attempt": min((x["next_attempt"] for x in shards
                             if x.get("next_attempt") is not None), default=None),
        # Waiting for their options.start_time (counted in pending too).
        "scheduled": sum(x.get("scheduled", 0) for x in shards),
        "scheduled_messages": sum(x.get("scheduled_messages", 0) for x in shards),
        "next_start": min((x["next_start"] for x in shards
                           if x.get("next_start") is not None), default=None),
    }
    from mta.obs.queue import DOMAINS_MAX, top

    domains = top(domains, DOMAINS_MAX, "recipients")
    pools: dict[str, dict] = {}
    for x in shards:
        for name, v in x.get("pools", {}).items():
            t = pools.setdefault(name, {"messages": 0, "recipients": 0})
            t["messages"] += v["messages"]
            t["recipients"] += v["recipients"]
    delivery = _delivery_status(s)
    delivery["pools"] = pools
    _source_suspensions(s, delivery["sources"])
    from mta.obs.queue import suspended_line, webhook_rows, webhook_status

    webhooks = webhook_status(s.state_dir, s.config.webhooks.enabled)
    if as_json:
        click.echo(json.dumps({"total": total, "shards": shards, "domains": domains,
                               "delivery": delivery, "webhooks": webhooks,
                               **({"unanswered": errors} if errors else {})}))
        if errors:
            _missed(s, errors, "not counted in the total", longer=False)
        return
    rows = [("SHARD", "MESSAGES", "RECIPIENTS", "PENDING", "DEFERRED", "NEXT RETRY", "BYTES",
             "OLDEST", "SEGMENTS", "HEALTH")]
    for x in shards:
        health = "ok" if x["healthy"] else f"ERROR: {x['error']}"
        if x.get("held"):
            health += " (delivery held)"
        if x.get("events_backlog_warning"):
            health += (f" (events backlog {x['events_backlog_bytes']} bytes in "
                       f"{x['events_backlog_segments']} segment(s))")
        rows.append((str(x["shard"]), str(x["messages"]), str(x["recipients"]),
                     str(x.get("pending", 0)), str(x.get("deferred", 0)),
                     "held" if x.get("held") and x.get("next_attempt") is not None else
                     _when(x.get("next_attempt")),
                     str(x["bytes"]), _age(x["oldest_arrival"]),
                     str(x["segments"]), health))
    for e in errors:
        n = e[len("spool["):e.index("]")]
        rows.append((n, "-", "-", "-", "-", "-", "-", "-", "-", e[e.index("]") + 2:]))
    rows[1:] = sorted(rows[1:], key=lambda r: int(r[0]))
    rows.append(("total", str(total["messages"]), str(total["recipients"]),
                 str(total["pending"]), str(total["deferred"]),
                 "held" if total["next_attempt"] is not None and
                 all(x.get("held") for x in shards) else _when(total["next_attempt"]),
                 str(total["bytes"]), _age(total["oldest_arrival"]), "", ""))
    _table(rows)
    held = suspended_line(sum(x.get("suspended_messages", 0) for x in shards))
    if held:
        click.echo(held)
    if total["scheduled"]:
        click.echo(f"scheduled: {total['scheduled_messages']} message(s), "
                   f"{total['scheduled']} recipient(s) waiting for their start_time; "
                   f"the first {_when(total['next_start'])}")
    _print_delivery(delivery)
    if webhooks["webhooks"]:
        click.echo("")
        _table(webhook_rows(webhooks, _when))
    if by_domain and domains:
        click.echo("")
        rows = [("DOMAIN", "RECIPIENTS", "DEFERRED", "NEXT RETRY")]
        for d, v in sorted(domains.items(), key=lambda kv: -kv[1]["recipients"]):
            rows.append((d, str(v["recipients"]), str(v["deferred"]), _when(v["next_attempt"])))
        _table(rows)
    if errors:
        _missed(s, errors, "not counted in the total", longer=False)


@queue.command("flush")
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object for machines")
@click.option("--domain", help="only the recipients at this domain (like postqueue -s)")
@click.option("--queue-id", "qids", multiple=True, metavar="QID",
              help="only this message's recipients (like postqueue -i); repeatable")
@click.pass_context
def queue_flush(ctx, config_path, as_json, domain, qids):
    """Make every deferred recipient due now (like postqueue -f), and end the holds of
    sites whose hosts all failed a moment ago; suspensions stay.

    With --domain or --queue-id (both: that domain's recipients of those messages),
    only theirs, and only the holds of those domains' sites (through the admin API).
    Exit status 1 when a queue id is not queued."""
    s = _queue_settings(ctx, config_path)
    if domain is None and not qids:
        from mta import bus

        replies, errors = _ask_each_shard(s, bus.SpoolQueueFlush)
        if not replies:
            _not_answering(s, "; ".join(errors))
        n = sum(r.count for r in replies)
        later = sum(1 for r in replies if getattr(r, "recovering", False))
        # ("recovering_shards" only when there are: the object stays as it was)
        click.echo(json.dumps({"flushed": n, **({"recovering_shards": later} if later else {})})
                   if as_json else
                   f"{n} deferred recipient(s) scheduled for delivery now")
        if later and not as_json:
            click.echo(f"mta: {later} spool shard(s) still reading their queue after a "
                       "start: their deferred mail is flushed once they have (not counted "
                       "here)", err=True)
        if errors:
            # (the others' mail was flushed: said, and the exit status says the rest)
            click.echo(f"mta: {'; '.join(errors)}: its deferred mail was not flushed "
                       "(run the flush again once it answers)", err=True)
            sys.exit(EX_UNAVAILABLE)
        return
    import urllib.parse

    from mta.opscli import AdminClient
    from mta.queueid import QID_SHAPE, is_qid, normal_qid

    bad = [q for q in qids if not is_qid(normal_qid(q))]    # (as the operator typed them)
    qids = [normal_qid(q) for q in qids]
    if bad:
        click.echo(f"mta: not queue ids: {_shown(bad)} ({QID_SHAPE} each)", err=True)
        sys.exit(1)
    cl = AdminClient(s)
    qids = list(dict.fromkeys(qids))
    n, missing, later = 0, [], []
    for i in range(0, max(len(qids), 1), FLUSH_CHUNK):
        fields = ([("domain", domain)] if domain is not None else []) + \
            [("qid", q) for q in qids[i:i + FLUSH_CHUNK]]
        body = cl.ok("POST", "/api/admin/flush?" + urllib.parse.urlencode(fields),
                     allow=(200, 404) if qids else (200,))
        n += body.get("flushed", 0)
        missing += body.get("not_queued", [])
        later += body.get("recovering", [])
    later = sorted(set(later))
    if as_json:
        click.echo(json.dumps({"flushed": n, "not_queued": missing,
                               **({"recovering_shards": later} if later else {})}))
    else:
        what = " and ".join(x for x in (
            f"at {domain.strip().lower()}" if domain is not None else "",
            f"of {len(qids) - len(missing)} message(s)" if qids else "") if x)
        click.echo(f"{n} deferred recipient(s) {what} scheduled for delivery now")
    if later and not as_json:
        click.echo(f"mta: spool shard(s) {', '.join(map(str, later))} still reading their "
                   "queue after a start: the flush is done there once they have (not "
                   "counted here; a queue id not queued there is not said)", err=True)
    if missing:
        click.echo(f"mta: not queued: {' '.join(missing)}", err=True)
        sys.exit(1)


def _shown(texts) -> str:
    """Words the operator typed, each as typed, quoted when it has more than letters
    and digits (a space, a control character: seen, not lost in the line)."""
    return " ".join(t if t.isascii() and t.isalnum() else repr(t) for t in texts)


def _queue_settings(ctx, config_path):
    return _settings(config_path or ctx.obj, read_files=False)


timeout_option = click.option(
    "--timeout", type=click.FloatRange(0.1, 3600), default=None,
    help="seconds to wait for a spool shard's first answer; one that does not answer "
         "(stopped, wedged) is named and the others asked  [default: [admin] "
         "shard_timeout, 5]")


@queue.command("list")
@config_option
@click.option("--limit", type=click.IntRange(0, 1 << 62), default=0,
              help="at most this many per shard (0: all)")
@timeout_option
@click.pass_context
def queue_list(ctx, config_path, limit, timeout):
    """Queued messages as JSON lines (queue_id, sender, recipients, arrival_time,
    message_size, recipient_state).

    A spool shard that does not answer within --timeout is named on stderr, after the
    other shards' messages, with exit status 69."""
    s = _queue_settings(ctx, config_path)
    missed: list[str] = []
    for e in _queue_pages(s, missed, limit, timeout):
        click.echo(json.dumps({
            "queue_id": e.qid, "sender": e.sender, "recipients": e.rcpts,
            "arrival_time": e.arrival, "message_size": e.size,
            "recipient_state": [
                {"address": r, "state": st, "attempts": a,
                 "next_attempt": d if st == "pending" and a else None}
                for r, st, a, d in zip(e.rcpts, e.states, e.attempts, e.due)]}))
    if missed:
        _missed(s, missed, "its messages are not listed; the other shards' are")


@queue.command("show")
@config_option
@click.argument("qid")
@click.option("--raw", is_flag=True, help="print only the message as queued")
@click.pass_context
def queue_show(ctx, config_path, qid, raw):
    """Show one queued message: envelope, then the message."""
    from mta import bus
    from mta.queueid import QID_SHAPE, is_qid, normal_qid, shard_of

    if not is_qid(normal_qid(qid)):
        click.echo(f"mta: {qid!r} is not a queue id ({QID_SHAPE})", err=True)
        sys.exit(1)
    qid = normal_qid(qid)
    s = _queue_settings(ctx, config_path)
    n = shard_of(qid, _shard_count(s))
    if _no_daemon_at(s, s.spool_endpoint(n)):
        _not_answering(s, f"spool[{n}], the shard of {qid}, is not running: nothing "
                          "listens on its socket")
    ctxz = bus.new_context()
    try:
        cl = bus.SyncClient(ctxz, s.spool_endpoint(n))
        try:
            reply = cl.call(bus.SpoolMessageShow, qid, timeout=s.config.admin.shard_timeout)
        except TimeoutError:
            # (a daemon of the version before keeps the question until its queue is read)
            why = "recovering (reading its queue: retry shortly)" \
                if _recovering(ctxz, s.spool_endpoint(n)) else "not answering"
            click.echo(f"mta: spool[{n}] (the shard of {qid}) is {why}", err=True)
            sys.exit(EX_UNAVAILABLE)
        finally:
            cl.close()
    finally:
        ctxz.term()
    if reply.recovering:
        click.echo(f"mta: spool[{n}] (the shard of {qid}) is recovering (reading its queue: "
                   "retry shortly)", err=True)
        sys.exit(EX_UNAVAILABLE)
    if reply.status == bus.STATUS_STORAGE:
        click.echo(f"mta: {qid} is queued but its record cannot be read (see the log)",
                   err=True)
        sys.exit(EX_UNAVAILABLE)
    if reply.status != bus.STATUS_OK:
        click.echo(f"mta: {qid} is not in the queue", err=True)
        sys.exit(1)
    body = reply.body
    if raw:
        sys.stdout.buffer.write(body)
        return
    e = reply.entry
    click.echo(f"queue_id: {e['qid']}\nsender: <{e['sender']}>\n"
               f"arrival: {datetime.datetime.fromtimestamp(e['arrival']).isoformat()}\n"
               f"size: {e['size']}\nclient: {e['client']}\n"
               f"message_id: {e['params'].get('message_id', '')}")
    from mta.obs.queue import last_reply_line

    from mta.opscli import _next_attempt

    last = e.get("last") or [None] * len(e["recipients"])
    susp = e.get("suspended") or [None] * len(e["recipients"])
    for r, st, a, d, why, x in zip(e["recipients"], e["state"], e["attempts"], e["due"], last,
                                   susp):
        retry = f", next attempt {_next_attempt(d, e.get('held'), [{'suspended': x}])}" \
            if st == "pending" and a else ""
        click.echo(f"recipient: <{r}> {st}, {a} attempt(s){retry}")
        if why:
            click.echo(last_reply_line(why))
    click.echo("")
    sys.stdout.buffer.write(body)


def _recovering(ctx, endpoint: str) -> bool:
    """Whether the shard at *endpoint* says it is still reading its queue (its summary is
    answered meanwhile); False when it does not answer in a second either."""
    from mta import bus

    cl = bus.SyncClient(ctx, endpoint)
    try:
        return bool(cl.call(bus.SpoolQueueSummary, timeout=1.0).summary.get("recovering"))
    except TimeoutError:
        return False
    finally:
        cl.close()


@queue.command("delete")
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object for machines")
@click.argument("qids", nargs=-1, required=True)
@timeout_option
@click.pass_context
def queue_delete(ctx, config_path, as_json, qids, timeout):
    """Delete queued messages by queue id (ALL, in capitals, deletes everything).

    A queue id that is not queued (delivered, deleted, never there) is named on stderr
    with exit status 1, as by 'mta queue flush --queue-id'; the others are deleted.
    A spool shard that does not answer within --timeout is named on stderr, with how
    many of the ids it has were not confirmed deleted, and exit status 69; the other
    shards' messages are deleted all the same."""
    from mta.opscli import daemon_running
    from mta.queueid import QID_SHAPE, is_qid, normal_qid, shard_of

    s = _queue_settings(ctx, config_path)
    timeout = timeout or s.config.admin.shard_timeout
    nshards = _shard_count(s)
    everything = list(qids) == ["ALL"]
    if not everything:
        bad = [q for q in qids if not is_qid(normal_qid(q))]    # (as the operator typed them)
        qids = list(dict.fromkeys(normal_qid(q) for q in qids))     # (each asked once)
        if bad:
            click.echo(f"mta: not queue ids: {_shown(bad)} ({QID_SHAPE} each)", err=True)
            sys.exit(1)
    from mta import bus

    # Deleted a chunk at a time as the ids come: with ALL, as the listing pages come (what
    # is queued now: mail that comes meanwhile stays), so the command holds one chunk per
    # shard, not the ids of a queue of millions (the listing is in queue-id order, which
    # the deletes behind its cursor do not disturb).  Only --json keeps the ids, to print.
    deleted: list[str] = []
    count = 0
    pending: dict[int, list[str]] = {}
    clients: dict[int, object] = {}
    waits: dict[int, _ShardWait] = {}
    unconfirmed: dict[int, int] = {}    # shard that did not answer: the ids asked of it
    absent: set[str] = set()            # ids named that their shard does not hold
    missed: list[str] = []
    ctxz = bus.new_context()

    def _gone(n: int):
        click.echo(f"mta: spool[{n}] is not answering (no daemon runs); {count} message(s) "
                   f"deleted; is 'mta serve' running with state in {s.state_dir}?", err=True)
        sys.exit(EX_UNAVAILABLE)

    def flush(n: int) -> None:
        nonlocal count
        group = pending.pop(n, None)
        if not group:
            return
        if n in unconfirmed:        # (it did not answer the chunk before)
            unconfirmed[n] += len(group)
            return
        cl = clients.get(n)
        if cl is None:
            if _no_daemon_at(s, s.spool_endpoint(n)):
                _gone(n)
            cl = clients[n] = bus.SyncClient(ctxz, s.spool_endpoint(n))
            waits[n] = _ShardWait(s, ctxz, s.spool_endpoint(n), timeout)
        try:
            # the shard writes each delete in one batch (and reads each envelope for its
            # events), taking no mail meanwhile: DELETE_CHUNK at most
            reply = waits[n].call(cl, bus.SpoolMessageDelete, group)
        except TimeoutError as exc:
            if not daemon_running(s):
                _gone(n)
            unconfirmed[n] = len(group)
            missed.append(f"spool[{n}]: {exc}")
            return
        if reply.status != bus.STATUS_OK:
            click.echo(f"mta: spool[{n}] could not record the deletion (storage "
                       f"error); {count} message(s) deleted", err=True)
            sys.exit(1)
        count += len(reply.deleted)
        if not everything and len(reply.deleted) < len(group):
            # (ALL: one listed, then delivered before its delete, is gone all the same)
            absent.update(set(group).difference(reply.deleted))
        if as_json:
            deleted.extend(reply.deleted)

    started = time.time()
    try:
        # (ALL: what was queued when the command began; later mail, listed behind the
        # cursor as the pages come, stays)
        for qid in (e.qid for e in _queue_pages(s, missed, timeout=timeout)
                    if (e.arrival or 0.0) <= started) \
                if everything else qids:
            n = shard_of(qid, nshards)
            group = pending.setdefault(n, [])
            group.append(qid)
            if len(group) >= DELETE_CHUNK:
                flush(n)
        for n in sorted(pending):
            flush(n)
    finally:
        for cl in clients.values():
            cl.close()
        ctxz.term()
    not_queued = [q for q in qids if q in absent] if absent else []    # (as they were named)
    click.echo(json.dumps({"deleted": deleted, "not_queued": not_queued}) if as_json else
               f"deleted {count} message(s)")
    if not_queued:
        click.echo(f"mta: not queued: {' '.join(not_queued)}", err=True)
    if missed:
        left = sum(unconfirmed.values())
        # (a shard that is only stopped deletes what it was sent once it runs again)
        _missed(s, missed, "; ".join(x for x in (
            f"{left} of the queue id(s) are its and not confirmed deleted (it may delete "
            "them once it runs again: see 'mta queue list')" if left else "",
            "its messages were not listed, so not deleted" if everything else "") if x))
    if not_queued:
        sys.exit(1)


def _adaptive_dir(settings) -> str:
    from mta.shaping.state import STORE_DIR

    return os.path.join(settings.state_dir, STORE_DIR)


@main.group()
def rules():
    """Response rules and automatic back-off in effect (read from the state directory,
    so this works whether or not the daemon runs)."""


@rules.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def rules_list(config_path, as_json):
    """What is in effect: rule name, id, action, scope (source, site), the reply that
    fired it, and the time left (a back-off: its rate now and its steps; a warm-up: the
    day of its schedule since the source's first use)."""
    from mta.shaping.state import entry_view, list_entries

    s = _settings(config_path, read_files=False)
    now = time.time()
    entries = list_entries(_adaptive_dir(s), now)
    if as_json:
        for e in entries:
            click.echo(json.dumps(entry_view(e, now, s.config.delivery.time_scale)))
        return
    if not entries:
        click.echo("no suspension, throttle or back-off in effect")
        return
    rows = [("RULE", "ID", "ACTION", "SOURCE", "SITE", "LEFT", "LIMITS", "REPLY")]
    for e in entries:
        if e.kind == "backoff":
            left = f"step {e.steps(now)}"
            limits = f"{e.current_rate(now) * 60:.1f}/m of {e.ceiling * 60:.1f}/m"
        elif e.kind == "warmup":
            day_len = 86400.0 * s.config.delivery.time_scale
            left = f"day {int(max(0.0, now - e.created) // day_len) + 1}"
            limits = "see [[warmup]]"
        else:
            left = "until resumed" if e.until - now > _UNTIL_RESUMED else \
                str(datetime.timedelta(seconds=max(0, int(e.until - now))))
            limits = " ".join(x for x in (
                f"conn={e.connection_limit}" if e.connection_limit else "",
                f"rate={e.max_message_rate * 60:.1f}/m" if e.max_message_rate else "") if x)
        rows.append((e.rule, e.id, e.kind, e.source or "*", e.site or "*", left,
                     limits or "-", e.reply[:80]))
    _table(rows)


@rules.command("cancel")
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object for machines")
@click.argument("what")
def rules_cancel(config_path, as_json, what):
    """End the suspensions, throttles or back-offs of rule NAME (every one it put in
    effect), or the one entry ID; "backoff" ends every back-off.

    With the daemon running, through its admin API (DELETE /api/admin/rules/...): the
    mail delivery handed back to the spool for what ended (a suspension, a throttle's
    or back-off's rate) is due again at once.  Without it, in the state directory:
    that mail waits for its retry time or 'mta queue flush'."""
    import urllib.parse

    from mta.opscli import AdminClient, daemon_running
    from mta.shaping.state import cancel_entries, entry_view

    s = _settings(config_path, read_files=False)
    flushed = None
    if s.admin_listen and daemon_running(s):
        # the daemon's admin API also releases what a suspension held in the spool
        body = AdminClient(s).ok(
            "DELETE", f"/api/admin/rules/{urllib.parse.quote(what, safe='')}", allow=(200, 404))
        gone = body.get("cancelled", [])
        flushed = body.get("flushed", 0)
    else:
        now = time.time()
        gone = [entry_view(e, now, s.config.delivery.time_scale)
                for e in cancel_entries(_adaptive_dir(s), what)]
    if not gone:
        click.echo(f"mta: nothing in effect is called {what!r} (see mta rules list)", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"cancelled": gone, "flushed": flushed}))
        return
    for e in gone:
        click.echo(f"cancelled {e['kind']} {e['rule']} ({e['id']}) "
                   f"source={e['source'] or '*'} site={e['site'] or '*'}")
    if flushed:
        click.echo(f"{flushed} recipient(s) it held back are due now")
    elif flushed is None and any(e["kind"] in ("suspend", "throttle", "backoff")
                                 for e in gone):
        click.echo("the daemon is not running: mail it held back waits for its "
                   "retry time, or 'mta queue flush'")


@main.command("dkim-records")
@config_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object for machines")
def dkim_records(config_path, as_json):
    """Print the DNS TXT record of every [dkim] key (SELECTOR._domainkey.DOMAIN), in zone
    file form, to publish before signing with it (a rotation: the new selector's first)."""
    from mta.dkim import DkimConfigError, Signer

    cfg = _settings(config_path).config.dkim
    try:
        records = Signer.from_config(cfg).dns_records() if cfg.keys else {}
    except DkimConfigError as exc:
        click.echo(f"mta: configuration error: {exc}", err=True)
        sys.exit(EX_CONFIG)
    if as_json:
        click.echo(json.dumps({"records": [{"name": n, "type": "TXT", "value": v}
                                           for n, v in records.items()]}))
        return
    if not records:
        click.echo("mta: no [[dkim.keys]] configured", err=True)
        sys.exit(1)
    for name, value in records.items():
        # (a TXT record is made of strings of at most 255 octets: an RSA-2048 key's is
        # longer, so it is given in pieces, which resolvers join)
        parts = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
        click.echo(f"{name}. IN TXT ( {parts} )")


@main.command("spool-dump")
@config_option
@click.option("--bodies", is_flag=True, help="include each message, base64-encoded")
def spool_dump(config_path, bodies):
    """Read the spool files directly and print the queue as JSON lines.

    For inspection while the daemon is stopped (like postcat): every record's
    checksum is verified; damaged or torn records are reported on stderr and
    left out.
    """
    import base64
    import logging

    from mta.store import Store, shard_dir

    logging.basicConfig(level=logging.WARNING, format="mta: %(message)s", stream=sys.stderr)
    s = _settings(config_path, read_files=False)
    for n in range(_shard_count(s)):
        d = shard_dir(s.spool_dir, n)
        if not os.path.isdir(d):
            continue
        st = Store(d, s.config.spool.segment_size, fsync=False)
        st.recover()
        for qid in st.index.sorted_qids():
            m, body = st.read_record(qid)
            rec = {"queue_id": qid, "shard": n, "sender": m.sender,
                   "recipients": m.rcpts, "arrival_time": m.arrival,
                   "message_size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            if bodies:
                rec["message"] = base64.b64encode(body).decode()
            click.echo(json.dumps(rec))


@main.command()
@click.argument("user")
@click.option("--iterations", type=click.IntRange(10_000, 10_000_000), default=200_000,
              show_default=True)
def passwd(user, iterations):
    """Print an auth_file line for USER (password read from stdin or prompted)."""
    from mta.passwords import hash_password

    if ":" in user:
        raise click.BadParameter("must not contain ':'", param_hint="USER")
    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
    else:
        pw = sys.stdin.readline().rstrip("\n")
    if not pw:
        click.echo("mta: empty password", err=True)
        sys.exit(1)
    click.echo(f"{user}:{hash_password(pw, iterations)}")


def _register_operator_commands():
    """status, inspect, drain, upgrade and queue summary/inspect/suspend/resume/bounce
    (mta/opscli.py)."""
    from mta.opscli import register

    register(main, queue)


_register_operator_commands()

if __name__ == "__main__":
    main()
