"""The HAProxy agent check (admin.agent_listen, mta/admin/agent.py) with the real daemon
and HAProxy 2.6 (Debian): the weight and state the agent gives are the ones HAProxy's
stats socket shows, a drained node gets no new connection through the balancer, and the
port, held by the supervisor, answers across a restart of the admin process."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from daemon import HOST, free_port, wait_until
from test_admin_api import admin_call
from test_proxy_protocol import HAPROXY, haproxy_stat


def ask(port: int, send: bytes = b"", timeout: float = 10.0) -> bytes:
    """What the agent port writes before it closes (HAProxy's agent-send: *send*)."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    try:
        if send:
            s.sendall(send)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out
    finally:
        s.close()


class Other:
    """Another node for the balancer: answers every connection with its own greeting."""

    def __init__(self):
        self.sock = socket.create_server((HOST, free_port()))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self.done = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.done:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            try:
                c.sendall(b"220 other.test ESMTP\r\n")
            except OSError:
                pass
            c.close()

    def close(self):
        self.done = True
        self.thread.join(5)
        self.sock.close()


def greeting(port: int) -> bytes:
    s = socket.create_connection((HOST, port), timeout=10)
    try:
        return s.recv(200)
    finally:
        s.close()


def server_rows(stats_socket: str) -> dict[str, tuple[str, str]]:
    """{server: (status, weight)} of the backend "smtp" from HAProxy's ``show stat``."""
    return {r[1]: (r[17], r[18]) for r in haproxy_stat(stats_socket) if r[0] == "smtp"
            and r[1] not in ("FRONTEND", "BACKEND")}


@pytest.fixture
def balanced(make_daemon, tmp_path):
    """The daemon and another node behind HAProxy (``balance first``: the daemon while it
    takes connections), the daemon's weight and state from its agent."""
    def start(**sections):
        agent = free_port()
        sections.setdefault("admin", {})["agent_listen"] = [f"{HOST}:{agent}"]
        d = make_daemon(acceptors=1, shards=1, **sections)
        other = Other()
        front = free_port()
        stats = str(tmp_path / "haproxy.sock")
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"""
global
    maxconn 200
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
listen smtp
    bind {HOST}:{front}
    balance first
    server m {HOST}:{d.port} weight 100 check inter 1s agent-check agent-port {agent} agent-inter 300ms agent-send "smtp/m\\n"
    server other {HOST}:{other.port} weight 100
""")
        started.append((subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)],
                                         stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL), other))

        def rows():
            try:
                return server_rows(stats)
            except OSError:
                return None
        return d, front, rows, agent
    started = []
    yield start
    for hp, other in started:
        hp.terminate()
        try:
            hp.wait(10)
        except subprocess.TimeoutExpired:
            hp.kill()
            hp.wait()
        other.close()


def test_haproxy_takes_the_agents_state_and_a_drain_sends_new_connections_elsewhere(
        balanced):
    d, front, rows, agent = balanced()
    assert ask(agent) == b"up ready 100%\n"
    wait_until(lambda: (rows() or {}).get("m") == ("UP", "100"), 20, "m UP at weight 100",
               details=rows)
    assert greeting(front).startswith(b"220 mta.test ")
    assert admin_call(d, "POST", "/api/admin/drain")[0] == 200
    assert ask(agent).startswith(b"drain #")
    wait_until(lambda: (rows() or {}).get("m", ("",))[0] == "DRAIN (agent)", 20,
               "m in DRAIN, set by the agent", details=rows)
    for _ in range(3):      # a new connection through the balancer: the other node
        assert greeting(front) == b"220 other.test ESMTP\r\n"
    assert admin_call(d, "DELETE", "/api/admin/drain")[0] == 200
    wait_until(lambda: (rows() or {}).get("m") == ("UP", "100"), 20, "m READY again",
               details=rows)
    assert greeting(front).startswith(b"220 mta.test ")
    assert d.stop() == 0


def test_the_spool_near_min_free_lowers_the_weight_haproxy_gives(balanced, tmp_path):
    # min_free_bytes two thirds of the free space: free is 1.5 times it, between the
    # limit and twice it: about 55%, and nothing refused (the acceptor is above it)
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    d, front, rows, agent = balanced(spool={"min_free_bytes": free * 2 // 3})
    line = ask(agent)
    assert line.startswith(b"up ready ") and line.endswith(b"%\n"), line
    weight = int(line[9:-2])
    assert 30 <= weight <= 80, line

    def lowered():
        got = (rows() or {}).get("m")
        return got if got and got[0] == "UP" and 30 <= int(got[1]) <= 80 else None
    wait_until(lowered, 20, "m UP at a lowered weight", details=rows)
    assert greeting(front).startswith(b"220 mta.test ")
    assert d.stop() == 0


def test_the_agent_port_answers_at_once_and_across_a_restart_of_the_admin_process(
        make_daemon):
    agent = free_port()
    d = make_daemon(acceptors=1, shards=1, admin={"agent_listen": [f"{HOST}:{agent}"]})
    t0 = time.monotonic()
    assert ask(agent, timeout=2) == b"up ready 100%\n"
    assert time.monotonic() - t0 < 1.0
    # an agent-send line is read and the answer is the same
    assert ask(agent, b"smtp/m\n", timeout=2) == b"up ready 100%\n"
    # a peer that sends and sends is cut off: it never gets more than the line
    s = socket.create_connection((HOST, agent), timeout=5)
    try:
        got = b""
        try:
            for _ in range(64):
                s.sendall(b"x" * 1024)
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass
        assert got in (b"", b"up ready 100%\n")
    finally:
        s.close()
    # a peer that sends nothing and never closes is closed within the bound
    s = socket.create_connection((HOST, agent), timeout=10)
    try:
        t0 = time.monotonic()
        assert s.recv(100) == b"up ready 100%\n"
        assert s.recv(100) == b""               # our end closed once the line was written
    finally:
        s.close()
    old = d.children()["admin[0]"]
    os.kill(old, signal.SIGKILL)
    # the supervisor holds the socket: a check meanwhile waits in its backlog and is
    # answered by the new admin process -- which has not heard from the children yet,
    # and does not take that for their being down
    assert ask(agent, timeout=20) == b"up ready 100%\n"
    new = d.wait_restarted("admin[0]", old)
    assert new != old
    for _ in range(10):
        assert ask(agent, timeout=5) == b"up ready 100%\n"
        time.sleep(0.3)
    assert d.stop() == 0


def test_agent_connections_do_not_take_the_admin_listeners_connections(make_daemon):
    # The agent port asks for no token; its connections counted against the admin
    # listener's admin.max_connections, so whoever reaches it could hold them (each one
    # for the agent's TIMEOUT, reconnecting) and the health check, /metrics and the mta
    # commands got "503 too many connections" -- a balancer's httpchk took the node out.
    agent = free_port()
    d = make_daemon(acceptors=1, shards=1,
                    admin={"agent_listen": [f"{HOST}:{agent}"], "max_connections": 2})
    wait_until(lambda: admin_call(d, "GET", "/api/admin/health")[0] == 200, timeout=20)
    held = [socket.create_connection((HOST, agent), timeout=5) for _ in range(2)]
    try:
        for s in held:
            assert s.recv(100) == b"up ready 100%\n"      # (and left open)
        st, _, body = admin_call(d, "GET", "/api/admin/health")
        assert st == 200, body
        # the agent keeps its own bound: one more than it takes gets the line and is closed
        assert ask(agent, timeout=2) == b"up ready 100%\n"
    finally:
        for s in held:
            s.close()
    assert d.stop() == 0
