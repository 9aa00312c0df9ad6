"""Inside a private network namespace: reloads that lower smtp.acceptors while clients connect.

Started by ``test_reload_accept_queue.py`` as ``unshare --net [...] -- python
accept_queue_job.py DIR MIGRATE``.  It brings the namespace's loopback up, sets the
namespace's own ``net.ipv4.tcp_migrate_req`` to MIGRATE (0 or 1: the host's is not
touched), starts the real daemon with two acceptors, and has SMTP and HTTP clients
connect one connection after another while reloads take the acceptors from 2 to 1
and back, twice.  A connection counts as served when it got the greeting (SMTP) or a
whole response (HTTP), as reset when the kernel reset it.  Nothing is asserted here:
the counts and the daemon's log are written as JSON to stdout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from daemon import HOST, Daemon  # noqa: E402

CLIENTS = 6             # threads per protocol, each connecting again as soon as it is done


def smtp(d: Daemon) -> bool:
    with socket.create_connection((HOST, d.port), timeout=20) as s:
        f = s.makefile("rb")
        served = f.readline().startswith(b"220 ")
        s.sendall(b"QUIT\r\n")
        f.readline()
        return served


def http(d: Daemon) -> bool:
    with socket.create_connection((HOST, d.http_port), timeout=20) as s:
        s.sendall(b"GET /api/v1/transmissions HTTP/1.1\r\nHost: mta.test\r\n"
                  b"Connection: close\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got.startswith(b"HTTP/1.1 ") and b"\r\n\r\n" in got


def main(workdir: str, migrate: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
        f.write(migrate)
    d = Daemon(workdir, acceptors=2, shards=1)
    d.start()
    counts = {kind: {"served": 0, "reset": 0, "other": []} for kind in ("smtp", "http")}
    lock = threading.Lock()
    done = threading.Event()

    def client(kind: str, call) -> None:
        while not done.is_set():
            try:
                outcome = "served" if call(d) else "other"
                what = "not a greeting or response"
            except ConnectionResetError:
                outcome = "reset"
            except OSError as exc:
                outcome, what = "other", repr(exc)
            with lock:
                if outcome == "other":
                    counts[kind]["other"].append(what)
                else:
                    counts[kind][outcome] += 1

    threads = [threading.Thread(target=client, args=(kind, call))
               for kind, call in (("smtp", smtp), ("http", http)) for _ in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        for _ in range(2):
            d.reload(smtp={"acceptors": 1})
            time.sleep(0.5)
            d.reload(smtp={"acceptors": 2})
            time.sleep(0.5)
        done.set()
        for t in threads:
            t.join(60)
        result = {"counts": counts, "log": d.log()}
    finally:
        done.set()
        d.cleanup()     # SIGTERM, then kill -9 of its group if it does not stop
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
