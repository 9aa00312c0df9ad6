"""Several nodes without a shared store: ``[cluster] nodes = N`` makes each node keep to
1/N of the shaping limits (DESIGN.md, "Beyond one node").

A real ``mta serve`` delivers through the lab (unbound on loopback, smart sinks on
127.0.0.10/.11, which count the connections open at once and time every message they
take).  One site is slow (its connections stay busy, so the node opens as many as it
may): with ``connection_limit = 4`` and ``nodes = 2`` it must never see more than 2.
Another takes ``max_message_rate = "20/s"``: the node sends it 10 a second.
"""
from __future__ import annotations

from daemon import wait_until
from mxlab import mx
from smartsink import Policy, SmartSink, rate_per_window
from test_egress import finish, inject

SLOW, RATED = "slow.test", "rated.test"
SHAPING = [{"mx": "*.slow.test", "connection_limit": 4},
           {"mx": "*.rated.test", "connection_limit": 4, "max_message_rate": "20/s"}]


def smart(lab, ip, default=None) -> SmartSink:
    s = SmartSink(ip, lab.port, default).start()
    lab.sinks.append(s)
    return s


def lanes(d) -> dict:
    q = d.queue_summary()["delivery"]
    return q["nodes"], {ln["site"]: ln for ln in q["lanes"]}


def test_two_nodes_each_keep_to_half_the_connections_and_the_rate(lab):
    lab.serve(mx(SLOW, "mx.slow.test", "127.0.0.10") + mx(RATED, "mx.rated.test", "127.0.0.11"))
    slow = smart(lab, "127.0.0.10", Policy(reply_delay=0.05))   # ~0.2 s a message
    rated = smart(lab, "127.0.0.11")
    d = lab.daemon(processes=2, sections={"cluster": {"nodes": 2}, "shaping": SHAPING,
                                          "backoff": {"enabled": False}})
    d.wait_log(r"shaping limits are this node's share: 1/2 \(\[cluster\] nodes = 2\)")
    finish(inject(d, f"s@{SLOW}", 60), inject(d, f"r@{RATED}", 60))
    wait_until(lambda: slow.received() >= 60 and rated.received() >= 60, 90,
               "120 messages delivered", interval=0.1)
    # Connections, strictly: the share of 4 is 2 -- and the node does use both.
    assert slow.max_open == 2, slow.max_open
    assert rated.max_open <= 2, rated.max_open
    # The rate, from the sink's arrivals: 10/s (GCRA, burst 1: at most 11 admitted in
    # any second; one more for the time a message takes from admission to the sink).
    times = sorted(a.at for a in rated.deliveries())
    overall = (len(times) - 1) / (times[-1] - times[0])
    assert 7.0 <= overall <= 11.0, overall          # not 20/s, and not far below 10/s
    assert max(rate_per_window(rated.deliveries(), 1.0).values()) <= 12
    # What the operator sees: the limits in effect are the share.
    nodes, by_site = wait_until(lambda: (lambda x: x if x[1] else None)(lanes(d)), 10,
                                "lanes in mta queue")
    assert nodes == 2
    assert by_site["mx.slow.test"]["connection_limit"] == 2
    assert by_site["mx.rated.test"]["connection_limit"] == 2
    assert by_site["mx.rated.test"]["max_message_rate"] == 10.0
    text = d.cli("queue").stdout.decode()
    assert "shaping limits are this node's share: 1/2" in text, text
    assert "CONN LIMIT" in text and "RATE LIMIT/S" in text, text


def test_a_reload_changes_the_nodes_share(lab):
    """nodes = 2: at most 2 connections to the slow site; a reload to nodes = 1 gives the
    node the whole limit (it opens more than 2), and the log says so."""
    lab.serve(mx(SLOW, "mx.slow.test", "127.0.0.10"))
    slow = smart(lab, "127.0.0.10", Policy(reply_delay=0.05))
    d = lab.daemon(sections={"cluster": {"nodes": 2}, "shaping": SHAPING[:1],
                             "backoff": {"enabled": False}})
    finish(inject(d, f"a@{SLOW}", 40))
    wait_until(lambda: slow.received() >= 40, 60, "40 delivered", interval=0.1)
    assert slow.max_open == 2, slow.max_open
    log = d.reload(cluster={"nodes": 1})
    assert "shaping limits are this node's alone ([cluster] nodes = 1)" in log
    assert "replacing the delivery process(es)" in log
    slow.reset_max_open()
    finish(inject(d, f"b@{SLOW}", 60))
    wait_until(lambda: slow.received() >= 100, 60, "60 more delivered", interval=0.1)
    assert 3 <= slow.max_open <= 4, slow.max_open
    nodes, by_site = lanes(d)
    assert nodes == 1 and by_site["mx.slow.test"]["connection_limit"] == 4
