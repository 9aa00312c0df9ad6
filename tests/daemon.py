"""Test harness: run the real ``mta serve`` as a subprocess and talk to it over sockets.

Everything listens on and connects to loopback only.  A :class:`Daemon` owns a
temporary state directory and config file; it starts the supervisor in its own
session (process group) so a test can kill -9 the whole tree, and it stops
only the processes it started.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The text of the reply to a message the daemon has queued.
QUEUED_RE = re.compile(r"2\.0\.0 Ok: queued as ([0-9A-F]{20})")


# Ports for the daemons and servers tests start are picked by the test process, then bound
# by another process moments later.  Asking the kernel for one (bind to port 0, close) is not
# safe with pytest-xdist: the kernel hands a port just released to the next asker, in this
# worker or in another one, and two daemons given one port share it (SO_REUSEPORT) or
# refuse their configuration.  So each worker takes ports from a range of its own below the
# kernel's ephemeral range (where it never assigns ports by itself), in turn, skipping any
# that something else holds.
_PORTS_LO = 20000


def _port_range() -> range:
    hi = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            hi = min(hi, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    size = (hi - _PORTS_LO) // count
    return range(_PORTS_LO + index * size, _PORTS_LO + (index + 1) * size) \
        if size >= 500 else range(0)


_RANGE = _port_range()
_next = random.randrange(len(_RANGE)) if _RANGE else 0   # where this process starts


def _bindable(host: str, port: int, udp: bool) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    try:
        for kind in kinds:
            with socket.socket(family, kind) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
                s.bind((host, port))
    except OSError:
        return False
    return True


def free_port(host: str = HOST, udp: bool = False) -> int:
    """A TCP port (and UDP too with *udp*) free on *host* right now, from this worker's own
    range, the next in turn: never one another worker may be given, and not the same one
    again in this process until the whole range has gone round."""
    global _next
    for _ in range(len(_RANGE)):
        port = _RANGE[_next % len(_RANGE)]
        _next += 1
        if _bindable(host, port, udp):
            return port
    # no range (the kernel's ephemeral range starts too low): ask the kernel
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _key(k: str) -> str:
    """A TOML key: bare when it may be, else quoted ("example.com" has a dot)."""
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def render_config(sections: dict) -> str:
    """TOML for {section: {key: value}}; a list of dicts becomes [[section.key]] tables,
    and a section that is a list of dicts ({"shaping": [...]}) [[section]] tables."""
    out = []
    for name, keys in sections.items():
        if isinstance(keys, list):
            for item in keys:
                out.append(f"[[{name}]]")
                out += [f"{ik} = {_toml(iv)}" for ik, iv in item.items()]
                out.append("")
            continue
        out.append(f"[{name}]")
        tables = []
        for k, v in keys.items():
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                tables.append((k, v))
            else:
                out.append(f"{k} = {_toml(v)}")
        out.append("")
        for k, items in tables:
            for item in items:
                out.append(f"[[{name}.{k}]]")
                out += [f"{ik} = {_toml(iv)}" for ik, iv in item.items()]
                out.append("")
    return "\n".join(out)


def fd_table(pid: int) -> tuple[int, int]:
    """(FDSize: descriptor slots allocated, soft limit of open files) of process *pid*."""
    with open(f"/proc/{pid}/status") as fh:
        size = int(next(line for line in fh if line.startswith("FDSize:")).split()[1])
    with open(f"/proc/{pid}/limits") as fh:
        soft = next(line for line in fh if line.startswith("Max open files")).split()[3]
    return size, (1 << 62 if soft == "unlimited" else int(soft))


class NotifySocket:
    """A fake systemd: the datagram socket $NOTIFY_SOCKET names, each message kept with
    when it came (monotonic) and the pid that sent it (SO_PASSCRED)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.got: list[tuple[float, int, list[str]]] = []     # (when, pid, lines)

    def receive(self, timeout: float) -> tuple[float, int, list[str]] | None:
        """The next message within *timeout* seconds (kept in ``got``), or None."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (TimeoutError, BlockingIOError):
            return None
        pid = 0
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(cdata[:4], sys.byteorder)
        msg = (time.monotonic(), pid, data.decode().split("\n"))
        self.got.append(msg)
        return msg

    def expect(self, line: str, timeout: float = 60.0) -> tuple[float, int, list[str]]:
        """The next message holding *line* (those before it are kept too)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.receive(deadline - time.monotonic())
            if msg is None:
                raise AssertionError(f"no {line} within {timeout}s; got {self.got[-5:]}")
            if line in msg[2]:
                return msg

    def collect(self, seconds: float) -> None:
        """Receive for *seconds*."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.receive(deadline - time.monotonic())

    def pings(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, int]]:
        """(when, pid) of the WATCHDOG=1 messages received in [since, until]."""
        return [(t, pid) for t, pid, lines in self.got
                if "WATCHDOG=1" in lines and since <= t <= until]

    def close(self) -> None:
        self.sock.close()


def max_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch of [start, end] without one of *times*."""
    edges = [start, *sorted(t for t in times if start <= t <= end), end]
    return max(b - a for a, b in zip(edges, edges[1:]))


def wait_until(pred, timeout: float, what: str = "condition", interval: float = 0.02,
               details=None):
    """Poll *pred* until it returns something true; that value, or AssertionError (with
    *details*(), e.g. the end of a daemon's log, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f":\n{details()}" if details else ""))
        time.sleep(interval)


def read_reply_bytes(sock_file, limit: int = -1) -> bytes:
    """Read one (possibly multi-line) SMTP reply from a socket makefile('rb'), exactly as
    the server sent it.  A line cut off by the end of the connection (or longer than
    *limit*) is not a reply: ConnectionError."""
    out = b""
    while True:
        line = sock_file.readline(limit)
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed")
        out += line
        text = line.rstrip(b"\r\n")
        if len(text) < 4 or text[3:4] != b"-":
            return out


def read_reply(sock_file, limit: int = -1) -> tuple[int, list[str]]:
    """Read one SMTP reply: (code, [text of each line])."""
    lines = read_reply_bytes(sock_file, limit).decode("utf-8", "replace").split("\n")[:-1]
    texts = [x.rstrip("\r") for x in lines]
    return int(texts[-1][:3]), [x[4:] for x in texts]


def queued_id(text: str) -> str:
    """The queue id in the text of the daemon's reply to a queued message."""
    m = QUEUED_RE.fullmatch(text)
    assert m, text
    return m.group(1)


def smtp_transaction(s: smtplib.SMTP, sender, rcpts, msg: bytes, mail_options=()):
    """MAIL, RCPT..., DATA on smtplib session *s* (MAIL and each RCPT must get 250);
    the reply to the message, (code, text)."""
    code, text = s.mail(sender, list(mail_options))
    assert code == 250, (code, text)
    for r in rcpts:
        code, text = s.rcpt(r)
        assert code == 250, (r, code, text)
    return s.data(msg)


def split_received(message: bytes) -> tuple[bytes, bytes]:
    """(our leading Received header field, the rest) of a stored or delivered message;
    CRLF or (smtp-sink's dumps) LF line ends."""
    if not message.startswith(b"Received:"):
        raise AssertionError(f"no leading Received header: {message[:200]!r}")
    pos = message.index(b"\n") + 1
    while message[pos:pos + 1] in (b" ", b"\t"):
        pos = message.index(b"\n", pos) + 1
    return message[:pos], message[pos:]


EXPIRY_REASON = "[internal] message expired"


def event_kind(e: dict) -> str:
    """An event's SparkPost type, but "expiration" for a bounce that is an expiry
    (class 24, its reason naming the expiry: mta.events.shape)."""
    if e["type"] == "bounce" and EXPIRY_REASON in e.get("raw_reason", ""):
        assert e["bounce_class"] == "24", e
        return "expiration"
    return e["type"]



def mta_children(parent: int, zombies: bool = False) -> list[tuple[str, int]]:
    """(title without "mta: ", pid) of *parent*'s mta children ('spool[0]'; one just
    forked still has its parent's title), *zombies* (exited, not reaped) among them."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent or (fields[0] == "Z" and not zombies):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                title = fh.read().split(b"\0")[0].decode()
        except (OSError, ValueError, IndexError, UnicodeDecodeError):
            continue
        if title.startswith("mta: "):
            out.append((title[5:].strip(), int(pid)))
    return out

class Daemon:
    """One ``mta serve`` under test."""

    def __init__(self, tmp_path, acceptors: int = 2, shards: int = 2, **sections):
        self.dir = str(tmp_path)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.admin_port = free_port()
        self.state_dir = os.path.join(self.dir, "state")
        self.config_path = os.path.join(self.dir, "mta.toml")
        self.log_path = os.path.join(self.dir, "mta.log")
        self.sections = {
            "server": {"state_dir": self.state_dir, "hostname": "mta.test",
                       "shutdown_timeout": 5.0, "restart_backoff_max": 2.0},
            "smtp": {"listen": [f"{HOST}:{self.port}"], "acceptors": acceptors},
            "http": {"listen": [f"{HOST}:{self.http_port}"]},
            "admin": {"listen": [f"{HOST}:{self.admin_port}"]},
            # 4 MiB segments, not the default 64: every daemon test zero-fills a
            # segment and a spare per shard at start, and smaller ones roll over
            # (and are reused) within a test's traffic.
            "spool": {"shards": shards, "min_free_bytes": 0, "segment_size": 4 << 20},
            # Acceptance tests keep mail queued; delivery tests turn this off and
            # point the resolver at their own DNS server on loopback.
            "delivery": {"hold": True, "processes": 1},
        }
        for name, keys in sections.items():
            if isinstance(keys, list):          # [[name]] tables at the top level
                self.sections[name] = list(keys)
            else:
                self.sections.setdefault(name, {}).update(keys)
        self.write_config()
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")

    def write_config(self, text: str | None = None) -> None:
        with open(self.config_path, "w") as fh:
            fh.write(text if text is not None else render_config(self.sections))

    def reload(self, pattern: str = r"reloaded: ", timeout: float = 60.0, **changes) -> str:
        """Apply *changes* ({section: {key: value}}) to the config file, SIGHUP, and wait
        for the next log line matching *pattern*; returns the log."""
        done = len(re.findall(pattern, self.log()))
        for section, keys in changes.items():
            self.sections.setdefault(section, {}).update(keys)
        self.write_config()
        self.proc.send_signal(signal.SIGHUP)
        return self.wait_log(pattern, count=done + 1, timeout=timeout)

    # ------------------------------------------------------------- lifecycle

    def start(self, wait: bool = True, env: dict | None = None,
              python: list[str] | None = None) -> "Daemon":
        """*python*: the command that runs ``-m mta serve`` (default: this python; a
        wrapper that sets something up and execs it)."""
        logf = open(self.log_path, "ab")
        self.log_mark = logf.tell()   # where this run's log starts (restarts append)
        self.proc = subprocess.Popen(
            [*(python or [sys.executable]), "-m", "mta", "serve", "-c", self.config_path],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            env={**self.env, **(env or {})}, cwd=self.dir)
        logf.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mta serve exited {self.proc.returncode}:\n{self.log()}")
            if "ready: accepting" in self.log(since_start=True):
                try:
                    with socket.create_connection((HOST, self.port), timeout=2) as s:
                        if s.recv(512).startswith(b"220 "):
                            return
                except OSError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"mta serve not ready after {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the supervisor and wait; returns its exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def kill9(self) -> None:
        """kill -9 the supervisor and every child (its process group)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        # Children are in the same process group; make sure none survive.
        deadline = time.monotonic() + 10
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _group_alive(self) -> bool:
        """Whether a process of the daemon's group has not exited yet.  An orphaned
        child that has exited stays a zombie until PID 1 reaps it (seconds, in some
        containers); it holds no file, socket or memory any more, so it counts as gone."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rpartition(b")")[2].split()
            except OSError:
                continue        # gone meanwhile
            # fields[0] is the state, fields[2] the process group
            if int(fields[2]) == self.proc.pid and fields[0] not in (b"Z", b"X"):
                return True
        return False

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(30)
            except Exception:
                self.kill9()
        elif self.proc is not None and self._group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)

    # --------------------------------------------------------------- looking

    def log(self, since_start: bool = False) -> str:
        """The daemon's log; with *since_start* only what the latest start() wrote."""
        try:
            with open(self.log_path, "rb") as fh:
                if since_start:
                    fh.seek(getattr(self, "log_mark", 0))
                return fh.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 20.0, count: int = 1,
                 since_start: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log(since_start)
            if len(re.findall(pattern, text)) >= count:
                return text
            time.sleep(0.05)
        raise TimeoutError(f"log never matched {pattern!r}:\n{self.log()[-4000:]}")

    def wait_restarted(self, title: str, old_pid: int, timeout: float = 20.0) -> int:
        """The supervisor logged the death (by kill -9) of *old_pid* and started a new
        *title* ('spool[0]'); returns the new PID."""
        role = re.escape(title)
        self.wait_log(rf"{role} pid={old_pid} died \(signal 9\)", timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            pid = self.children().get(title)
            if pid and pid != old_pid:
                break
            assert time.monotonic() < deadline, f"{title} was not restarted:\n{self.log()[-3000:]}"
            time.sleep(0.05)
        self.wait_log(rf"started {role} pid={pid}", timeout=timeout)
        return pid

    def children(self) -> dict[str, int]:
        """Map process title ('spool[0]', 'acceptor[1]') to PID for the live children."""
        return {title: pid for title, pid in mta_children(self.proc.pid, zombies=True)}

    def cli(self, *args, check: bool = True, timeout: float = 60.0,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run ``mta ARGS -c CONFIG``; the -c goes after the subcommand path; *input* is stdin."""
        argv = [sys.executable, "-m", "mta", *args]
        env = {**self.env, "MTA_CONFIG": self.config_path}
        r = subprocess.run(argv, capture_output=True, timeout=timeout, env=env, cwd=self.dir,
                           input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"mta {' '.join(args)} failed {r.returncode}:\n"
                                 f"{r.stdout.decode()}\n{r.stderr.decode()}")
        return r

    def queue_summary(self) -> dict:
        return json.loads(self.cli("queue", "--json").stdout)

    def queue_list(self) -> list[dict]:
        out = self.cli("queue", "list").stdout.decode()
        return [json.loads(x) for x in out.splitlines() if x.strip()]

    def events_raw(self) -> list[dict]:
        """The event log (server.event_log at its default place), every line decoded."""
        path = os.path.join(self.state_dir, "log", "events.jsonl")
        try:
            with open(path, "rb") as f:
                return [json.loads(x) for x in f.read().splitlines() if x.strip()]
        except FileNotFoundError:
            return []

    def events(self) -> list[dict]:
        """The event log's SparkPost-shaped events, each event_id once.

        The events process publishes at least once: after a restart it may write
        again what it wrote since its last checkpoint, with the same event_id
        (a replay, not a second event; :meth:`events_raw` has every line).  A
        replay must be the same event, field for field.
        """
        seen: dict = {}
        for e in self.events_raw():
            old = seen.setdefault(e["event_id"], e)
            assert old == e, ("one event_id, two different events", old, e)
        return list(seen.values())

    def spool_dump(self, bodies: bool = False) -> list[dict]:
        """Read the spool files directly (the daemon should be stopped)."""
        args = ["spool-dump"] + (["--bodies"] if bodies else [])
        out = self.cli(*args).stdout.decode()
        return [json.loads(x) for x in out.splitlines() if x.strip()]

    # ---------------------------------------------------------------- talking

    def connect(self, timeout: float = 10.0, source: str | None = None) -> "Client":
        return Client(HOST, self.port, timeout=timeout, source=source)

    def session(self, helo: str = "client.test", **kw) -> "Client":
        """A raw connection that got the 220 greeting and said EHLO (answered 250)."""
        c = self.connect(**kw)
        assert c.banner[0] == 220, c.banner
        assert c.cmd(f"EHLO {helo}")[0] == 250
        return c

    def send(self, sender: str, rcpts, msg: bytes, mail_options=(), helo: str = "client.test",
             timeout: float = 30.0) -> str:
        """Submit one message with smtplib on a new connection; its queue id from the 250."""
        with smtplib.SMTP(HOST, self.port, local_hostname=helo, timeout=timeout) as s:
            s.ehlo()
            code, text = smtp_transaction(s, sender, rcpts, msg, mail_options)
        assert code == 250, (code, text)
        return queued_id(text.decode())

    @property
    def http_base(self) -> str:
        """Base address of the HTTP injection API, e.g. http://127.0.0.1:PORT."""
        return f"http://{HOST}:{self.http_port}"

    def post(self, body, path: str = "/api/v1/transmissions", headers: dict | None = None,
             timeout: float = 30.0) -> tuple[int, dict, dict | None]:
        """POST *body* (bytes, or an object sent as JSON) to the HTTP API on a new connection.

        Returns (status, response headers with lower-case names, decoded JSON, or None for
        an empty body).  A response body that is not JSON fails the test: the API answers
        every request, errors included, with JSON.
        """
        if not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers=hdrs)
            r = conn.getresponse()
            data = r.read()
            rh = {k.lower(): v for k, v in r.getheaders()}
        finally:
            conn.close()
        if not data:
            return r.status, rh, None
        try:
            return r.status, rh, json.loads(data)
        except ValueError:
            raise AssertionError(f"HTTP {r.status}: the body is not JSON: {data[:500]!r}") from None

    def api(self, method: str, path: str, body=None, key: str | None = None,
            source: str | None = None, timeout: float = 30.0) -> tuple[int, object]:
        """One request to the HTTP API on a new connection: (status, decoded JSON, or the raw
        body when it is empty or not JSON).  *body*: bytes as they are, anything else sent
        as JSON; *key*: the Authorization header; *source*: the client's address."""
        data = body if body is None or isinstance(body, (bytes, bytearray)) \
            else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"}
        if key is not None:
            hdrs["Authorization"] = key
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=timeout,
                                          source_address=(source, 0) if source else None)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            raw = r.read()
        finally:
            conn.close()
        try:
            return r.status, json.loads(raw) if raw else raw
        except ValueError:
            return r.status, raw

    def admin_get(self, path: str = "/metrics", token: str | None = None,
                  timeout: float = 30.0) -> tuple[int, dict, bytes]:
        """GET *path* from the admin listener: (status, headers with lower-case names, body)."""
        hdrs = {"Authorization": f"Bearer {token}"} if token is not None else {}
        conn = http.client.HTTPConnection(HOST, self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path, headers=hdrs)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


    def metrics(self) -> dict:
        """{sample name: value} of /metrics for the samples without labels."""
        from prometheus_client.parser import text_string_to_metric_families
        status, _, body = self.admin_get("/metrics")
        assert status == 200, (status, body[:500])
        return {s.name: s.value for fam in text_string_to_metric_families(body.decode())
                for s in fam.samples if not s.labels}

    def metric(self, name: str, **labels) -> float | None:
        """The value of /metrics' sample *name* with exactly *labels* (None: not there)."""
        from prometheus_client.parser import text_string_to_metric_families
        status, _, body = self.admin_get("/metrics")
        assert status == 200, (status, body[:500])
        for fam in text_string_to_metric_families(body.decode()):
            for s in fam.samples:
                if s.name == name and s.labels == labels:
                    return s.value
        return None


class Client:
    """A raw SMTP client for dialogues that smtplib will not produce."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, source: str | None = None):
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None)
        self.rfile = self.sock.makefile("rb")
        self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        return read_reply(self.rfile)

    def reply_bytes(self) -> bytes:
        """Read one reply, exactly the bytes the server sent."""
        return read_reply_bytes(self.rfile)

    def exchange(self, data: bytes, n: int = 1) -> list[bytes]:
        """Send *data* (may be pipelined commands) and read *n* replies, each exactly."""
        self.send(data)
        return [self.reply_bytes() for _ in range(n)]

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection."""
        self.sock.settimeout(timeout)
        try:
            return self.rfile.read(1) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
