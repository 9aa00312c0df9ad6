"""Power loss under SMTP and HTTP load: every message answered 250 / 200 survives, intact, once.

The kill -9 tests (test_crash.py) keep the kernel's page cache, so they cannot
show that the 250 waited for the disk.  Here the spool directory is on
crashfs (tests/crashfs.py): a FUSE file system that keeps data only in memory
until fsync/fdatasync covers it and directory entries only until the
directory is fsynced, and that throws the rest away at a simulated power cut.

Each round starts ``mta serve`` on that spool, runs SMTP clients (smtplib,
one message per transaction, connections reused) and HTTP clients (POST
/api/v1/transmissions with ``email_rfc822`` content, one or two recipients),
and at a random moment cuts the power: kill -9 of the whole daemon tree, then
the file system is unmounted and mounted again with only what was durable.
The spool directory itself is made by the first start, on crashfs too.
After each restart ``mta queue list`` must hold every message acknowledged so
far; at the end, with the daemon stopped, ``mta spool-dump`` (which verifies
every record's checksum) must hold each of them exactly once, byte for byte
what was sent after our Received header.  A message that got no answer or a
4xx may or may not be there, but never twice and never damaged.

Delivery is held (the Daemon default), so the queue only grows.  The random
seed is printed; POWERLOSS_SEED=N repeats a run's crash moments.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import os
import random
import smtplib
import threading
import time

import pytest

from crashfs import CrashFS
from daemon import HOST, QUEUED_RE, split_received
from loadclient import RCPT, SENDER, message, seq_of

ROUNDS = 4
SMTP_CLIENTS = 3
HTTP_CLIENTS = 2
ACKS_BEFORE_CRASH = 15      # per round, before the random wait that ends it
MAX_CRASH_DELAY = 1.0       # seconds of further load, drawn at random per round
HTTP_SENDER = "powerloss-http@example.com"


def http_message(seq: int) -> bytes:
    """The email_rfc822 of HTTP transmission *seq*: every field the builder would add is
    present, nothing to substitute, so the spool must hold exactly these bytes."""
    line = hashlib.sha256(b"http %d" % seq).hexdigest().encode() + b"\r\n"
    head = (f"From: <{HTTP_SENDER}>\r\nTo: <list@example.net>\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{seq}@powerloss.test>\r\n"
            f"Subject: power loss {seq}\r\nX-Seq: {seq}\r\n\r\n").encode()
    return head + line * (20 + 60 * (seq % 4))


def http_rcpts(seq: int) -> list[str]:
    return [f"h{seq}-{k}@example.net" for k in range(1 + seq % 2)]


class Load:
    """SMTP and HTTP clients sending checkable messages until told to stop.

    Outcomes (read by the test's thread after every client thread has ended):
    smtp[seq] = ("250", qid) | ("4xx", text) | ("error", text) and
    http[seq] = (status, accepted recipients count) | ("error", text); *problems*
    holds anything a client saw that the daemon must never do (a 5xx to SMTP,
    a 200 whose count does not add up).
    """

    def __init__(self, d, seqs):
        self.d = d
        self.seqs = seqs
        self.smtp: dict[int, tuple] = {}
        self.http: dict[int, tuple] = {}
        self.problems: list[str] = []
        self.stopping = threading.Event()
        self.acks = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._smtp, daemon=True)
                        for _ in range(SMTP_CLIENTS)]
        self.threads += [threading.Thread(target=self._http, daemon=True)
                         for _ in range(HTTP_CLIENTS)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, f"load threads did not end: {stuck}"

    def _acked(self) -> None:
        with self.lock:
            self.acks += 1

    def _smtp(self) -> None:
        s = None
        for _ in range(100_000):                  # bounded; ends at the crash
            if self.stopping.is_set():
                break
            seq = next(self.seqs)
            try:
                if s is None:
                    s = smtplib.SMTP(HOST, self.d.port, local_hostname="powerloss.test",
                                     timeout=20)
                    s.ehlo()
                code, text = s.mail(SENDER)
                if code == 250:
                    code, text = s.rcpt(RCPT)
                if code == 250:
                    code, text = s.data(message(seq, 2048 + 2500 * (seq % 3)))
            except (smtplib.SMTPException, OSError) as exc:
                self.smtp[seq] = ("error", repr(exc))
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
                s = None
                self.stopping.wait(0.1)           # the daemon is down: do not spin
                continue
            text = text.decode("utf-8", "replace")
            if code == 250:
                m = QUEUED_RE.fullmatch(text)
                if m is None:
                    self.problems.append(f"SMTP seq {seq}: 250 without a queue id: {text!r}")
                    continue
                self.smtp[seq] = ("250", m.group(1))
                self._acked()
            elif 400 <= code < 500:
                self.smtp[seq] = ("4xx", f"{code} {text}")
                try:
                    s.rset()
                except (smtplib.SMTPException, OSError):
                    s = None
            else:
                self.problems.append(f"SMTP seq {seq}: {code} {text}")
                s = None
        if s is not None:
            s.close()

    def _http(self) -> None:
        for _ in range(100_000):                  # bounded; ends at the crash
            if self.stopping.is_set():
                break
            seq = next(self.seqs)
            rcpts = http_rcpts(seq)
            body = {"recipients": rcpts,
                    "content": {"email_rfc822": http_message(seq).decode()}}
            try:
                status, _, res = self.d.post(body, timeout=20)
            except OSError as exc:
                self.http[seq] = ("error", repr(exc))
                self.stopping.wait(0.1)           # the daemon is down: do not spin
                continue
            if status == 200:
                r = (res or {}).get("results") or {}
                ok = r.get("total_accepted_recipients")
                if not isinstance(ok, int) or ok + r.get("total_rejected_recipients", -1) \
                        != len(rcpts):
                    self.problems.append(f"HTTP seq {seq}: 200 with {res!r}")
                    continue
                self.http[seq] = (200, ok)
                if ok:
                    self._acked()
            elif status in (429, 503):
                self.http[seq] = (status, 0)
            else:
                self.problems.append(f"HTTP seq {seq}: {status} {res!r}")


@pytest.fixture
def powerloss(make_daemon, tmp_path):
    """(a daemon not yet started whose spool is on crashfs, the CrashFS)."""
    fs = CrashFS(str(tmp_path / "spoolfs"), str(tmp_path / "spoolfs.image"),
                 str(tmp_path / "crashfs.log"))
    fs.mount()
    d = make_daemon(start=False, acceptors=2, shards=2,
                    smtp={"spool_timeout": 5.0},
                    spool={"directory": os.path.join(fs.mountpoint, "spool"),
                           "segment_size": 1 << 20})
    try:
        yield d, fs
    finally:
        d.cleanup()
        d.kill9()
        fs.unmount()


def test_power_loss_under_smtp_and_http_load_loses_nothing_acknowledged(powerloss):
    d, fs = powerloss
    seed = int(os.environ.get("POWERLOSS_SEED") or random.randrange(1 << 32))
    print(f"POWERLOSS_SEED={seed}")
    rng = random.Random(seed)
    seqs = itertools.count()
    smtp: dict[int, tuple] = {}
    http: dict[int, tuple] = {}
    for rnd in range(ROUNDS):
        d.start()
        if rnd:
            # What was acknowledged before the earlier power cuts is queued again.
            check_listed(d, smtp, http, f"after power cut {rnd}")
        load = Load(d, seqs).start()
        try:
            deadline = time.monotonic() + 30
            while load.acks < ACKS_BEFORE_CRASH and time.monotonic() < deadline:
                time.sleep(0.02)
            assert load.acks >= ACKS_BEFORE_CRASH, \
                f"round {rnd}: only {load.acks} acknowledged:\n{d.log()[-3000:]}"
            time.sleep(rng.uniform(0, MAX_CRASH_DELAY))
            d.kill9()
            fs.crash()
        finally:
            load.stop()
        assert not load.problems, load.problems[:10]
        # The spool's record of its shard count (queue ids map to shards) survives too.
        shards = os.path.join(fs.mountpoint, "spool", "SHARDS")
        assert os.path.isfile(shards), f"power cut {rnd + 1}: {shards} is gone"
        with open(shards) as fh:
            assert fh.read() == "2\n", f"power cut {rnd + 1}"
        smtp.update(load.smtp)
        http.update(load.http)
    d.start()
    check_listed(d, smtp, http, f"after power cut {ROUNDS}")
    assert d.stop() == 0, d.log()[-3000:]
    check_spool(d.spool_dump(bodies=True), smtp, http)
    kinds = collections.Counter(r[0] for r in smtp.values())
    kinds.update(f"http {r[0]}" for r in http.values())
    print(f"crashes={fs.crashes} outcomes={dict(kinds)}")


def acked_http(http: dict) -> dict[int, int]:
    """seq -> how many of its recipients were accepted (200)."""
    return {seq: r[1] for seq, r in http.items() if r[0] == 200 and r[1]}


def check_listed(d, smtp: dict, http: dict, when: str) -> None:
    """``mta queue list`` of the restarted daemon holds every acknowledged message."""
    listed = d.queue_list()
    qids = {x["queue_id"] for x in listed}
    assert len(qids) == len(listed), f"{when}: a queue id is listed twice"
    lost = [(seq, r[1]) for seq, r in smtp.items() if r[0] == "250" and r[1] not in qids]
    assert not lost, f"{when}: {len(lost)} messages answered 250 are gone: {lost[:10]}"
    rcpts = collections.Counter(r for x in listed for r in x["recipients"])
    for seq, n in acked_http(http).items():
        have = sum(rcpts[r] for r in http_rcpts(seq))
        assert have >= n, f"{when}: HTTP {seq} had {n} recipients accepted, {have} queued"


def check_spool(dump: list[dict], smtp: dict, http: dict) -> None:
    """The spool files hold every acknowledged message once, intact; nothing else of ours
    twice or damaged."""
    by_qid = {x["queue_id"]: x for x in dump}
    assert len(by_qid) == len(dump), "a queue id appears twice in the spool"
    smtp_seen: collections.Counter = collections.Counter()
    http_seen: collections.Counter = collections.Counter()
    for qid, x in by_qid.items():
        raw = base64.b64decode(x["message"])
        assert len(raw) == x["message_size"]
        received, sent = split_received(raw)
        assert f" id {qid}".encode() in received, received
        seq = seq_of(sent)
        if x["sender"] == SENDER:
            assert x["recipients"] == [RCPT], x
            assert seq in smtp, f"{qid}: a message nobody sent"
            assert sent == message(seq, 2048 + 2500 * (seq % 3)), f"{qid}: seq {seq} damaged"
            smtp_seen[seq] += 1
            if smtp[seq][0] == "250":
                assert smtp[seq][1] == qid, f"seq {seq} answered {smtp[seq][1]}, stored {qid}"
        else:
            assert x["sender"] == HTTP_SENDER, x
            assert seq in http, f"{qid}: a transmission nobody sent"
            assert len(x["recipients"]) == 1 and x["recipients"][0] in http_rcpts(seq), x
            assert sent == http_message(seq), f"{qid}: HTTP {seq} damaged"
            http_seen[x["recipients"][0]] += 1
    twice = [s for s, n in smtp_seen.items() if n > 1]
    assert not twice, f"SMTP messages stored twice: {twice[:10]}"
    twice = [r for r, n in http_seen.items() if n > 1]
    assert not twice, f"HTTP recipients stored twice: {twice[:10]}"
    lost = [s for s, r in smtp.items() if r[0] == "250" and smtp_seen[s] != 1]
    assert not lost, f"{len(lost)} SMTP messages answered 250 are not in the spool: {lost[:10]}"
    for seq, n in acked_http(http).items():
        have = sum(http_seen[r] for r in http_rcpts(seq))
        assert have >= n, f"HTTP {seq}: {n} recipients accepted, {have} in the spool"
    assert sum(1 for r in smtp.values() if r[0] == "250") >= ROUNDS * 5
    assert sum(acked_http(http).values()) >= ROUNDS * 2
