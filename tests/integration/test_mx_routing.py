"""How delivery finds the receiving servers (RFC 5321 §5.1), end to end.

Each test starts a lab (tests/integration/mxlab.py): unbound on loopback serving
the test zones, receivers on 127.0.0.x, and ``mta serve`` resolving only through
that unbound.  What is checked is what a sender and a receiver see: which
server got the mail, and the DSN a bounce sends back.
"""
from __future__ import annotations

import time

from daemon import wait_until
from mxlab import IPS, mx

IP_A, IP_B, IP_C, IP_D, IP_E, IP_F = IPS


def message(subject: str) -> bytes:
    mid = f"<{subject.replace(' ', '-')}.{time.monotonic_ns()}@client.test>"
    return (f"From: Alice <alice@sender.test>\r\nTo: someone\r\nSubject: {subject}\r\n"
            f"Message-ID: {mid}\r\n\r\nhello\r\n").encode()


def wait_queue_empty(d, timeout=20.0):
    wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, timeout, "the queue to empty",
               interval=0.2)


def test_equal_preference_mx_hosts_share_the_connections(lab):
    """Two MX hosts of one preference: each new connection picks one of them at random
    (RFC 5321 §5.1), not the first of one shuffled list for as long as the site is known."""
    a, b = lab.aio(IP_A), lab.aio(IP_B)
    lab.serve(mx("pair.test", "mx1.pair.test", IP_A, 10)
              + mx("pair.test", "mx2.pair.test", IP_B, 10))
    # one message a connection: every message opens its own
    d = lab.daemon(max_deliveries_per_connection=1)
    n = 24
    for i in range(n):
        d.send("alice@sender.test", [f"r{i}@pair.test"], message(f"pair {i}"))
    wait_until(lambda: a.received() + b.received() == n, 30, "every message delivered")
    wait_queue_empty(d)
    # 2 * 2**-24 chance of a false failure
    assert a.received() > 0 and b.received() > 0, (a.received(), b.received())
