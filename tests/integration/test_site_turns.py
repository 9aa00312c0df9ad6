"""A site whose ``connection_limit`` is below the number of delivery processes: the
processes that have mail for it take turns on its connections.

A real ``mta serve`` with two delivery processes delivers through the lab (unbound on
loopback, a smart sink on 127.0.0.10 that counts the connections open at once and times
every message).  Two recipient domains whose home delivery processes differ share one
MX host, limited to one connection by a ``[[shaping]]`` rule.  Each process's fair
share rounded up to that one connection, so the process that had it kept it while its
domain had mail: the other domain's mail waited for it to drain (or for the hand-back
to the spool, max_wait, and again).  Now the holder gives the slot up after
``slot_turn`` while the other process waits holding none.
"""
from __future__ import annotations

from daemon import wait_until
from mxlab import mx
from smartsink import Policy, SmartSink
from test_egress import finish, inject, on_two_processes

SHAPING = [{"mx": "mx.shared.test", "connection_limit": 1}]


def test_two_processes_take_turns_on_a_site_limited_to_one_connection(lab):
    a, b = on_two_processes([f"turn{i}.test" for i in range(100)])
    lab.serve(mx(a, "mx.shared.test", "127.0.0.10") + mx(b, "mx.shared.test", "127.0.0.10"))
    sink = SmartSink("127.0.0.10", lab.port, Policy(reply_delay=0.025)).start()  # ~0.1 s each
    lab.sinks.append(sink)
    d = lab.daemon(processes=2, slot_turn=1.0, idle_timeout=30.0,
                   sections={"shaping": SHAPING, "backoff": {"enabled": False}})
    n = 30
    first = inject(d, f"x@{a}", n)
    wait_until(lambda: sink.received() >= 3, 30, f"{a}'s mail arriving", interval=0.05)
    second = inject(d, f"y@{b}", n)
    finish(first, second)
    wait_until(lambda: sink.received() >= 2 * n, 90, f"{2 * n} messages delivered",
               interval=0.1)

    def times(dom):
        return sorted(m.at for m in sink.deliveries() if m.rcpts[0].endswith("@" + dom))
    ta, tb = times(a), times(b)
    assert len(ta) == n and len(tb) == n, (len(ta), len(tb))
    assert sink.max_open == 1, sink.max_open      # the limit holds node-wide, always
    # b's mail went out while a's was still flowing, not after it drained: the first of
    # b's came before the middle of a's, and a's went on after b's first
    assert tb[0] < ta[n // 2], (tb[0] - ta[0], ta[n // 2] - ta[0])
    assert ta[-1] > tb[0] + 1.0, (ta[-1] - tb[0])
    # nothing was handed back or deferred for waiting: every message was delivered once
    kinds = {e["type"] for e in d.events()}
    assert kinds == {"injection", "delivery"}, kinds
