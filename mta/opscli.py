"""The operator's commands on top of the admin API (``mta status``, ``drain``, ``upgrade``, ...).

Registered on the ``mta`` command group by :mod:`mta.cli` (:func:`register`); kept
apart from it so the commands that ask the spool directly stay as they were.

    mta status [--json]                     the node at a glance (GET /api/admin/status)
    mta queue summary [--by KEY] [--json]   queue by domain, site, pool, source or campaign
    mta inspect QID [--json]                one message (also ``mta queue inspect``)
    mta drain [--cancel] [--no-wait]        stop accepting, report what remains until zero
    mta upgrade                             start the installed version on the same sockets
    mta reload [--pid PID]                  SIGHUP, and wait until the reload is over
    mta suspend --domain D [...]            hold back mail by domain, campaign, pool, site
                                            or source (durable); --list shows them
    mta resume ID                           end a suspension
    mta bounce --campaign C [...]           bounce every queued recipient matched, with
                                            a progress bar (--dsn: a DSN to each sender)

``suspend``, ``resume`` and ``bounce`` also answer under ``mta queue``, as ``inspect`` does.

They find the admin listener at the first ``[admin] listen`` address (a
wildcard address is asked on loopback) and send ``MTA_ADMIN_TOKEN``, else the
first of ``[admin] tokens`` (else of ``read_tokens``), as the bearer token.  Exit status as :mod:`mta.cli`:
69 when the daemon does not answer, 1 for an error it reported.
"""
from __future__ import annotations

import datetime
import http.client
import json
import os
import select
import shlex
import signal
import sys
import time
import urllib.parse

import click

from mta import proc
from mta.obs.queue import last_reply_line, suspended_line, webhook_rows

EX_UNAVAILABLE = 69
FIRST_ANSWER = 3.0      # seconds without a first answer before the admin process is probed
EX_CONFIG = 78
BY_KEYS = ("domain", "site", "pool", "source", "campaign")


class AdminClient:
    def __init__(self, settings, timeout: float = 30.0):
        if not settings.admin_listen:
            raise click.ClickException("the admin listener is off ([admin] enabled = false)")
        host, port = settings.admin_listen[0]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        self.host, self.port = host, port
        self.settings = settings
        cfg = settings.config.admin
        self.token = os.environ.get("MTA_ADMIN_TOKEN") or next(
            iter(cfg.tokens or cfg.read_tokens), None)
        self.timeout = timeout

    def call(self, method: str, path: str) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, headers=headers)
            self._await_answer(conn, headers)
            r = conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException) as exc:
            # (HTTPException: something that is not an HTTP server answers there)
            from mta.config import hostport
            click.echo(f"mta: the admin listener at {hostport(self.host, self.port)} is not answering "
                       f"({type(exc).__name__}: {exc}); is 'mta serve' running?", err=True)
            sys.exit(EX_UNAVAILABLE)
        finally:
            conn.close()
        try:
            body = json.loads(data) if data else {}
        except ValueError:
            body = {"errors": [{"message": data[:200].decode("latin-1")}]}
        return r.status, body

    def _await_answer(self, conn, headers) -> None:
        """Wait up to the timeout for the first octets of *conn*'s answer, asking the
        admin process on a second connection whether it answers at all each
        FIRST_ANSWER seconds without them; exit (69) naming it when it does not.

        The supervisor holds the listening socket, so a connection is taken by the
        kernel even while the admin process is stopped or wedged: without this an
        operator waited the whole timeout for a bare "timed out".  An answer that is
        slow because the admin process waits for the spool shards ([admin] shard_timeout each)
        is still waited for: the admin process answers the probe meanwhile."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or select.select([conn.sock], [], [], min(left, FIRST_ANSWER))[0]:
                return          # (timed out: getresponse says so, as before)
            probe = http.client.HTTPConnection(self.host, self.port, timeout=FIRST_ANSWER)
            try:
                probe.request("GET", "/api/admin/health", headers=headers)
                probe.getresponse().read()
                continue        # (any answer, 401 too: the admin process serves)
            except TimeoutError:
                pass
            except (OSError, http.client.HTTPException):
                return          # (refused, reset: getresponse says so, as before)
            finally:
                probe.close()
            pid = admin_pid(self.settings)
            who = f"the admin process (pid {pid}) is not answering" if pid else \
                "the admin process is not answering (none runs now)"
            from mta.config import hostport
            click.echo(f"mta: {who}: the admin listener at "
                       f"{hostport(self.host, self.port)} takes connections (the supervisor holds its socket) "
                       f"but nothing answered in {2 * FIRST_ANSWER:g}s; it may be stopped "
                       "or wedged (see the daemon's log)", err=True)
            sys.exit(EX_UNAVAILABLE)

    def ok(self, method: str, path: str, allow=(200,)) -> dict:
        status, body = self.call(method, path)
        if status not in allow:
            msg = "; ".join(e.get("message", "") for e in body.get("errors", [])) or str(body)
            click.echo(f"mta: {method} {path}: HTTP {status}: {msg}", err=True)
            sys.exit(EX_UNAVAILABLE if status == 503 else 1)
        return body


def _settings(config_path, read_files: bool = True):
    """The configuration at *config_path*, or exit 78 naming what is wrong.  *read_files*
    False: a command that uses only its addresses and paths (mconfig.load)."""
    from mta import config as mconfig

    try:
        return mconfig.load(config_path, read_files=read_files)
    except mconfig.ConfigError as exc:
        click.echo(f"mta: configuration error: {exc}", err=True)
        sys.exit(EX_CONFIG)


def _client(config_path) -> AdminClient:
    return AdminClient(_settings(config_path, read_files=False))


def _config(ctx, config_path):
    """-c given to this command, else to the ``mta queue`` group it runs under."""
    return config_path or (ctx.obj if isinstance(ctx.obj, str) else None)


def _when(ts) -> str:
    if ts is None:
        return "-"
    secs = int(ts - time.time())
    return "now" if secs <= 0 else f"in {datetime.timedelta(seconds=secs)}"


def _next_attempt(ts, held, pending: list[dict]) -> str:
    """When *pending* (recipient views) are tried next: "held (...)" under [delivery]
    hold, "suspended until ..." when the operator's suspensions hold every one back
    (the first to end), else the time (:func:`_when`)."""
    if held and pending:
        return f"held ({held})"
    susp = [r.get("suspended") for r in pending]
    if not susp or not all(susp):
        return _when(ts)
    ends = [x for x in susp if x["until"] is not None]
    x = min(ends, key=lambda x: x["until"]) if ends else susp[0]
    until = "resumed" if x["until"] is None else \
        datetime.datetime.fromtimestamp(x["until"]).isoformat(timespec="seconds")
    return f"suspended until {until}" + (f" ({x['reason']})" if x["reason"] else "")


def _rows(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())


config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), envvar="MTA_CONFIG",
    default=None, help="TOML configuration file (default: built-in defaults; env MTA_CONFIG)")
json_option = click.option("--json", "as_json", is_flag=True, help="one JSON object for machines")


@click.command("status")
@config_option
@json_option
def status_cmd(config_path, as_json):
    """The node at a glance: rates, latency, queue, suspensions, processes, disk, TCP."""
    d = _client(config_path).ok("GET", "/api/admin/status")
    if as_json:
        click.echo(json.dumps(d))
        return
    state = "draining" if d["draining"] else ("ok" if d["ok"] else "DEGRADED")
    r, t = d["rates"], d["totals"]
    click.echo(f"state: {state}")
    for p in d.get("problems", ()):
        click.echo(f"problem: {p}")
    click.echo(f"rates: injection {r['injection_per_second']:g}/s, delivery "
               f"{r['delivery_per_second']:g}/s (last {r['window_seconds']:g}s)")
    click.echo(f"totals: accepted {t['accepted_messages']:g}, delivered {t['delivered']:g}, "
               f"deferred {t['deferred']:g}, failed {t['failed']:g}")
    if d["queue"]:
        q = d["queue"]["total"]
        click.echo(f"queue: {q['messages']} message(s), {q['recipients']} recipient(s), "
                   f"{q['deferred']} deferred, {q['in_flight']} in flight"
                   + (f" (partial: {partial_note(d['queue'])})" if q.get("partial") else ""))
    elif d.get("queue_error"):
        click.echo(f"queue: unknown ({d['queue_error']})")
    share = d.get("shaping_share") or {}
    if share.get("nodes", 1) > 1:
        from mta.shaping import share_note
        click.echo(share_note(share["nodes"]))
    rows = [("LATENCY", "COUNT", "P50", "P90", "P99")]
    for k, v in d["latency_seconds"].items():
        rows.append((k, v["count"], *(("-" if v[p] is None else f"{v[p] * 1000:g}ms")
                                      for p in ("p50", "p90", "p99"))))
    _rows(rows)
    for s in d["suspensions"]:
        click.echo(f"suspended: {s['source']} until {_when(s['until'])}: {s['reason']}")
    rows = [("PROCESS", "PID", "STATE", "RESTARTS", "CPU S", "RSS")]
    for p in d["processes"]:
        state = "DOWN" if not p["up"] else "up" if p.get("healthy", True) else (
            "up, CANNOT WRITE" if p["role"] == "spool" else "up, space low")
        rows.append((f"{p['role']}[{p['index']}]", p["pid"] or "-", state,
                     p.get("restarts", "-"), "-" if p["cpu_seconds"] is None else f"{p['cpu_seconds']:.2f}",
                     "-" if p["memory_bytes"] is None else f"{p['memory_bytes'] // 1024}K"))
    _rows(rows)
    if d.get("spool_free_bytes") is not None:
        click.echo(f"spool: {_size(d['spool_free_bytes'])} free of "
                   f"{_size(d.get('spool_size_bytes'))}")


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024


@click.command("summary")
@config_option
@json_option
@click.option("--by", "by", type=click.Choice(BY_KEYS), multiple=True,
              help="group by this (repeatable); default: all of them")
@click.pass_context
def summary_cmd(ctx, config_path, as_json, by):
    """Queue summary by domain, site, pool, source and campaign (from the admin API)."""
    d = _client(_config(ctx, config_path)).ok("GET", "/api/admin/queue")
    if as_json:
        click.echo(json.dumps(d))
        return
    t = d["total"]
    click.echo(f"total: {t['messages']} message(s), {t['recipients']} recipient(s), "
               f"{t['pending']} pending, {t['deferred']} deferred, {t['in_flight']} in flight, "
               f"{t['bytes']} bytes; next retry {_when(t['next_attempt'])}")
    if t.get("partial"):
        click.echo(f"partial: {partial_note(d)}")
    if t.get("suspended_messages"):
        click.echo(suspended_line(t["suspended_messages"]))
    if d.get("webhooks", {}).get("webhooks"):
        click.echo("")
        _rows(webhook_rows(d["webhooks"], _when))
    for key in by or BY_KEYS:
        groups = d[f"by_{key}"]
        if not groups:
            continue
        click.echo("")
        first = next(iter(groups.values()))
        cols = [c for c in ("messages", "recipients", "deferred", "queued", "connections",
                            "rate") if c in first]
        rows = [(key.upper(), *(c.upper() for c in cols))]
        for name, g in sorted(groups.items(), key=lambda kv: -kv[1].get(cols[0], 0)):
            rows.append((name, *(g[c] if not isinstance(g[c], float) else f"{g[c]:.1f}"
                                 for c in cols)))
        _rows(rows)
    if d.get("not_answering"):      # (as mta queue: the others' counts, it named, exit 69)
        click.echo(f"mta: {partial_note(d)}", err=True)
        sys.exit(EX_UNAVAILABLE)


def partial_note(view: dict) -> str:
    """What a partial queue view leaves out: the shards that did not answer and those
    still reading their queue (a view of the admin API, or the status's ``queue``)."""
    parts = [f"spool[{x['shard']}] not answering, not counted ({x['error']})"
             for x in view.get("not_answering", ())]
    recovering = view.get("recovering")
    if recovering is None:
        recovering = [x["shard"] for x in view.get("shards", ()) if x.get("recovering")]
    parts += [f"spool[{n}] recovering (reading its queue: counted in part)"
              for n in recovering]
    return "; ".join(parts) or "the totals are not the whole queue"


@click.command("inspect")
@config_option
@json_option
@click.argument("qid")
@click.pass_context
def inspect_cmd(ctx, config_path, as_json, qid):
    """One queued message: envelope, recipients' states, attempts, next attempt."""
    cl = _client(_config(ctx, config_path))
    # (quoted: an id with a space or non-ASCII is the admin API's 400, not a traceback)
    status, d = cl.call("GET", f"/api/admin/messages/{urllib.parse.quote(qid, safe='')}")
    if status != 200:
        msg = "; ".join(e.get("message", "") for e in d.get("errors", []))
        click.echo(f"mta: {msg or status}", err=True)
        sys.exit(EX_UNAVAILABLE if status == 503 else 1)
    if as_json:
        click.echo(json.dumps(d))
        return
    arrival = datetime.datetime.fromtimestamp(d["arrival_time"]).isoformat()
    pending = [r for r in d["recipients"] if r["next_attempt"] is not None]
    click.echo(f"queue_id: {d['queue_id']}\nsender: <{d['sender']}>\narrival: {arrival}\n"
               f"size: {d['message_size']}\ncampaign_id: {d['campaign_id'] or '-'}\n"
               f"ip_pool: {d['ip_pool'] or '-'}\nnext attempt: "
               f"{_next_attempt(d['next_attempt'], d.get('held'), pending)}")
    for r in d["recipients"]:
        nxt = f", next attempt {_next_attempt(r['next_attempt'], d.get('held'), [r])}" \
            if r["next_attempt"] else ""
        click.echo(f"recipient: <{r['address']}> {r['state']}, {r['attempts']} attempt(s){nxt}")
        if r.get("last_reply"):
            click.echo(last_reply_line(r["last_reply"]))


@click.command("drain")
@config_option
@json_option
@click.option("--cancel", is_flag=True, help="accept mail again")
@click.option("--no-wait", is_flag=True, help="start the drain and return at once")
@click.option("--timeout", type=click.FloatRange(0), default=0.0,
              help="give up waiting after this many seconds (exit 1); 0: wait until empty")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              help="seconds between two progress reports")
def drain_cmd(config_path, as_json, cancel, no_wait, timeout, interval):
    """Stop accepting mail on this node (SMTP 421, HTTP 503), keep delivering, and report
    what remains until the queue is empty."""
    cl = _client(config_path)
    if cancel:
        d = cl.ok("DELETE", "/api/admin/drain")
        click.echo(json.dumps(d) if as_json else
                   f"drain cancelled: accepting mail; {d['remaining']['messages']} "
                   "message(s) queued"
                   + (f"; partial: {partial_note(d)}" if d.get("partial") else ""))
        return
    d = cl.ok("POST", "/api/admin/drain")
    if no_wait:
        click.echo(json.dumps(d) if as_json else
                   f"draining: {d['remaining']['messages']} message(s) remain"
                   + (f"; partial: {partial_note(d)}" if d.get("partial") else ""))
        return
    if d.get("delivery_held") and d["remaining"]["messages"]:
        click.echo("mta: delivery is held ([delivery] hold = true): the queue does not "
                   "empty until a reload without it", err=True)
    deadline = time.monotonic() + timeout if timeout else None
    tty = sys.stdout.isatty() and not as_json
    if tty:
        d = _drain_bar(cl, d, deadline, interval)
    else:
        d = _drain_lines(cl, d, deadline, interval, as_json)
    if not d["draining"]:
        click.echo("mta: the drain was cancelled", err=True)
        sys.exit(1)
    if not d["done"]:
        click.echo(f"mta: {d['remaining']['messages']} message(s) remain after {timeout:g}s; "
                   "the node is still draining (refusing mail): 'mta drain --cancel' "
                   "accepts mail again", err=True)
        sys.exit(1)
    if not as_json:
        click.echo("drained: the queue is empty; the node accepts no mail until "
                   "'mta drain --cancel' or a restart")


def _drain_lines(cl, d, deadline, interval, as_json):
    start, first = time.monotonic(), d["remaining"]["messages"]
    while True:
        r = d["remaining"]
        if as_json:
            click.echo(json.dumps(d))
        else:
            gone = first - r["messages"]
            rate = gone / (time.monotonic() - start) if time.monotonic() > start else 0.0
            click.echo(f"remaining: {r['messages']} message(s), {r['recipients']} "
                       f"recipient(s), {r['in_flight']} in flight ({rate:.1f} msg/s)"
                       + (f"; partial: {partial_note(d)}" if d.get("partial") else ""),
                       nl=True)
        sys.stdout.flush()
        if d["done"] or not d["draining"] or (deadline and time.monotonic() >= deadline):
            return d
        time.sleep(interval)
        d = cl.ok("GET", "/api/admin/drain")


def _drain_bar(cl, d, deadline, interval):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    first = max(d["remaining"]["messages"], 1)
    with Progress(TextColumn("draining"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]:.1f} msg/s, {task.fields[left]} left"),
                  TimeElapsedColumn(), TextColumn("{task.fields[note]}")) as bar:
        task = bar.add_task("drain", total=first, rate=0.0, left=d["remaining"]["messages"],
                            note="")
        start = time.monotonic()
        while True:
            left = d["remaining"]["messages"]
            if left > first:            # more came in before the drain took hold
                first = left
                bar.update(task, total=first)
            done = first - left
            rate = done / max(time.monotonic() - start, 1e-3)
            # (as the line mode says: a shard not answering is not counted in left)
            note = f"partial: {partial_note(d)}" if d.get("partial") else ""
            bar.update(task, completed=done, rate=rate, left=left, note=note)
            if d["done"] or not d["draining"] or (deadline and time.monotonic() >= deadline):
                return d
            time.sleep(interval)
            d = cl.ok("GET", "/api/admin/drain")


@click.command("upgrade")
@config_option
@json_option
@click.option("--timeout", type=click.FloatRange(1), default=120.0, show_default=True,
              help="seconds to wait for the new supervisor")
def upgrade_cmd(config_path, as_json, timeout):
    """Start the installed version's supervisor on the running daemon's listening sockets.

    Sends SIGUSR2 to the running supervisor (run/mta.pid): it stops accepting,
    finishes what is in flight, stops its children, starts ``mta serve`` with
    the listening sockets (connections wait in their backlog, none is refused),
    and exits.  Waits until the new supervisor's pid is in run/mta.pid.
    """
    s = _settings(config_path)
    pidfile = os.path.join(s.run_dir, "mta.pid")
    old = _read_pid(pidfile)
    if not old:
        click.echo(f"mta: no running daemon ({pidfile} is missing)", err=True)
        sys.exit(EX_UNAVAILABLE)
    try:
        os.kill(old, signal.SIGUSR2)
    except ProcessLookupError:
        click.echo(f"mta: the daemon (pid {old}) is not running", err=True)
        sys.exit(EX_UNAVAILABLE)
    if not as_json:
        click.echo(f"upgrade asked of supervisor pid {old}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = _read_pid(pidfile)
        if new and new != old and proc.alive(new) and not proc.alive(old):
            click.echo(json.dumps({"old_pid": old, "new_pid": new}) if as_json else
                       f"upgraded: supervisor pid {new}")
            return
        time.sleep(0.2)
    click.echo(f"mta: no new supervisor after {timeout:g}s; see the daemon's log", err=True)
    sys.exit(1)


@click.command("reload")
@config_option
@click.option("--pid", type=click.IntRange(1), default=None,
              help="the supervisor's pid (systemd's $MAINPID; default: run/mta.pid)")
@click.option("--timeout", type=click.FloatRange(1), default=300.0, show_default=True,
              help="seconds to wait for the reload to finish")
def reload_cmd(config_path, pid, timeout):
    """Reload the running daemon's configuration and wait until it is in effect.

    Checks the file first (an error in it is named, exit 78, and nothing is
    signalled), sends SIGHUP to the supervisor, and waits for the record
    (run/reload.json) of a reload that read the file after the signal: exit 0
    once the new acceptors accept (and the processes a changed section rolls are
    replaced), 1 with the reason when the supervisor refused the reload or it
    failed (what ran before keeps running), 1 after --timeout, 1 at once (the signal
    sent) when the file moves the state directory, where the daemon does not record
    it, 69 when no daemon runs or it exits meanwhile.  ``ExecReload=`` in contrib/mta.service, so that
    ``systemctl reload mta`` returns when the reload is over.
    """
    from mta import config as mconfig

    try:
        s = mconfig.load(config_path)
    except mconfig.ConfigError as exc:
        click.echo(f"mta: configuration error: {exc}; the daemon was not asked to reload",
                   err=True)
        sys.exit(EX_CONFIG)
    pidfile = os.path.join(s.run_dir, "mta.pid")
    pid = pid or _read_pid(pidfile)
    if not pid or not proc.alive(pid):
        click.echo(f"mta: no running daemon ({pidfile} names none that runs); not "
                   "reloaded", err=True)
        sys.exit(EX_UNAVAILABLE)
    # (CLOCK_MONOTONIC, as the supervisor stamps its record: one clock for the host;
    # taken before the signal, so a reload stamped later read the file as it is now)
    asked = time.clock_gettime(time.CLOCK_MONOTONIC)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        click.echo(f"mta: the daemon (pid {pid}) is not running; not reloaded", err=True)
        sys.exit(EX_UNAVAILABLE)
    if not _runs_in(pid, s.run_dir):
        # The file names another state directory, which a running daemon keeps until a
        # restart: it records the outcome in its own, not here, and nothing would come.
        click.echo(f"mta: server.state_dir changed: it takes effect at the next restart; "
                   f"the daemon (pid {pid}) was asked to reload the rest, and its outcome "
                   f"is recorded in its own state directory ({s.run_dir} is not it); "
                   "see the daemon's log", err=True)
        sys.exit(1)
    path = os.path.join(s.run_dir, mconfig.RELOAD_RECORD)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as fh:
                rec = json.loads(fh.read())
        except (OSError, ValueError):
            rec = {}
        if rec.get("read_at", 0) > asked and rec.get("state") in ("done", "failed"):
            for key in rec.get("later") or ():
                click.echo(f"mta: {key} changed: it takes effect at the next restart",
                           err=True)
            if rec["state"] == "failed":
                click.echo(f"mta: {rec.get('error') or 'reload failed'}; see the daemon's "
                           "log", err=True)
                sys.exit(1)
            click.echo(f"reloaded: {rec.get('status', '')}")
            return
        # an upgrade meanwhile hands the signal on to the new supervisor, which reloads
        if not proc.alive(pid) and not daemon_running(s):
            click.echo(f"mta: the daemon (pid {pid}) exited before the reload finished",
                       err=True)
            sys.exit(EX_UNAVAILABLE)
        time.sleep(0.05)
    click.echo(f"mta: the reload did not finish in {timeout:g}s; see the daemon's log",
               err=True)
    sys.exit(1)


def daemon_running(settings) -> bool:
    """Whether the supervisor of *settings*' state directory runs (its pid file's pid)."""
    pid = _read_pid(os.path.join(settings.run_dir, "mta.pid"))
    return bool(pid) and proc.alive(pid)


def admin_pid(settings) -> int:
    """The pid of the running supervisor's admin process (its title), 0 if none."""
    sup = _read_pid(os.path.join(settings.run_dir, "mta.pid"))
    if not sup:
        return 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                ppid = int(fh.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == sup and proc.title(int(name)).startswith("mta: admin"):
            return int(name)
    return 0


def _runs_in(pid: int, run_dir: str) -> bool:
    """Whether the supervisor *pid* uses *run_dir*: it holds its lock open
    (run/mta.lock); where that cannot be told (no lock file: a daemon of an earlier
    version; its descriptors unreadable), whether the pid file there names it.  A
    directory that exists is not the daemon's for that: a former state directory."""
    if not os.path.isdir(run_dir):
        return False
    from mta import config as mconfig

    held = proc.holds_open(pid, os.path.join(run_dir, mconfig.SUPERVISOR_LOCK))
    if held is not None:
        return held
    return _read_pid(os.path.join(run_dir, "mta.pid")) == pid


def _read_pid(path: str) -> int:
    try:
        with open(path) as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _query(**fields) -> str:
    return urllib.parse.urlencode({k: v for k, v in fields.items() if v not in (None, "")})


def _suspension_line(x: dict) -> str:
    what = " ".join(f"{k}={x[k]}" for k in ("domain", "campaign", "pool", "site", "source")
                    if x.get(k))
    until = "until resumed" if not x["until"] else f"ends {_when(x['until'])}"
    return f"{x['id']}  {what}  {until}  {x['reason'] or '-'}"


@click.command("suspend")
@config_option
@json_option
@click.option("--domain", help="recipient domain")
@click.option("--campaign", help="campaign_id")
@click.option("--pool", help="egress pool (ip_pool)")
@click.option("--site", help="receiving site (mta queue summary --by site)")
@click.option("--source", help="egress source")
@click.option("--reason", default="", help="why (shown with the suspension)")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="seconds; default: until 'mta resume'")
@click.option("--list", "listing", is_flag=True, help="show the suspensions in effect")
@click.pass_context
def suspend_cmd(ctx, config_path, as_json, domain, campaign, pool, site, source, reason,
                duration, listing):
    """Hold back queued and new mail to a domain, of a campaign or pool (in the spool), or
    to a site or from a source (in delivery), until resumed or for --duration seconds.

    Durable across restarts.  The fields given must all match; a site or source
    suspension takes no domain, campaign or pool."""
    cl = _client(_config(ctx, config_path))
    if listing:
        d = cl.ok("GET", "/api/admin/suspensions")
        if as_json:
            click.echo(json.dumps(d))
        else:
            for x in d["results"]:
                click.echo(_suspension_line(x))
            if not d["results"]:
                click.echo("no suspensions in effect")
        return
    q = _query(domain=domain, campaign=campaign, pool=pool, site=site, source=source,
               reason=reason, duration=None if duration is None else f"{duration:g}")
    d = cl.ok("POST", f"/api/admin/suspensions?{q}")["suspension"]
    click.echo(json.dumps(d) if as_json else f"suspended: {_suspension_line(d)}")
    if d.get("note") and not as_json:
        click.echo(f"note: {d['note']}", err=True)


@click.command("resume")
@config_option
@json_option
@click.argument("sid")
@click.pass_context
def resume_cmd(ctx, config_path, as_json, sid):
    """End suspension SID (from 'mta suspend --list')."""
    d = _client(_config(ctx, config_path)).ok("DELETE", f"/api/admin/suspensions/{urllib.parse.quote(sid)}")
    click.echo(json.dumps(d) if as_json else f"resumed: {_suspension_line(d['resumed'])}")


@click.command("bounce")
@config_option
@json_option
@click.option("--domain", help="recipient domain")
@click.option("--site", help="receiving site: the domains delivery knows it serves")
@click.option("--campaign", help="campaign_id")
@click.option("--pool", help="egress pool (ip_pool)")
@click.option("--reason", default="", help="put in each bounce event (and DSN)")
@click.option("--dsn", is_flag=True, help="also send each sender a DSN")
@click.option("--no-wait", is_flag=True, help="start the bounce and return at once")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=0.5, show_default=True,
              help="seconds between two progress reports")
@click.pass_context
def bounce_cmd(ctx, config_path, as_json, domain, site, campaign, pool, reason, dsn, no_wait,
               interval):
    """Bounce every queued recipient the fields match (all of them must): a bounce event
    of class 25 (Admin Failure) each, and with --dsn a DSN to the sender.

    Exit status 1 when nothing queued matches (a typo, mail already gone), said on
    stderr, as 'mta queue delete' of a queue id not queued."""
    cl = _client(_config(ctx, config_path))
    q = _query(domain=domain, site=site, campaign=campaign, pool=pool, reason=reason,
               dsn="1" if dsn else "0")
    d = cl.ok("POST", f"/api/admin/bounce?{q}")
    if not no_wait and d["id"] and not d["finished"]:
        if sys.stdout.isatty() and not as_json:
            d = _bounce_bar(cl, d, interval)
        else:
            while not d["finished"]:
                if not as_json:      # (--json: the one object at the end, nothing before)
                    click.echo(f"bounced {d['done']} of {d['total']} recipient(s)")
                    sys.stdout.flush()
                time.sleep(interval)
                d = cl.ok("GET", f"/api/admin/bounce/{d['id']}")
    if as_json:
        click.echo(json.dumps(d))
    else:
        state = "done" if d["finished"] else "started"
        click.echo(f"bulk bounce {d['id'] or '-'} {state}: {d['done']} of {d['total']} "
                   "recipient(s) bounced")
    if not d["total"]:
        # (the total is counted when the bounce starts, on every shard: none matched)
        given = " ".join(f"--{k} {shlex.quote(v)}" for k, v in (("domain", domain), ("site", site),
                                                    ("campaign", campaign), ("pool", pool))
                         if v is not None)
        click.echo(f"mta: no queued recipient matches {given}: nothing bounced", err=True)
        sys.exit(1)


def _bounce_bar(cl, d, interval):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    with Progress(TextColumn("bouncing"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]:.0f} rcpt/s"), TimeElapsedColumn()) as bar:
        task = bar.add_task("bounce", total=max(d["total"], 1), rate=0.0)
        start = time.monotonic()
        while True:
            rate = d["done"] / max(time.monotonic() - start, 1e-3)
            bar.update(task, total=max(d["total"], 1), completed=d["done"], rate=rate)
            if d["finished"]:
                return d
            time.sleep(interval)
            d = cl.ok("GET", f"/api/admin/bounce/{d['id']}")


def register(main, queue) -> None:
    """Add these commands to the ``mta`` group (*main*) and its ``queue`` group."""
    main.add_command(status_cmd)
    main.add_command(inspect_cmd)
    main.add_command(drain_cmd)
    main.add_command(upgrade_cmd)
    main.add_command(reload_cmd)
    main.add_command(suspend_cmd)
    main.add_command(resume_cmd)
    main.add_command(bounce_cmd)
    queue.add_command(summary_cmd)
    queue.add_command(inspect_cmd)
    queue.add_command(suspend_cmd)
    queue.add_command(resume_cmd)
    queue.add_command(bounce_cmd)
