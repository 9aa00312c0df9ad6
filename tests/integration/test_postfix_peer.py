"""Postfix's own smtpd as the receiving MTA: what our client sends, a real MTA takes.

A private Postfix instance (main.cf and master.cf written here, its own queue
directory, an smtpd on 127.0.0.1, nothing that delivers anywhere) keeps every
message it accepts in its hold queue.  ``smtpd_forbid_unauth_pipelining = yes``
makes it strict about RFC 2920: a client that pipelines where it may not is
disconnected with "554 5.5.0 Error: SMTP protocol synchronization".  The daemon
routes the test domain to it over one connection, so each message's envelope goes
out behind the previous message's final dot (``delivery.pipeline_transactions``).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from daemon import HOST, free_port, queued_id, smtp_transaction, wait_until
from mxlab import IPS, mx
from test_delivery import check_events, message, wait_queue_empty

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"


class PostfixReceiver:
    """A private Postfix that accepts mail for anything from 127.0.0.0/8 and holds it."""

    def __init__(self, root: Path):
        self.root = root
        self.etc = root / "etc"
        self.queue = root / "queue"
        self.port = free_port()
        self.pid = None

    def start(self) -> "PostfixReceiver":
        self.etc.mkdir(parents=True)
        self.queue.mkdir()
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.root / "data",
            "maillog_file": self.root / "maillog",
            "maillog_file_prefixes": self.root,
            "myhostname": "postfix.peer.test",
            "mydestination": "",
            "local_recipient_maps": "",
            "relay_domains": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
            "smtpd_client_restrictions": "check_client_access static:HOLD",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_forbid_unauth_pipelining": "yes",
            "default_transport": "discard:never delivers",
            "relay_transport": "discard:never delivers",
            "biff": "no",
        }
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in cf.items()))
        (self.etc / "master.cf").write_text("\n".join([
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            "pickup     unix  n - n 60 1 pickup",
            "cleanup    unix  n - n - 0 cleanup",
            "qmgr       unix  n - n 300 1 qmgr",
            "rewrite    unix  - - n - - trivial-rewrite",
            "bounce     unix  - - n - 0 bounce",
            "defer      unix  - - n - 0 bounce",
            "trace      unix  - - n - 0 bounce",
            "proxymap   unix  - - n - - proxymap",
            "showq      unix  n - n - - showq",
            "error      unix  - - n - - error",
            "discard    unix  - - n - - discard",
            "anvil      unix  - - n - 1 anvil",
            "scache     unix  - - n - 1 scache",
            "postlog    unix-dgram n - n - 1 postlogd",
            ""]))
        self._postfix("start")
        self.pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        wait_until(self._answers, 20, "postfix smtpd answering")
        return self

    def _answers(self) -> bool:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as s:
                return s.noop()[0] == 250
        except OSError:
            return False

    def _postfix(self, *cmd: str) -> None:
        r = subprocess.run([POSTFIX, "-c", str(self.etc), *cmd], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr, self.log()[-2000:])

    def held(self) -> list[dict]:
        """The hold queue: postqueue's JSON lines, one per message."""
        r = subprocess.run([POSTQUEUE, "-c", str(self.etc), "-j"], capture_output=True,
                           text=True, timeout=30, check=True)
        return [m for m in map(json.loads, r.stdout.splitlines()) if m["queue_name"] == "hold"]

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.pid is None:
            return
        try:
            self._postfix("stop")
        except AssertionError:
            pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None


@pytest.fixture
def postfix():
    if os.geteuid() != 0:
        pytest.fail("a private Postfix instance needs root (its daemons drop to 'postfix')")
    # not under pytest's tmp_path: its directories are 0700, and Postfix's daemons run as
    # the 'postfix' user, which must reach the queue and data directories
    root = tempfile.mkdtemp(prefix="postfix-peer-")
    os.chmod(root, 0o755)
    p = PostfixReceiver(Path(root))
    try:
        yield p.start()
    finally:
        p.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_postfix_takes_each_next_envelope_behind_the_final_dot(lab, postfix):
    lab.serve(mx("sender.test", "mx.sender.test", IPS[1]))
    # Queued first (held), then delivered from a restart: the lane has the whole queue,
    # so each message has a next one to send ahead.
    d = lab.daemon(connection_limit=1, idle_timeout=30.0, hold=True,
                   route=[{"domain": "pf.test", "hosts": [f"127.0.0.1:{postfix.port}"]}])
    n = 60
    sent = {}
    with smtplib.SMTP(HOST, d.port, timeout=30) as s:
        s.ehlo("client.test")
        for i in range(n):
            rcpts = [f"u{i}@pf.test"] + ([f"v{i}@pf.test"] if i % 3 == 0 else [])
            code, text = smtp_transaction(s, "alice@sender.test", rcpts,
                                          message(f"to postfix {i}"))
            assert code == 250, (code, text)
            sent[queued_id(text.decode())] = rcpts
    assert d.stop() == 0
    d.sections["delivery"]["hold"] = False
    d.write_config()
    d.start()
    wait_until(lambda: len(postfix.held()) == n, 60, "every message in Postfix's hold queue")
    wait_queue_empty(d)
    held = postfix.held()
    got = sorted(r["address"] for m in held for r in m["recipients"])
    assert got == sorted(r for rcpts in sent.values() for r in rcpts)
    assert {m["sender"] for m in held} == {"alice@sender.test"}
    check_events(d, {(qid, r): "delivery" for qid, rcpts in sent.items() for r in rcpts})
    d.stop()
    # one session carried every transaction, and it ended cleanly (Postfix logs its
    # command counts at the disconnect, after our QUIT)
    rcpt_count = sum(len(r) for r in sent.values())
    counts = f"ehlo=1 mail={n} rcpt={rcpt_count} data={n} quit=1"
    wait_until(lambda: counts in postfix.log(), 20, "the session's end in Postfix's log")
    log = postfix.log()
    assert "improper command pipelining" not in log and "synchronization" not in log, log
    assert "lost connection" not in log, log
    # the envelopes really went out ahead: for (nearly) every message but the first
    ahead = re.search(r"stopped: .*'sent_ahead': (\d+)", d.log(since_start=True))
    assert ahead and int(ahead.group(1)) >= n - 10, d.log()[-3000:]
