#!/usr/bin/env python3
"""Issue 15, item 2: restart with a large queue -- time to the first 250 and the first delivery.

One daemon (tests/daemon.py), one spool shard, 2 acceptors.  Its spool is filled with
``--queued`` single-recipient messages of ``--size`` octets written by the store itself
(records exactly as a shard writes them, without the injection events a live run adds,
which recovery skips), as a previous run would have left them; then ``mta serve`` is
started with delivery on, every domain routed to an smtp-sink on loopback, and measured:

- first 250: from starting ``mta serve`` to the first message acknowledged (an SMTP client
  trying every 50 ms);
- queue read: the shard's "recovered queue ... seconds=" (it takes mail meanwhile);
- first delivery: from the start to the first ``delivery`` event in the event log;
- the spool process's peak RSS (VmHWM) after the recovery, per queued message, and
  beyond that of the same shard started first with an empty spool (the interpreter,
  the modules and the buffers every shard has: what the queue itself costs).

Loopback only; bounded by ``--timeout``; only processes started here are stopped.

    python bench/restart.py [--queued 1000000] [--size 2048] [--rcpts 1] [--record]

With ``--rcpts N`` each message has N recipients in N domains; the figures are then also
per queued recipient.  The whole process tree's resident memory (supervisor and every
child, VmRSS after the read) is reported against the same tree on an empty spool.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import smtplib
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from daemon import HOST, Daemon, free_port  # noqa: E402
from loadlib.procs import tree_memory  # noqa: E402

from mta.queueid import new_qid_for_shard  # noqa: E402
from mta.store import MessageMeta, Store, shard_dir, write_cursor  # noqa: E402


def fill(d: Daemon, n: int, size: int, rcpts: int = 1) -> float:
    t0 = time.monotonic()
    directory = shard_dir(os.path.join(d.state_dir, "spool"), 0)
    st = Store(directory, 64 << 20, fsync=False)
    st.recover()
    head = b"From: <old@sender.test>\r\nTo: <r@bench.test>\r\nSubject: queued\r\n\r\n"
    body = head + b"x" * 76 + b"\r\n"
    body = (body * (size // len(body) + 1))[:size]
    for first in range(0, n, 10_000):
        items = [(MessageMeta(new_qid_for_shard(0, 1), "old@sender.test",
                              [f"r{i}@d{j}.bench.test" for j in range(rcpts)],
                              time.time(), {}, "client.test [127.0.0.1]"), body)
                 for i in range(first, min(n, first + 10_000))]
        new = st.write(items, [])
        st.commit(new, [])
    st.sync()
    seg = st.current
    if seg is not None:
        # What the run that left this queue also left: its events process's cursor near
        # the end (the shards hold reclamation back for it, bounded by
        # events.max_backlog_bytes).  The fill writes no events, so the end is exact.
        # Without one the events process reads every segment from the first after the
        # restart (about 2.3 GB per million messages), beside the shard's own read.
        write_cursor(directory, seg.number, seg.size)
    os.sync()
    st.close()
    return time.monotonic() - t0


def spool_hwm(d: Daemon) -> int:
    """The spool shard's peak RSS (VmHWM), in octets."""
    with open(f"/proc/{d.children()['spool[0]']}/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+) kB", fh.read()).group(1)) * 1024


def tree_rss(d: Daemon) -> int:
    """The resident memory (VmRSS) of the supervisor and every child, in octets."""
    return tree_memory(d.proc.pid)[0]


def empty_hwm(d: Daemon, timeout: float) -> tuple[int, int]:
    """The spool shard's peak RSS once it has read an empty spool, and the whole tree's
    resident memory then (then stopped)."""
    d.start(wait=True)
    try:
        d.wait_log(r"recovered queue", timeout=timeout)
        time.sleep(1.0)         # (a turn of its housekeeping, as the measured run has had)
        return spool_hwm(d), tree_rss(d)
    finally:
        d.stop()


def first_250(port: int, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP(HOST, port, timeout=10) as c:
                c.sendmail("new@sender.test", ["new@bench.test"],
                           b"Subject: after the restart\r\n\r\nhello\r\n")
                return time.monotonic()
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)
    raise TimeoutError("no 250")


def first_delivery(path: str, deadline: float) -> float:
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as fh:
                if b'"type":"delivery"' in fh.read():
                    return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise TimeoutError("no delivery")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queued", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rcpts", type=int, default=1,
                    help="recipients per message (one domain each: r@d0..d{N-1}.bench.test)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mta-bench-restart-", dir="/var/tmp") as tmp:
        sink_port = free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []   # smtp-sink refuses root
        sink = subprocess.Popen(["smtp-sink", *user, f"{HOST}:{sink_port}", "1000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        d = Daemon(tmp, acceptors=2, shards=1,
                   delivery={"hold": False, "route": [{"domain": "*",
                                                       "hosts": [f"{HOST}:{sink_port}"]}]})
        try:
            empty, empty_tree = empty_hwm(d, 60.0)
            fill_s = fill(d, args.queued, args.size, args.rcpts)
            t0 = time.monotonic()
            d.start(wait=False)
            deadline = t0 + args.timeout
            t250 = first_250(d.port, deadline) - t0
            tdel = first_delivery(os.path.join(d.state_dir, "log", "events.jsonl"),
                                  deadline) - t0
            while "recovered queue" not in d.log(since_start=True):
                if time.monotonic() > deadline:
                    raise TimeoutError("no recovery")
                time.sleep(0.2)
            read_s = float(re.search(r"recovered queue: .* seconds=([0-9.]+)",
                                     d.log(since_start=True)).group(1))
            hwm = spool_hwm(d)
            tree = tree_rss(d)
        except Exception:
            print(d.log()[-3000:], file=sys.stderr)
            raise
        finally:
            d.cleanup()
            sink.kill()
            sink.wait()
    n_rcpts = args.queued * args.rcpts
    text = (f"{args.queued:,} queued messages of {args.size} octets"
            + (f" and {args.rcpts} recipients ({n_rcpts:,} recipients)" if args.rcpts > 1 else "")
            + f" in one shard (filled in "
            f"{fill_s:.1f} s); `mta serve` → first 250 **{t250:.2f} s**, first delivery "
            f"**{tdel:.2f} s**, queue read in {read_s:.1f} s (the shard took mail meanwhile); "
            f"spool peak RSS {hwm / 2**20:.0f} MiB = {hwm / args.queued:.0f} bytes per queued "
            f"message; {(hwm - empty) / args.queued:.0f} bytes per queued message beyond the "
            f"{empty / 2**20:.0f} MiB of the shard with an empty spool"
            + (f"; per queued recipient: {hwm / n_rcpts:.0f} bytes, {(hwm - empty) / n_rcpts:.0f}"
               " beyond the empty shard" if args.rcpts > 1 else "")
            + f"; whole process tree after the read {tree / 2**20:.0f} MiB (VmRSS), "
            f"{(tree - empty_tree) / n_rcpts:.0f} bytes per queued recipient beyond the "
            f"{empty_tree / 2**20:.0f} MiB of the tree with an empty spool")
    print(text)
    if args.record:
        stamp = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
        with open(os.path.join(HERE, "RESULTS.md"), "a") as fh:
            fh.write(f"\n## Restart with a large queue (issue 15) — {stamp}\n\n"
                     f"`python bench/restart.py --queued {args.queued} --size {args.size} "
                     f"--rcpts {args.rcpts} "
                     f"--record`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
