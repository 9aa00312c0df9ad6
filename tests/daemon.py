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
import re
import signal
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def render_config(sections: dict) -> str:
    """TOML for {section: {key: value}}; a list of dicts becomes [[section.key]] tables."""
    out = []
    for name, keys in sections.items():
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


def read_reply(sock_file) -> tuple[int, list[str]]:
    """Read one (possibly multi-line) SMTP reply from a socket makefile('rb')."""
    lines = []
    while True:
        line = sock_file.readline()
        if not line:
            raise ConnectionError("connection closed")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text[4:])
        if len(text) < 4 or text[3] != "-":
            return int(text[:3]), lines


class Daemon:
    """One ``mta serve`` under test."""

    def __init__(self, tmp_path, acceptors: int = 2, shards: int = 2, **sections):
        self.dir = str(tmp_path)
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        self.http_port = free_port()
        self.state_dir = os.path.join(self.dir, "state")
        self.config_path = os.path.join(self.dir, "mta.toml")
        self.log_path = os.path.join(self.dir, "mta.log")
        self.sections = {
            "server": {"state_dir": self.state_dir, "hostname": "mta.test",
                       "shutdown_timeout": 5.0, "restart_backoff_max": 2.0},
            "smtp": {"listen": [f"{HOST}:{self.port}"], "acceptors": acceptors},
            "http": {"listen": [f"{HOST}:{self.http_port}"]},
            "spool": {"shards": shards, "min_free_bytes": 0},
            # Acceptance tests keep mail queued; delivery tests turn this off and
            # point the resolver at their own DNS server on loopback.
            "delivery": {"hold": True, "processes": 1},
        }
        for name, keys in sections.items():
            self.sections.setdefault(name, {}).update(keys)
        self.write_config()
        self.proc: subprocess.Popen | None = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")

    def write_config(self, text: str | None = None) -> None:
        with open(self.config_path, "w") as fh:
            fh.write(text if text is not None else render_config(self.sections))

    # ------------------------------------------------------------- lifecycle

    def start(self, wait: bool = True, env: dict | None = None) -> "Daemon":
        logf = open(self.log_path, "ab")
        self.log_mark = logf.tell()   # where this run's log starts (restarts append)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mta", "serve", "-c", self.config_path],
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
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
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

    def children(self) -> dict[str, int]:
        """Map process title ('spool[0]', 'acceptor[1]') to PID for the live children."""
        out = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    stat = fh.read()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != self.proc.pid:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    title = fh.read().split(b"\0")[0].decode()
            except (OSError, ValueError, IndexError):
                continue
            if title.startswith("mta: "):
                out[title[5:].strip()] = int(pid)
        return out

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

    def spool_dump(self, bodies: bool = False) -> list[dict]:
        """Read the spool files directly (the daemon should be stopped)."""
        args = ["spool-dump"] + (["--bodies"] if bodies else [])
        out = self.cli(*args).stdout.decode()
        return [json.loads(x) for x in out.splitlines() if x.strip()]

    # ---------------------------------------------------------------- talking

    def connect(self, timeout: float = 10.0, source: str | None = None) -> "Client":
        return Client(HOST, self.port, timeout=timeout, source=source)

    @property
    def http_base(self) -> str:
        """Base address of the HTTP injection API, e.g. http://127.0.0.1:PORT."""
        return f"http://{HOST}:{self.http_port}"

    def post(self, body, path: str = "/api/v1/transmissions", headers: dict | None = None,
             timeout: float = 30.0) -> tuple[int, dict, dict | None]:
        """POST *body* (bytes, or an object sent as JSON) to the HTTP API on a new connection.

        Returns (status, response headers with lower-case names, decoded JSON or None).
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
        try:
            return r.status, rh, json.loads(data) if data else None
        except ValueError:
            return r.status, rh, None


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
