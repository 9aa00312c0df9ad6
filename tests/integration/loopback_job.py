"""Inside a private network namespace: the real daemon, asked by loopback and non-loopback clients.

Started by ``test_loopback_only.py`` as ``unshare --net [...] -- python loopback_job.py DIR``.
The namespace has only its own loopback interface, brought up here, with one more
address on it: 192.0.2.1 (TEST-NET-1).  A client bound to that address connects to
the daemon on 127.0.0.1 -- the packets go to a loopback address and never leave
the namespace -- yet the daemon sees a peer that is *not* loopback, which is what
the HTTP API's rule "no API keys: loopback clients only" and the SMTP relay check
decide on.  Nothing is asserted here: every answer is written as JSON to stdout
and the test asserts on it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from daemon import HOST, Daemon, read_reply  # noqa: E402

OUTSIDE = "192.0.2.1"       # on this namespace's lo, but not a loopback address
INSIDE = "127.0.0.9"        # a loopback address other than the listener's


def request(d: Daemon, method: str, path: str, source: str, body=None) -> dict:
    status, parsed = d.api(method, path, body, source=source)
    if isinstance(parsed, bytes):
        parsed = {"not json": parsed.decode(errors="replace")} if parsed else None
    return {"status": status, "body": parsed}


def smtp_relay(d: Daemon, source: str) -> list:
    """MAIL and RCPT to a domain the daemon would relay to; the replies' codes and texts."""
    s = socket.create_connection((HOST, d.port), timeout=30, source_address=(source, 0))
    f = s.makefile("rb")
    try:
        out = [read_reply(f)]
        for line in (b"EHLO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<b@remote.test>",
                     b"QUIT"):
            s.sendall(line + b"\r\n")
            out.append(read_reply(f))
        return out
    finally:
        f.close()
        s.close()


def main(workdir: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{OUTSIDE}/32", "dev", "lo"], check=True)
    tx = {"recipients": [{"address": "rcpt@remote.test"}],
          "content": {"from": "sender@client.test", "subject": "s", "text": "t"}}
    d = Daemon(workdir, acceptors=1, shards=1)    # no [http] api_keys: the defaults
    d.start()
    try:
        result = {
            "http": {
                "loopback": request(d, "POST", "/api/v1/transmissions", HOST, tx),
                "loopback_other": request(d, "POST", "/api/v1/transmissions", INSIDE, tx),
                "outside": request(d, "POST", "/api/v1/transmissions", OUTSIDE, tx),
                "outside_suppression": request(d, "GET", "/api/v1/suppression-list", OUTSIDE),
                "outside_webhooks": request(d, "GET", "/api/v1/webhooks", OUTSIDE),
                "outside_events": request(d, "GET", "/api/v1/events/message", OUTSIDE),
            },
            "smtp": {"loopback": smtp_relay(d, INSIDE), "outside": smtp_relay(d, OUTSIDE)},
            "queue": d.queue_summary(),
            "log": d.log(),
        }
    finally:
        d.cleanup()     # SIGTERM, then kill -9 of its group if it does not stop
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
