"""Targets mta and mta-base: our daemon, `mta serve -c CONFIG` with a generated config.

mta       this checkout (or --mta-cmd, or --mta-head's copy of HEAD's mta/).
mta-base  --mta-base REV: the mta exactly as at REV (revision.build_base), measured in the
          same rounds, so a change is seen side by side with the commit before it.

Acceptance: deliveries held, like the Postfix peer's hold queue; after each run `mta queue
--json` must count every message sent.  --e2e: one static route for every domain to the
receiver (an IP literal: no DNS); delivered = a "delivery" line in its event log (the spool
writes it after the outcome is on disk) for every message.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from ..common import CONFIRM_TIMEOUT_S, LOOPBACK, REPO, free_port, tail, wait_banner
from ..procs import kill_leftovers, process_tree, stop_child
from .base import Target


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} as a TOML value")


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _array_of_tables(name: str, items: list) -> list[str]:
    """``[[name]]`` tables of plain keys."""
    lines = []
    for item in items:
        lines += ["", f"[[{name}]]"]
        for ik, iv in item.items():
            if isinstance(iv, dict) or _is_table_array(iv):
                raise ValueError(f"nested table {name}.{ik} is not supported")
            lines.append(f"{ik} = {toml_value(iv)}")
    return lines


def toml_dumps(doc: dict) -> str:
    """Write a TOML document of top-level keys, top-level arrays of tables ([[webhook]]),
    one level of tables, and arrays of tables inside those ([[section.key]], e.g.
    [[delivery.route]])."""
    lines = [f"{k} = {toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict) and not _is_table_array(v)]
    for key, items in doc.items():
        if _is_table_array(items):
            lines += _array_of_tables(key, items)
    for section, table in doc.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"]
            arrays = []
            for k, v in table.items():
                if _is_table_array(v):
                    arrays.append((k, v))
                    continue
                if isinstance(v, dict):
                    raise ValueError(f"nested table {section}.{k} is not supported")
                lines.append(f"{k} = {toml_value(v)}")
            for k, items in arrays:
                lines += _array_of_tables(f"{section}.{k}", items)
    return "\n".join(lines).lstrip("\n") + "\n"


def merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


class EventTail:
    """--e2e: follow the mta's event log, counting lines by type as they are appended."""

    TYPES = (b"injection", b"delivery", b"delay", b"bounce")   # SparkPost's (expiry: bounce)

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1
        self.offset = 0
        self.counts = dict.fromkeys(self.TYPES, 0)
        self.first_failure = None   # the first non-delivery outcome line, for the report

    def poll(self) -> None:
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
        size = os.fstat(self.fd).st_size
        if size <= self.offset:
            return
        data = os.pread(self.fd, size - self.offset, self.offset)
        end = data.rfind(b"\n") + 1   # whole lines only; the rest is read next time
        if not end:
            return
        chunk = data[:end]
        self.offset += end
        for t in self.TYPES:
            self.counts[t] += chunk.count(b'"type":"' + t + b'"')
        if self.first_failure is None:
            for t in self.TYPES[2:]:
                i = chunk.find(b'"type":"' + t + b'"')
                if i >= 0:
                    line = chunk[chunk.rfind(b"\n", 0, i) + 1:chunk.find(b"\n", i)]
                    self.first_failure = line.decode(errors="replace")
                    break

    @property
    def delivered(self) -> int:
        return self.counts[b"delivery"]

    @property
    def failures(self) -> int:
        return sum(self.counts[t] for t in self.TYPES[2:])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1



def mta_latencies(events_path: Path, since: float) -> list[float]:
    """Seconds from reception to delivery per (queue_id, recipient) received at or after
    since (epoch seconds), from the mta's event log."""
    received, delivered = {}, {}
    with open(events_path, "rb") as f:
        for line in f:
            e = json.loads(line)
            key = (e.get("queue_id"), e.get("raw_rcpt_to"))
            t = float(e["event_time"])
            if e.get("type") == "injection" and t >= since:
                received[key] = t
            elif e.get("type") == "delivery":
                delivered.setdefault(key, t)  # at-least-once: the first counts
    return [delivered[k] - t for k, t in received.items() if k in delivered]


class MtaTarget(Target):
    """Our daemon: `mta serve -c CONFIG`, stopped with SIGTERM to the supervisor."""

    name = "mta"
    durable = True
    queue_confirm = True
    QUEUED = re.compile(r"^2\.0\.0 Ok: queued as \S+$")

    def __init__(self, args, rundir):
        super().__init__(args, rundir)
        self.proc = None
        self.config_path = rundir / "mta.toml"
        self.log = rundir / "mta.log"
        self.events: EventTail | None = None   # --e2e

    def command(self) -> list[str]:
        """--mta-cmd, else `python -m mta` from this checkout (or from the --mta-head copy),
        else `mta` from PATH."""
        if self.args.mta_cmd:
            base = shlex.split(self.args.mta_cmd)
        elif self.args.mta_src:
            base = [sys.executable, "-m", "mta"]
        elif (REPO / "mta" / "__main__.py").exists() or not shutil.which("mta"):
            base = [sys.executable, "-m", "mta"]
        else:
            base = [shutil.which("mta")]
        return base + ["serve", "-c", str(self.config_path)]

    def source_dir(self) -> Path:
        """The directory holding the mta package that runs: this checkout or --mta-head's copy."""
        return Path(self.args.mta_src) if self.args.mta_src else REPO

    def env(self) -> tuple[dict, Path]:
        """Environment and working directory for the daemon and `mta queue`."""
        src = self.source_dir()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
        env.pop("NOTIFY_SOCKET", None)
        return env, src

    def _connection_key(self) -> str:
        """The [delivery] key of the connection limit in the tree that runs: connection_limit
        (per source x site, node-wide, like Postfix's destination concurrency), or, in older
        trees measured with --mta-base, connections_per_domain (per delivery process)."""
        schema = self.source_dir() / "mta" / "config" / "schema.py"
        try:
            text = schema.read_text()
        except OSError:
            return "connection_limit"
        return "connection_limit" if "connection_limit:" in text else "connections_per_domain"

    def config(self, port, sink_port=None) -> dict:
        if self.args.e2e:
            # Deliver everything to the harness's smtp-sink: a static route for every domain
            # to an IP literal, so no DNS lookup is ever made.
            delivery = {"hold": False, self._connection_key(): self.args.concurrency,
                        "route": [{"domain": "*", "hosts": [
                            f"{LOOPBACK}:{self.sink_port if sink_port is None else sink_port}"
                        ]}]}
        else:
            # Deliveries held, like the Postfix peer's hold queue: both only accept durably.
            delivery = {"hold": True}
        doc = {"server": {"state_dir": str(self.rundir / "state")},
               "smtp": {"listen": [f"{LOOPBACK}:{port}"]},
               "delivery": delivery}
        for extra in self.args.mta_config_extra:
            merge(doc, tomllib.loads(extra))
        return doc

    def event_log(self) -> Path | None:
        """Path of the daemon's event log under the generated config, or None if disabled."""
        server = self.config(0)["server"]
        name = server.get("event_log", "log/events.jsonl")
        if not name:
            return None
        path = Path(name)
        return path if path.is_absolute() else Path(server["state_dir"]) / path

    def start(self):
        self.port = free_port()
        (self.rundir / "state").mkdir()
        self.config_path.write_text(toml_dumps(self.config(self.port)))
        env, cwd = self.env()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.root_pid = self.proc.pid
        wait_banner(self.port, self._alive)

    def _alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                               f"{tail(self.log)}")

    def queue_total(self) -> dict:
        """`mta queue --json` of the running daemon: its "total" object."""
        return self.queue_json()["total"]

    def queue_json(self) -> dict:
        """`mta queue --json` of the running daemon."""
        base = self.command()[:-3]   # the command without "serve -c CONFIG"
        env, cwd = self.env()
        r = subprocess.run(base + ["queue", "--json", "-c", str(self.config_path)], cwd=cwd,
                           env=env, capture_output=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"mta queue failed: {r.stderr.decode()[-500:]}")
        return json.loads(r.stdout)

    def wait_queue_empty(self, timeout_s: float) -> float:
        """Poll `mta queue --json` until it reports 0 messages; return the seconds it took.

        Raises RuntimeError (with the last answer) if it does not within timeout_s."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while True:
            total = self.queue_total()
            if total["messages"] == 0:
                return time.perf_counter() - t0
            if time.monotonic() >= deadline:
                raise RuntimeError(f"mta queue still reports {json.dumps(total)} after "
                                   f"{timeout_s:.0f} s")
            time.sleep(0.2)

    def check_probe(self, reply):
        if self.QUEUED.match(reply):
            return None
        return (f"{self.name} reply to DATA {reply!r} does not match "
                "'250 2.0.0 Ok: queued as QUEUEID'")

    def check(self, expected: int) -> str | None:
        """Ask the running daemon how many messages it holds: it must be every one sent."""
        if self.args.e2e:
            return None  # confirm() checks the queue, measure_e2e() the receiver
        try:
            held = self.queue_total()["messages"]
        except RuntimeError as e:
            return str(e)
        if held == expected:
            return None
        return f"mta queue has {held} messages, expected {expected}"

    def stop(self):
        if self.proc is None:
            return
        snapshot = process_tree(self.proc.pid)
        stop_child(self.proc)
        killed = kill_leftovers(snapshot)
        if killed:
            print(f"  killed leftover {self.name} processes {killed}", file=sys.stderr)
        self.proc = None

    def describe(self):
        cfg = toml_dumps(self.config("PORT", "SINKPORT")).replace(str(self.rundir), "TMP")
        cmd = shlex.join(self.command()).replace(str(self.rundir), "TMP")
        origin = self.origin()
        if origin:
            cmd = f"cd SRC && PYTHONPATH=SRC {cmd}   (SRC: {origin})"
        return [cmd, "config: " + " ".join(cfg.split())]

    def origin(self) -> str | None:
        """Where SRC comes from, when the daemon does not run from this checkout."""
        if self.args.mta_src:
            return f"git archive of {self.args.revision}'s mta/ + this checkout's mta/_ext/*.so"
        return None

    # --e2e ---------------------------------------------------------------------------------

    def open_deliveries(self):
        path = self.event_log()
        if path is None:
            raise RuntimeError("--e2e needs the mta's event log (server.event_log)")
        self.events = EventTail(path)

    def poll_deliveries(self):
        """A deferred or bounced recipient would wait for a retry: report it at once."""
        self.events.poll()
        if self.events.failures:
            raise RuntimeError(f"mta logged {self.events.failures} non-delivery outcome(s); "
                               f"first: {self.events.first_failure}")

    def delivered_all(self, expected):
        return self.events.delivered >= expected

    def delivery_state(self):
        self.events.poll()
        counts = {k.decode(): v for k, v in self.events.counts.items()}
        try:
            doc = self.queue_json()
            doc["shards"] = [{k: v for k, v in x.items() if k != "domains"}
                             for x in doc.get("shards", [])]
            doc.pop("domains", None)
            queue = json.dumps(doc)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
            queue = f"? ({e})"
        return f"mta event log counts {counts}; mta queue --json {queue}"

    def settle(self):
        self.wait_queue_empty(CONFIRM_TIMEOUT_S)

    def confirm(self, run, since):
        errors = []
        try:
            run.queue_confirm_s = self.wait_queue_empty(CONFIRM_TIMEOUT_S)
        except RuntimeError as e:
            errors.append(str(e))
        return errors, mta_latencies(self.events.path, since)

    def close_deliveries(self):
        if self.events is not None:
            self.events.close()


class MtaBaseTarget(MtaTarget):
    """--mta-base REV: the daemon exactly as at REV, from the copy revision.build_base() made
    (REV's mta/ with REV's own ext/ compiled into its mta/_ext), with the same generated
    config as the mta target."""

    name = "mta-base"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mta", "serve", "-c", str(self.config_path)]

    def source_dir(self) -> Path:
        return Path(self.args.mta_base_src)

    def origin(self) -> str:
        return (f"git archive of {self.args.base_revision}, its own ext/ compiled into "
                "SRC/mta/_ext")
