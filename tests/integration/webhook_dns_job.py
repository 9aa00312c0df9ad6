"""Inside a private network and mount namespace: the real daemon pushing webhooks to targets
named in the DNS, some of whose names never get an answer.

Started by ``test_webhooks.py`` as ``unshare --net --mount -- python webhook_dns_job.py DIR``.
Two DNS servers on the namespace's loopback give the same answers: the node's own
(``[delivery] nameservers``, 127.0.0.1 on a free port) and a stand-in for the machine's
resolver (127.0.0.2 port 53, named by an /etc/resolv.conf bind-mounted over the real
one for this namespace only, glibc's default timeout:5 attempts:2).  So nothing can
reach a real resolver, and a lookup that goes through getaddrinfo is seen (and stalls
as it would on a real machine).  ``good.hooks.test`` is 127.0.0.1 (the receiver);
``silent-N.hooks.test`` get no answer at all.

Five webhooks on silent names are given events first (their name lookups under way),
then the good webhook's event is stored, and the seconds until its batch reached the
receiver are measured.  Nothing is asserted here: the result is JSON on stdout.
"""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "webhooks"))

from daemon import Daemon, free_port  # noqa: E402
from receiver import Receiver  # noqa: E402

from mta.feedback.events_store import EventStore  # noqa: E402

SYSTEM_DNS = "127.0.0.2"      # the stand-in for the machine's resolver (port 53)
NODE_DNS = "127.0.0.1"        # [delivery] nameservers (a free port)
SILENT = 5                    # webhooks whose target names never get an answer
GOOD_WAIT = 15.0              # seconds the good webhook's batch is waited for
SILENT_HEAD_START = 1.0       # seconds the silent webhooks' lookups run before the good one


class Dns:
    """A UDP DNS server in a thread: good.hooks.test A 127.0.0.1 (AAAA: none), the
    silent-* names no answer, every other name NXDOMAIN; records each query."""

    def __init__(self, address: str, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.port = self.sock.getsockname()[1]
        self.queries: list[list[str]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopped.is_set():
            if not select.select([self.sock], [], [], 0.1)[0]:
                continue
            wire, peer = self.sock.recvfrom(4096)
            try:
                q = dns.message.from_wire(wire)
            except Exception:
                continue
            name = q.question[0].name.to_text(omit_final_dot=True).lower()
            rdtype = q.question[0].rdtype
            self.queries.append([name, dns.rdatatype.to_text(rdtype)])
            if name.startswith("silent-"):
                continue
            r = dns.message.make_response(q)
            r.flags |= dns.flags.AA
            if name == "good.hooks.test":
                if rdtype == dns.rdatatype.A:
                    r.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A",
                                                        "127.0.0.1"))
            else:
                r.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(r.to_wire(), peer)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


def _events(kind: str, n: int, start: int) -> list[dict]:
    now = str(int(time.time()))
    return [{"type": kind, "event_id": str(700_000 + i), "timestamp": now,
             "message_id": "%020x" % i, "rcpt_to": f"r{i}@example.com", "bounce_class": None}
            for i in range(start, start + n)]


def main(workdir: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.makedirs(workdir, exist_ok=True)
    resolv = os.path.join(workdir, "resolv.conf")
    with open(resolv, "w") as f:
        f.write(f"nameserver {SYSTEM_DNS}\noptions timeout:5 attempts:2\n")
    subprocess.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)
    system = Dns(SYSTEM_DNS, 53)
    node = Dns(NODE_DNS, free_port(NODE_DNS, udp=True))
    rec = Receiver()
    port = rec.url.rsplit(":", 1)[1].split("/")[0]
    hooks = [{"name": f"silent-{i}", "target": f"http://silent-{i}.hooks.test:{port}/",
              "events": ["delivery"]} for i in range(SILENT)]
    hooks.append({"name": "good", "target": f"http://good.hooks.test:{port}/hook",
                  "events": ["injection"]})
    d = Daemon(os.path.join(workdir, "d"), acceptors=1, shards=1,
               delivery={"nameservers": [f"{NODE_DNS}:{node.port}"], "dns_timeout": 1.0},
               webhooks={"time_scale": 0.01, "retry_schedule": [100.0, 100.0],
                         "poll_interval": 0.1, "timeout": 10.0},
               webhook=hooks)
    result: dict = {}
    d.start()
    store = EventStore(os.path.join(d.state_dir, "events"), map_size=64 << 20,
                       retention=86400)
    try:
        d.wait_log(r"webhooks", timeout=30)
        time.sleep(1.0)     # the webhooks process has read the store's newest event
        store.append(_events("delivery", SILENT, 0))
        store.sync()
        time.sleep(SILENT_HEAD_START)
        store.append(_events("injection", 1, 100))
        store.sync()
        t0 = time.monotonic()
        elapsed = None
        while time.monotonic() - t0 < GOOD_WAIT:
            if any(h.path == "/hook" for h in rec.hits):
                elapsed = time.monotonic() - t0
                break
            time.sleep(0.02)
        time.sleep(1.5)     # the silent webhooks' lookups fail and are logged
        result = {"good_seconds": elapsed,
                  "good_hits": [h.json for h in rec.hits if h.path == "/hook"],
                  "other_hits": [h.path for h in rec.hits if h.path != "/hook"],
                  "system_queries": list(system.queries),
                  "node_queries": list(node.queries),
                  "log": d.log()}
    finally:
        d.cleanup()
        store.close()
        rec.close()
        node.close()
        system.close()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
