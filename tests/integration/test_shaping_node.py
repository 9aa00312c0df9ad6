"""Shaping rules hold node-wide, whichever delivery process has a domain's mail.

A real ``mta serve`` with two delivery processes delivers through the lab (unbound on
loopback, a smart sink on 127.0.0.10 that counts the connections open at once).  The
spool sends a domain's mail to its home process, so a rule's domain may have mail in one
process only, while another process sends other domains' mail to the same MX host.
"""
from __future__ import annotations

import os

from daemon import wait_until
from mxlab import mx
from smartsink import Policy, SmartSink
from test_egress import finish, inject

from mta.queueid import domain_shard


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def _on(process: int, names) -> str:
    return next(n for n in names if domain_shard(n, 2) == process)


def test_a_wildcard_rule_holds_its_sites_connection_limit_in_every_delivery_process(lab):
    """*.x.test: connection_limit 1.  shop.x.test's mail goes to one delivery process,
    other.test's (same MX host) to the other: only the first applied the rule to the site,
    the second sent at [delivery]'s connection_limit -- the slow site saw several
    connections at once.  Now the first shares the domain and the second looks it up."""
    wild = _on(0, (f"shop{i}.x.test" for i in range(200)))
    other = _on(1, (f"other{i}.test" for i in range(200)))
    lab.serve(mx(wild, "mx.shared.test", "127.0.0.10") + mx(other, "mx.shared.test",
                                                             "127.0.0.10"))
    sink = SmartSink("127.0.0.10", lab.port, Policy(reply_delay=0.025)).start()
    lab.sinks.append(sink)
    d = lab.daemon(processes=2, connection_limit=8,
                   sections={"shaping": [{"domain": "*.x.test", "connection_limit": 1}],
                             "backoff": {"enabled": False}})
    finish(inject(d, f"r@{wild}", 2, sessions=1))
    wait_until(lambda: sink.received() >= 2, 30, "the wildcard domain's mail delivered",
               interval=0.1)
    # (the first process shares it within a second or two; the second looks it up: its
    # sites file, rewritten at most every 5 s, then has the domain on the shared site)
    wait_until(lambda: wild in _read(os.path.join(d.state_dir, "run",
                                                  "delivery-1.sites.json")), 30,
               "the shared domain in the second process's sites", interval=0.2)
    finish(inject(d, f"r@{other}", 20), inject(d, f"r@{wild}", 6))
    wait_until(lambda: sink.received() >= 28, 120, "28 messages delivered", interval=0.1)
    assert sink.max_open == 1, sink.max_open
