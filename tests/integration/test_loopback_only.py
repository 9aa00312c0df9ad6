"""Without API keys the HTTP API serves loopback clients only; SMTP relays only for relay_networks.

Over real sockets, against the real daemon with its default access settings: a
client on 192.0.2.1 -- an address of the private network namespace's own
loopback interface that is not itself loopback (see loopback_job.py) -- reaches
the daemon on 127.0.0.1 and is refused, with nothing queued; clients on
127.0.0.1 and 127.0.0.9 are served.  Without the namespace, a non-loopback
client would need traffic off loopback, which the tests' network rule forbids.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from dkimtools.verifiers import netns

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loopback_job.py")


def test_no_api_keys_serves_loopback_only_and_relay_needs_relay_networks(tmp_path):
    r = subprocess.run(netns() + [sys.executable, JOB, str(tmp_path / "d")],
                       capture_output=True, timeout=180)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-4000:]
    out = json.loads(r.stdout)
    http, smtp = out["http"], out["smtp"]

    for name in ("loopback", "loopback_other"):
        assert http[name]["status"] == 200, (name, http[name])
        assert http[name]["body"]["results"]["total_accepted_recipients"] == 1

    for name in ("outside", "outside_suppression", "outside_webhooks", "outside_events"):
        assert http[name]["status"] == 403, (name, http[name])
        (err,) = http[name]["body"]["errors"]
        assert err["code"] == "1100", (name, err)
        assert "api_keys" in err["description"], (name, err)

    # Only the two loopback transmissions were queued.
    assert out["queue"]["total"]["messages"] == 2, out["queue"]["total"]

    # SMTP: the default relay_networks (127.0.0.0/8, ::1) let 127.0.0.9 relay; not 192.0.2.1.
    codes = [reply[0] for reply in smtp["loopback"]]
    assert codes == [220, 250, 250, 250, 221], smtp["loopback"]
    banner, ehlo, mail, rcpt, quit_ = smtp["outside"]
    assert (banner[0], ehlo[0], mail[0], quit_[0]) == (220, 250, 250, 221), smtp["outside"]
    assert rcpt == [554, ["5.7.1 Relay access denied"]], smtp["outside"]
    assert "Traceback" not in out["log"]
