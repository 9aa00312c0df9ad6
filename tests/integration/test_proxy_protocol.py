"""The real daemon behind HAProxy: the PROXY protocol names the client (server.proxy_protocol_from).

HAProxy 2.6 (Debian) in TCP mode forwards SMTP with ``send-proxy-v2`` on one port and
``send-proxy`` (v1) on another; the test's clients connect to it from 127.0.0.5 and
127.0.0.6, and HAProxy to the daemon from 127.0.0.4, the one address the daemon takes
headers from (BALANCER).  Only 127.0.0.5 may relay (smtp.relay_networks): without the
header every client behind the balancer would be 127.0.0.4, and a balancer on the
node itself would make every client a loopback one.
"""
from __future__ import annotations

import base64
import json
import shutil
import socket
import struct
import subprocess
import time

import pytest

from daemon import HOST, Client, free_port, wait_until
from test_admin_api import admin_call

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"    # scripts/install-test-deps
BALANCER = "127.0.0.4"


def haproxy_config(ports: dict[str, int], target: int) -> str:
    """Frontends for the test's clients: v2 and v1, each also on an IPv6 socket that takes
    IPv4 clients (``bind ipv6@::ffff:...``, as ``bind :::25 v4v6`` does), whose
    addresses HAProxy then sends as IPv4-mapped IPv6 ones (TCP6 ::ffff:127.0.0.5)."""
    out = """
global
    maxconn 200
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
"""
    for name, port in ports.items():
        bind = f"ipv6@::ffff:127.0.0.1:{port}" if name.endswith("mapped") else \
            f"127.0.0.1:{port}"
        send = "send-proxy-v2" if name.startswith("v2") else "send-proxy"
        out += f"""frontend smtp_{name}
    bind {bind}
    default_backend mta_{name}
backend mta_{name}
    server m 127.0.0.1:{target} {send} source {BALANCER}
"""
    return out


@pytest.fixture
def balanced(make_daemon, tmp_path):
    d = make_daemon(acceptors=1, shards=1,
                    server={"proxy_protocol_from": [f"{BALANCER}/32"]},
                    smtp={"relay_networks": ["127.0.0.5/32"]})
    ports = {name: free_port() for name in ("v2", "v1", "v2-mapped", "v1-mapped")}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(ports, d.port))
    hp = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        def listening():
            for port in ports.values():
                try:
                    socket.create_connection((HOST, port), timeout=1).close()
                except OSError:
                    return False
            return True
        wait_until(listening, 20, "haproxy listening")
        yield d, ports
    finally:
        hp.terminate()
        try:
            hp.wait(10)
        except subprocess.TimeoutExpired:
            hp.kill()
            hp.wait()


def transaction(port: int, source: str, rcpt: str) -> tuple[int, list[str]]:
    c = Client(HOST, port, source=source)
    try:
        assert c.banner[0] == 220, c.banner
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
        code, lines = c.cmd(f"RCPT TO:<{rcpt}>")
        if code != 250:
            return code, lines
        assert c.cmd("DATA")[0] == 354
        return c.cmd(b"Subject: behind haproxy\r\n\r\nhello\r\n.")
    finally:
        c.close()


@pytest.mark.parametrize("version", ["v2", "v1", "v2-mapped", "v1-mapped"])
def test_behind_haproxy_the_client_is_the_one_the_header_names(balanced, version):
    # (-mapped: the header names the IPv4 client as ::ffff:127.0.0.5, which went into the
    # Received header and the logs as "IPv6:::ffff:7f00:5": an IPv4 client is named as one)
    d, ports = balanced
    port = ports[version]
    code, lines = transaction(port, "127.0.0.5", f"ok-{version}@example.net")
    assert code == 250, lines
    # 127.0.0.6 is not in relay_networks: through the same balancer it may not relay
    code, lines = transaction(port, "127.0.0.6", f"no-{version}@example.net")
    assert code == 554 and "Relay access denied" in " ".join(lines), lines
    assert d.stop() == 0
    (m,) = [m for m in d.spool_dump(bodies=True) if m["recipients"] == [f"ok-{version}@example.net"]]
    head = base64.b64decode(m["message"]).split(b"\r\n\r\n")[0].decode()
    assert "[127.0.0.5]" in head and f"[{BALANCER}]" not in head, head


def test_a_balancer_that_sends_no_header_is_not_served(make_daemon):
    # a connection from a proxy_protocol_from network without a header gets no greeting
    # (it must not pass as the balancer: here, a loopback client that could relay)
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"]})
    s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0), timeout=10)
    try:
        s.sendall(b"EHLO client.test\r\n")
        assert s.recv(100) == b""           # closed, not a word
    finally:
        s.close()
    d.wait_log("a proxy_protocol_from network: not a PROXY header; closed")
    t_bad = time.monotonic()
    # nothing at all for 5 s: closed as well
    s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0), timeout=15)
    try:
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert 4 <= time.monotonic() - t0 < 12
    finally:
        s.close()
    # a client from elsewhere is served as ever
    c = Client(HOST, d.port, source="127.0.0.3")
    assert c.banner[0] == 220
    c.close()
    # the bad header's connection was closed once: its timer went with it
    time.sleep(max(0.0, 6.0 - (time.monotonic() - t_bad)))
    assert d.log().count("a proxy_protocol_from network:") == 2, d.log()[-2000:]


def test_the_wait_for_the_header_is_the_configured_one(make_daemon):
    # server.proxy_protocol_timeout (Postfix's smtpd_upstream_proxy_timeout): a balancer
    # across a slow link may be given longer, a busy node less; fixed at 5 s before
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"],
                                                   "proxy_protocol_timeout": 1.0})
    s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0), timeout=15)
    try:
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert 0.8 <= time.monotonic() - t0 < 3.5
    finally:
        s.close()
    d.wait_log("a proxy_protocol_from network: no PROXY header in time; closed")
    # a header sent after 1.5 s is still taken when the wait is 3 s
    d.stop()
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"],
                                                   "proxy_protocol_timeout": 3.0})
    s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0), timeout=15)
    try:
        time.sleep(1.5)
        s.sendall(b"PROXY TCP4 127.0.0.5 127.0.0.1 40000 25\r\n")
        assert s.recv(100).startswith(b"220 ")
    finally:
        s.close()


def test_a_v1_address_with_a_zone_is_not_a_client(make_daemon):
    # Python's ip_address takes an IPv6 zone ("fe80::1%eth0") of any characters but "%"
    # and spaces -- a line break too -- and "::1%zone" is in ::1/128 (the default
    # relay_networks).  A balancer names no zone (HAProxy prints addresses without one):
    # a header with one is not a header, closed like any other, so no text of it goes
    # into a Received header or a log line as the client's address.
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"]})
    for src in (b"::1%x\nX-Injected:yes", b"fe80::1%eth0"):
        s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0), timeout=10)
        try:
            s.sendall(b"PROXY TCP6 " + src + b" ::1 40000 25\r\nEHLO client.test\r\n")
            assert s.recv(100) == b"", src      # closed, not a word
        finally:
            s.close()
    d.wait_log("a proxy_protocol_from network: PROXY v1: bad address or port; closed", count=2)
    assert "X-Injected" not in d.log()


def test_ipv6_clients_of_one_network_count_as_one_client(make_daemon):
    # An IPv6 host usually has a /64 of its own: counted per address, one client took
    # every connection slot (max_connections_per_ip was no bound) by using a new address
    # of its network for each.  Clients named by the balancer (the test has no IPv6
    # addresses but ::1 to connect from): per /64 (smtp.ipv6_client_prefix), the same
    # as without one.
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"]},
                    smtp={"max_connections_per_ip": 2})
    held = []

    def greeting(client: bytes) -> bytes:
        s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0), timeout=10)
        held.append(s)
        family, to = (b"TCP6", b"::1") if b":" in client else (b"TCP4", b"127.0.0.1")
        s.sendall(b"PROXY " + family + b" " + client + b" " + to + b" 40000 25\r\n")
        return s.makefile("rb").readline()

    try:
        assert greeting(b"2001:db8:0:1::1").startswith(b"220 ")
        assert greeting(b"2001:db8:0:1::2").startswith(b"220 ")
        assert greeting(b"2001:db8:0:1:ffff:ffff:ffff:3") == \
            b"421 4.7.0 Too many connections from your address, try again later\r\n"
        assert greeting(b"2001:db8:0:2::1").startswith(b"220 ")    # another /64
        assert greeting(b"192.0.2.1").startswith(b"220 ")          # IPv4: per address
        assert greeting(b"192.0.2.2").startswith(b"220 ")
        assert greeting(b"192.0.2.3").startswith(b"220 ")
    finally:
        for s in held:
            s.close()


def test_a_connection_waiting_for_its_header_survives_a_reload(make_daemon):
    # The old acceptor's drain did not count it (not a session yet): it saw itself idle
    # and exited under the connection, whose client got a broken pipe
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"]})
    s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0), timeout=10)
    try:
        time.sleep(0.3)
        d.reload(smtp={"banner": "changed"})
        s.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 "), "the greeting, from the acceptor it began with"
        s.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221")
    finally:
        s.close()


def test_the_http_api_takes_the_client_from_the_header(make_daemon):
    # Without api_keys the API serves loopback clients only: behind a balancer on the
    # node every client would be one.  The test is the balancer here (BALANCER) and names
    # a client elsewhere (TEST-NET-1: an address in a header, no packet goes there).
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"]})
    body = json.dumps({"recipients": ["x@example.net"],
                       "content": {"from": "a@sender.test", "subject": "s", "text": "t"}})
    request = (f"POST /api/v1/transmissions HTTP/1.1\r\nHost: x\r\nContent-Type: "
               f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
               f"{body}").encode()

    def answer(header: bytes) -> bytes:
        s = socket.create_connection((HOST, d.http_port), source_address=(BALANCER, 0),
                                     timeout=10)
        try:
            s.sendall(header + request)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out
        finally:
            s.close()
    far = answer(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 8025\r\n")
    assert far.split(b"\r\n")[0].split()[1] in (b"401", b"403"), far[:200]
    near = answer(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 8025\r\n")
    assert near.startswith(b"HTTP/1.1 200"), near[:300]


def test_a_header_that_names_no_client_gives_no_rights(make_daemon):
    # PROXY UNKNOWN (v1) or LOCAL (v2): a client the balancer cannot name, or its own
    # check.  Served, but not as the balancer's address -- which on the node would be a
    # loopback client allowed to relay (the default relay_networks)
    d = make_daemon(acceptors=1, shards=1,
                    server={"proxy_protocol_from": [f"{BALANCER}/32"]},
                    smtp={"relay_networks": ["127.0.0.0/8"]})
    for header in (b"PROXY UNKNOWN\r\n",
                   b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"):
        s = socket.create_connection((HOST, d.port), source_address=(BALANCER, 0),
                                     timeout=10)
        try:
            s.sendall(header)
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 ")
            s.sendall(b"EHLO check.test\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"MAIL FROM:<a@sender.test>\r\n")
            assert f.readline().startswith(b"250")
            s.sendall(b"RCPT TO:<b@example.net>\r\n")
            reply = f.readline()
            assert reply.startswith(b"554") and b"Relay access denied" in reply, reply
        finally:
            s.close()


V2_HEADER = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([127, 0, 0, 9, 127, 0, 0, 1])
             + struct.pack("!HH", 40000, 25))


@pytest.mark.parametrize("header", [b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 25\r\n", V2_HEADER],
                         ids=["v1", "v2"])
def test_a_header_from_a_balancer_not_listed_is_refused_and_logged(make_daemon, header):
    # A second balancer the operator has not listed in proxy_protocol_from (or a client
    # naming itself someone else): its header was an unknown command (500) and the
    # session went on as the balancer's address -- on the node a loopback client that
    # may relay (the default relay_networks) -- with nothing in the log.  Now the
    # connection is closed after a 421, and the log says why.
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"]})
    s = socket.create_connection((HOST, d.port), source_address=("127.0.0.7", 0), timeout=10)
    try:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(header + b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\n"
                  b"RCPT TO:<b@example.net>\r\n")
        assert f.readline() == (b"421 4.7.0 A PROXY protocol header is not accepted from "
                                b"your address, closing connection\r\n")
        assert f.readline() == b""
    finally:
        s.close()
    d.wait_log("connection from 127.0.0.7: a PROXY protocol header, from an address not in "
               "server.proxy_protocol_from; closed")
    s = socket.create_connection((HOST, d.http_port), source_address=("127.0.0.7", 0),
                                 timeout=10)
    try:
        s.sendall(header + b"GET /api/v1/transmissions HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    finally:
        s.close()
    assert out.startswith(b"HTTP/1.1 400 ") and b"PROXY protocol header" in out, out
    d.wait_log("HTTP connection from 127.0.0.7: a PROXY protocol header, from an address "
               "not in server.proxy_protocol_from; closed")
    assert d.stop() == 0 and d.spool_dump() == []


def haproxy_stat(stats_socket: str) -> list[list[str]]:
    """The rows of HAProxy's ``show stat`` (CSV fields: 0 proxy, 1 server, 17 status,
    18 weight), from its stats socket."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.settimeout(5)
        s.connect(stats_socket)
        s.sendall(b"show stat\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    finally:
        s.close()
    return [line.split(",") for line in out.decode().splitlines()
            if line and not line.startswith("#")]


def haproxy_states(stats_socket: str) -> dict[str, str]:
    """{backend: the status of its one server (UP, DOWN, ...)} from HAProxy's stats socket."""
    return {r[0]: r[17] for r in haproxy_stat(stats_socket) if r[1] == "m"}


def test_haproxy_checks_take_a_draining_node_out_and_its_session_finishes(make_daemon,
                                                                         tmp_path):
    # HAProxy's own checks, sent through the PROXY protocol as LOCAL (v2): `option smtpchk`
    # on the SMTP port reads the drain's 421 at the greeting, `option httpchk` the admin
    # listener's 503 (README).  Either takes the node out -- new connections are not sent
    # to it -- while a message already in DATA through the balancer is taken (250).
    d = make_daemon(acceptors=1, shards=1, server={"proxy_protocol_from": [f"{BALANCER}/32"]})
    smtp_port, http_port = free_port(), free_port()
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
    timeout check 2s
listen smtpchk
    bind 127.0.0.1:{smtp_port}
    option smtpchk EHLO lb.test
    server m 127.0.0.1:{d.port} send-proxy-v2 source {BALANCER} check inter 300 fall 2 rise 1
listen httpchk
    bind 127.0.0.1:{http_port}
    option httpchk
    http-check send meth GET uri /api/admin/health
    server m 127.0.0.1:{d.port} send-proxy-v2 source {BALANCER} check port {d.admin_port} inter 300 fall 2 rise 1
""")
    hp = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        def states(want: str):
            try:
                got = haproxy_states(stats)
            except OSError:
                return None
            return got if got and set(got.values()) == {want} else None
        wait_until(lambda: states("UP"), 20, "both checks passing")
        c = Client(HOST, smtp_port, source="127.0.0.5")
        try:
            assert c.banner[0] == 220
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.cmd("MAIL FROM:<a@sender.test>")[0] == 250
            assert c.cmd("RCPT TO:<in-flight@example.net>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            assert admin_call(d, "POST", "/api/admin/drain")[0] == 200
            wait_until(lambda: states("DOWN"), 20, "both checks failing")
            code, lines = c.cmd(b"Subject: in flight\r\n\r\nhello\r\n.")
            assert code == 250, lines
        finally:
            c.close()
        for port in (smtp_port, http_port):     # no server left: HAProxy closes at once
            s = socket.create_connection((HOST, port), source_address=("127.0.0.5", 0),
                                         timeout=10)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
            finally:
                s.close()
        assert admin_call(d, "DELETE", "/api/admin/drain")[0] == 200
        wait_until(lambda: states("UP"), 20, "both checks passing after the cancel")
        code, _ = transaction(smtp_port, "127.0.0.5", "after@example.net")
        assert code == 250
    finally:
        hp.terminate()
        try:
            hp.wait(10)
        except subprocess.TimeoutExpired:
            hp.kill()
            hp.wait()
    assert d.stop() == 0
    assert sorted(r for m in d.spool_dump() for r in m["recipients"]) == [
        "after@example.net", "in-flight@example.net"]
