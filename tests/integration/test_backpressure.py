"""Back-pressure: a slow, dead, full or failing spool gets 451/452, never a 5xx, never a lie.

The rule under test: if the shard does not acknowledge within
``smtp.spool_timeout``, or the spool is unhealthy (EIO, ENOSPC, free space
under a threshold), the client gets ``451 4.3.0`` (``452 4.3.1`` at MAIL when
space is low), the acceptor never hangs, and everything recovers by itself
when the cause is gone.  Never a 5xx for a storage problem, never a 250 for a
message that is not on disk.
"""
from __future__ import annotations

import base64
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from daemon import queued_id as qid_of
from daemon import wait_until
from mxlab import IPS, mx
from sinks import qid_of as qid_of_received
from mta.queueid import shard_of

TIMEOUT = 1.0            # smtp.spool_timeout in these tests
# The acceptor checks timeouts every 0.5 s, so a 451 for a stopped shard comes about
# TIMEOUT + 0.5 s after the message; the bound only says "answered, not hung" (a loaded
# 2-core machine must not fail it: speed is bench/'s question).
REPLY_BOUND = TIMEOUT + 10.0
DEAD_SHARD_TIMEOUT = 30.0   # smtp.spool_timeout where a dead shard must not be waited for
NO_WAIT = 10.0              # ... so a reply within this did not wait for that timeout


def msg(n: int, size: int = 0) -> bytes:
    """Message n; with *size*, padded with 78-octet lines to about that size."""
    head = f"From: <bp@example.com>\r\nTo: <sink@example.net>\r\nSubject: bp {n}\r\n\r\n"
    out = head.encode() + f"message {n}\r\n".encode()
    if size:
        line = (f"{n:08d}" + "y" * 68 + "\r\n").encode()
        out += line * max(0, (size - len(out)) // len(line))
    return out


def transaction(c, body: bytes, rcpt: str = "sink@example.net") -> tuple[int, str, float]:
    """MAIL/RCPT/DATA pipelined (RFC 2920), then the body; (code, text, seconds for the answer)."""
    c.send(f"MAIL FROM:<bp@example.com>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    replies = [c.reply() for _ in range(3)]
    if replies[2][0] != 354:
        bad = next(r for r in replies if r[0] >= 400)
        if replies[0][0] < 400:
            assert c.cmd("RSET")[0] == 250
        return bad[0], bad[1][-1], 0.0
    t0 = time.monotonic()
    c.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    code, text = c.reply()
    return code, text[-1], time.monotonic() - t0


def open_session(d):
    return d.session(helo="bp.test", timeout=30)


def stored_bodies(d) -> dict[str, bytes]:
    """qid -> message as sent by the client (our Received header taken off); daemon stopped."""
    out = {}
    for x in d.spool_dump(bodies=True):
        raw = base64.b64decode(x["message"])
        assert len(raw) == x["message_size"]
        head, sep, rest = raw.partition(b"\r\n\tby mta.test (mta) with ESMTP id " +
                                         x["queue_id"].encode())
        assert raw.startswith(b"Received: ") and sep, raw[:300]
        # the Received field ends at the first line that does not start with white space
        m = re.search(rb"\r\n(?![ \t])", rest)
        out[x["queue_id"]] = rest[m.end():]
    return out


def reload(d, **changes) -> None:
    """Rewrite the config, SIGHUP, and wait until every old acceptor has gone."""
    old = [pid for title, pid in d.children().items() if title.startswith("acceptor[")]
    assert old
    d.reload(timeout=20.0, **changes)
    for pid in old:
        d.wait_log(rf"acceptor\[\d+\] pid={pid} exited")


# ------------------------------------------------------------ slow or dead shard

def test_stopped_shard_answers_451_in_bounded_time_then_recovers(make_daemon):
    d = make_daemon(acceptors=1, shards=1, smtp={"spool_timeout": TIMEOUT})
    spool = d.children()["spool[0]"]
    sent: dict[str, bytes] = {}
    with open_session(d) as c:
        code, text, _ = transaction(c, msg(1))
        assert code == 250
        sent[qid_of(text)] = msg(1)

        os.kill(spool, signal.SIGSTOP)
        try:
            code, text, took = transaction(c, msg(2))
            assert (code, text[:5]) == (451, "4.3.0"), (code, text)
            assert TIMEOUT - 0.1 <= took <= REPLY_BOUND, took
            # The session is not stuck behind the message it gave up on: it answers (a
            # stuck one would not answer at all while the shard is stopped; the bound is
            # generous, it is not a speed check) and can try again.
            t0 = time.monotonic()
            assert c.cmd("NOOP")[0] == 250
            assert time.monotonic() - t0 < REPLY_BOUND
            code, text, took = transaction(c, msg(3))
            assert (code, text[:5]) == (451, "4.3.0") and took <= REPLY_BOUND
            # New connections are served too (greeting, EHLO) while the shard is stopped.
            with open_session(d) as c2:
                assert c2.cmd("NOOP")[0] == 250
        finally:
            os.kill(spool, signal.SIGCONT)

        code, text, took = transaction(c, msg(4))
        assert code == 250, (code, text)
        sent[qid_of(text)] = msg(4)
        assert c.cmd("QUIT")[0] == 221

    told_451 = re.findall(r"([0-9A-F]{20}): no answer from the spool in 1s; answered 451", d.log())
    assert len(told_451) == 2
    listed = {x["queue_id"] for x in d.queue_list()}
    assert set(sent) <= listed
    assert d.stop() == 0
    stored = stored_bodies(d)
    for qid, body in sent.items():
        assert stored[qid] == body
    # The 451'd messages: either outcome is allowed.  With the current design
    # they ARE on disk (seen: 2 of 2): the requests waited in the bus queue of
    # the stopped shard, which wrote them once it was continued; the acceptor
    # had already answered 451 and dropped the late confirmation.  They are
    # duplicates of what the client was told to retry (never a loss); if
    # present they must be whole.
    late = {q: stored[q] for q in told_451 if q in stored}
    for qid, body in late.items():
        assert body in (msg(2), msg(3)), qid
    assert set(stored) <= set(sent) | set(told_451)


def test_stopped_shard_does_not_hold_up_the_other_shard(make_daemon):
    """Shard 0 is stopped: its messages get 451 in bounded time, shard 1's get 250."""
    d = make_daemon(acceptors=1, shards=2, smtp={"spool_timeout": TIMEOUT})
    spool0 = d.children()["spool[0]"]
    results: list[tuple[int, str, float]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with open_session(d) as c:
            for i in range(3):
                r = transaction(c, msg(100 * k + i))
                with lock:
                    results.append(r)

    os.kill(spool0, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a session hung"
    finally:
        os.kill(spool0, signal.SIGCONT)
    assert len(results) == 18
    codes = sorted({r[0] for r in results})
    assert codes == [250, 451], results
    for code, text, took in results:
        assert took <= REPLY_BOUND, (code, text, took)
        if code == 250:
            assert shard_of(qid_of(text), 2) == 1
        else:
            assert text.startswith("4.3.0")


def test_dead_shard_gets_immediate_451_and_comes_back_by_itself(make_daemon):
    """spool[0] dies and cannot start again for a while (its directory is gone):
    the acceptor answers 451 at once for shard 0, 250 for shard 1, and takes
    mail for shard 0 again once the supervisor's restart succeeds."""
    d = make_daemon(acceptors=1, shards=2, smtp={"spool_timeout": DEAD_SHARD_TIMEOUT},
                    server={"restart_backoff_max": 1.0})
    with open_session(d) as c:
        first = {}
        for i in range(2):
            code, text, _ = transaction(c, msg(i))
            assert code == 250
            first[qid_of(text)] = msg(i)
    sdir = os.path.join(d.state_dir, "spool", "shard-00")
    shutil.move(sdir, sdir + ".away")
    try:
        with open(sdir, "w") as fh:    # a file where the directory was: start-up fails
            fh.write("not a directory\n")
        old = d.children()["spool[0]"]
        os.kill(old, signal.SIGKILL)
        d.wait_log(rf"spool\[0\] pid={old} died")
        d.wait_log(r"spool\[0\] pid=\d+ died \(exit status 1\)", timeout=20)
        with open_session(d) as c:
            codes = []
            for i in range(10, 16):
                code, text, took = transaction(c, msg(i))
                assert took < NO_WAIT, (code, text, took)   # no waiting for a dead shard
                codes.append(code)
                if code == 250:
                    assert shard_of(qid_of(text), 2) == 1
                    first[qid_of(text)] = msg(i)
                else:
                    assert (code, text[:5]) == (451, "4.3.0"), (code, text)
            assert 250 in codes and 451 in codes, codes
    finally:
        if os.path.isfile(sdir):
            os.unlink(sdir)
        if os.path.isdir(sdir + ".away"):
            shutil.move(sdir + ".away", sdir)
    d.wait_log(r"spool\[0\]\[\d+\]: recovered queue: messages=1 ", timeout=20)
    with open_session(d) as c:
        # Until the acceptor's bus connection to the new shard is up (it tries every
        # 10 ms) shard 0 may still get an immediate 451.
        # (Bounded by time, not by a count: an immediate 451 takes a millisecond,
        # and a count of them ran out before the reconnection on a quick run.)
        deadline = time.monotonic() + 10
        for i in itertools.count(1000):
            code, text, took = transaction(c, msg(i))
            assert code in (250, 451) and took < NO_WAIT, (code, text, took)
            if code == 250:
                first[qid_of(text)] = msg(i)
                if shard_of(qid_of(text), 2) == 0:
                    break
            assert time.monotonic() < deadline, "shard 0 never took mail again"
        for i in range(20, 24):
            code, text, _ = transaction(c, msg(i))
            assert code == 250, (code, text)
            first[qid_of(text)] = msg(i)
    assert {shard_of(q, 2) for q in first} == {0, 1}
    assert d.stop() == 0
    stored = stored_bodies(d)
    for qid, body in first.items():
        assert stored.get(qid) == body, qid


# -------------------------------------------------------------- free space

def test_low_free_space_452_at_mail_and_recovery_on_reload(make_daemon):
    d = make_daemon(acceptors=2, shards=1, spool={"min_free_bytes": 1 << 60})
    with open_session(d) as c:
        assert c.cmd("MAIL FROM:<bp@example.com>") == \
            (452, ["4.3.1 Insufficient system storage, try again later"])
        # the session goes on: EHLO, RSET, NOOP still work; MAIL still 452
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("MAIL FROM:<bp@example.com>")[0] == 452
        assert c.cmd("RCPT TO:<sink@example.net>")[0] == 503

    # Each reload moves the threshold; the next message is taken or refused accordingly.
    queued = set()
    steps = [({"min_free_bytes": 0}, 250), ({"min_free_percent": 100.0}, 452),
             ({"min_free_percent": 0.0}, 250)]
    for n, (spool, expected) in enumerate(steps, start=1):
        reload(d, spool=spool)
        with open_session(d) as c:
            code, text, _ = transaction(c, msg(n))
        if expected == 250:
            assert code == 250, (spool, code, text)
            queued.add(qid_of(text))
        else:
            assert (code, text[:5]) == (452, "4.3.1"), (spool, code, text)
    assert {x["queue_id"] for x in d.queue_list()} == queued


# ------------------------------------------------------------------ ENOSPC

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs, unmounted at teardown whatever happened."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M,mode=0700", "tmpfs", str(mnt)],
                   check=True, capture_output=True)
    try:
        yield str(mnt)
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_enospc_answers_451_then_heals_when_space_returns(small_tmpfs, make_daemon):
    d = make_daemon(acceptors=1, shards=1, server={"state_dir": small_tmpfs},
                    spool={"min_free_bytes": 0, "min_free_percent": 0.0})
    try:
        # Fill most of the file system so that a few 200 KB messages fill the rest.
        st = os.statvfs(small_tmpfs)
        free = st.f_bavail * st.f_frsize
        filler = os.path.join(small_tmpfs, "filler")
        with open(filler, "wb") as fh:
            fh.write(b"\0" * (free - 1_000_000))
        size = 200_000
        queued: dict[str, bytes] = {}
        codes = []
        with open_session(d) as c:
            for i in range(12):
                code, text, took = transaction(c, msg(i, size))
                assert code in (250, 451), (code, text)
                assert took <= 20, took
                codes.append(code)
                if code == 250:
                    queued[qid_of(text)] = msg(i, size)
                else:
                    assert text.startswith("4.3.0"), text
                if codes.count(451) >= 3:
                    break
            assert 250 in codes and codes.count(451) >= 3, codes
            d.wait_log(r"spool write failed: No space left on device; answering 451")
            # Take the last octets too, so that the shard's once-a-second probe
            # (a tiny record) cannot succeed either: the shard stays unhealthy.
            filler2 = os.path.join(small_tmpfs, "filler2")
            fd = os.open(filler2, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for block in (65536, 4096, 512, 1):
                    try:
                        while os.write(fd, b"\0" * block):
                            pass
                    except OSError:
                        pass
            finally:
                os.close(fd)
            # The probe may have healed the shard in the moment between the last 451
            # and filler2 (it wrote into what the failed message left): one more
            # message fails now for certain, no octet being left, so the shard is
            # unhealthy after it, and every probe from now on fails as well.
            code, text, _ = transaction(c, msg(99, size))
            assert code == 451 and text.startswith("4.3.0"), (code, text)
            time.sleep(1.5)          # past a probe, which fails too
            # The operator can see it.
            summary = d.queue_summary()
            shard = summary["shards"][0]
            assert shard["healthy"] is False and "No space left" in shard["error"], shard
            assert summary["total"]["messages"] == len(queued)
            text_out = d.cli("queue").stdout.decode()
            assert "ERROR: No space left on device" in text_out, text_out

            # The cause goes away: the shard heals by itself (its probe), and
            # takes new messages.
            os.unlink(filler)
            os.unlink(filler2)
            for i in range(100, 103):
                code, text, _ = transaction(c, msg(i, size))
                assert code == 250, (code, text)
                queued[qid_of(text)] = msg(i, size)
            d.wait_log(r"spool writes are succeeding again")
            shard = d.queue_summary()["shards"][0]
            assert shard["healthy"] is True and shard["error"] == "", shard
        assert {x["queue_id"] for x in d.queue_list()} == set(queued)
        assert d.stop() == 0
        stored = stored_bodies(d)
        # Every 250 is on disk byte for byte; nothing the client was refused is.
        assert stored == queued
    finally:
        d.cleanup()


def test_a_burst_meets_452_at_mail_before_the_disk_is_really_full(small_tmpfs, make_daemon):
    """Free space counts what was sent to the spool since the last statvfs.

    With 250 KB above the threshold, a burst of 100 KB messages sent back to
    back gets 250 for those that fit above it, then 452 4.3.1 at MAIL -- never
    a write that fails with ENOSPC (451), although statvfs runs only twice a
    second: the burst would have filled the disk long before the next one.
    Once space returns, mail is taken again.
    """
    threshold = 256 * 1024
    d = make_daemon(acceptors=1, shards=1, server={"state_dir": small_tmpfs},
                    spool={"min_free_bytes": threshold, "min_free_percent": 0.0,
                           "preallocate": False, "segment_size": 1 << 20})
    try:
        st = os.statvfs(small_tmpfs)
        free = st.f_bavail * st.f_frsize
        filler = os.path.join(small_tmpfs, "filler")
        with open(filler, "wb") as fh:
            fh.write(b"\0" * (free - threshold - 250_000))
        size = 100_000
        queued: dict[str, bytes] = {}
        codes = []
        with open_session(d) as c:
            time.sleep(1.0)     # the acceptor's statvfs has seen the filler
            for i in range(12):
                code, text, _ = transaction(c, msg(i, size))
                codes.append(code)
                if code == 250:
                    queued[qid_of(text)] = msg(i, size)
                else:
                    assert (code, text[:5]) == (452, "4.3.1"), (codes, text)
            # 250s while there is room above the threshold, then 452 at MAIL.
            assert codes[0] == 250 and codes[-1] == 452, codes
            assert codes == sorted(codes), codes
            log = d.log()
            assert "No space left on device" not in log, log[-3000:]
            assert "MAIL gets 452" in log
            # Space returns: taken again once the acceptor has measured it.
            os.unlink(filler)
            d.wait_log(r"spool file system has space again")
            code, text, _ = transaction(c, msg(99, size))
            assert code == 250, (code, text)
            queued[qid_of(text)] = msg(99, size)
        assert d.stop() == 0
        assert stored_bodies(d) == queued
    finally:
        d.cleanup()


def test_enospc_shard_heals_by_itself_and_delivers_what_it_acknowledged(small_tmpfs, lab):
    """After a storage error the shard finds out by itself that the disk is back.

    A message is acknowledged and deferred by its receiver; then the spool's file
    system fills and a write fails.  Once space returns, the deferred message is
    delivered and the shard reports healthy -- with no new mail arriving to be
    written (the shard probes its disk while unhealthy).
    """
    accepting = threading.Event()
    sink = lab.aio(IPS[0], rcpt=lambda s, a, f: None if accepting.is_set() else
                   "451 4.3.0 not yet")
    lab.serve(mx("dest.test", "mx.dest.test", IPS[0]))
    # (retries 15 s apart: no retry's outcome -- a small write that would succeed in the
    # space left and heal the shard -- comes between the failed write and the check)
    d = lab.daemon(shards=1, retry_schedule=[15.0], retry_jitter=0.0,
                   sections={"server": {"state_dir": small_tmpfs},
                             "spool": {"min_free_bytes": 0, "min_free_percent": 0.0}})
    first = d.send("bp@example.com", ["x@dest.test"], msg(1))
    d.wait_log(r"to=<x@dest.test> .* status=deferred")
    filler = os.path.join(small_tmpfs, "filler")
    st = os.statvfs(small_tmpfs)
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (st.f_bavail * st.f_frsize - 600_000))
    with open_session(d) as c:
        codes = []
        for i in range(10):
            # (to the lab's receiver, which defers them at once: every outcome
            # of theirs is in before the space comes back)
            code, text, _ = transaction(c, msg(100 + i, 200_000), "big@dest.test")
            codes.append(code)
            if code == 451:
                break
            # its deferral recorded before the next one is sent: no outcome of an
            # accepted message is still on its way when the write fails (it would be
            # a small write that succeeds in the space left, and heal the shard at once)
            want = len(codes) + 1      # the first message and the big ones so far
            wait_until(lambda want=want: d.queue_summary()["total"]["deferred"] == want,
                       20, "the deferral recorded")
        assert codes[-1] == 451, codes
    d.wait_log(r"spool write failed: No space left on device")
    # unhealthy now -- unless its probe (a small write, which fits in the space the big
    # message left) has already found the disk writable again, and said so
    assert d.queue_summary()["shards"][0]["healthy"] is False or \
        "spool writes are succeeding again" in d.log()
    time.sleep(1.0)
    os.unlink(filler)
    accepting.set()
    # No new mail: the retry comes due and goes out because the shard healed itself.
    txn = sink.wait_for("x@dest.test", timeout=60)
    assert qid_of_received(txn.data) == first
    shard = d.queue_summary()["shards"][0]
    assert shard["healthy"] is True and shard["error"] == "", shard


def test_a_message_waiting_on_a_shard_that_is_killed_gets_451_at_once(make_daemon):
    """The acceptor's commit reached the shard, which was stopped before answering; then
    it is killed.  No answer can come any more (an answer goes back on the connection its
    request came by): the client gets 451 as soon as the connection ends, not after
    smtp.spool_timeout (30 s here), and the shard's restart takes mail again."""
    d = make_daemon(acceptors=1, shards=1, smtp={"spool_timeout": DEAD_SHARD_TIMEOUT})
    spool = d.children()["spool[0]"]
    with open_session(d) as c:
        code, text, _ = transaction(c, msg(1))
        assert code == 250
        os.kill(spool, signal.SIGSTOP)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=transaction(c, msg(2))))
        t.start()
        time.sleep(1.0)                  # the commit is written to the stopped shard
        assert t.is_alive(), result      # (no answer while it is stopped)
        t0 = time.monotonic()
        os.kill(spool, signal.SIGKILL)
        t.join(NO_WAIT)
        assert not t.is_alive(), "no answer after the shard was killed"
        code, text, _ = result["r"]
        assert (code, text[:5]) == (451, "4.3.0"), (code, text)
        assert time.monotonic() - t0 < NO_WAIT
        qid = re.search(r"([0-9A-F]{20}): spool shard 0 went away before it answered; "
                        r"answered 451", d.log())
        assert qid, d.log()[-2000:]
        new = d.wait_restarted("spool[0]", spool)
        d.wait_log(rf"spool\[0\]\[{new}\]: recovered queue", timeout=20)
        deadline = time.monotonic() + 10
        while True:
            code, text, _ = transaction(c, msg(3))
            if code == 250:
                break
            assert code == 451 and time.monotonic() < deadline, (code, text)
            time.sleep(0.05)
