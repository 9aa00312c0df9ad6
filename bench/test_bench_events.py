"""Microbenchmark: the events process's CPU per event, in process, on a real spool shard's files.

Run: python -m pytest bench/test_bench_events.py --benchmark-only
 or: python bench/test_bench_events.py --events 20000 [--e2e]   (prints µs of CPU per event)
 or: OPT=--events /tmp/s46/ir.sh . OUT bench/test_bench_events.py 10000 20000 [--e2e]
     (instructions per event: two counts under callgrind, the difference)

What is real: a spool shard's :class:`mta.store.Store` (fsync off; its synced
watermark on, as when an events process reads the shard) gets REC_EVENTS records
exactly as the shard writes them -- the batch's internal events encoded by
:func:`mta.obs.events.encode`, one record per group commit, with the commit's
``Store.write`` and ``Store.sync`` (which moves the watermark).  The events process
is the real :class:`mta.events.main.Events` with the default ``[events]``
settings (event log and events store on): one ``step()`` reads the new records
from the segment (mmap, ``read_events``), decodes them, shapes each SparkPost
event (:mod:`mta.events.shape`), writes the event log (a temporary directory) and
appends to the LMDB events store (its commits synced, as in the daemon).  The
webhooks have no hand-off to cost here: their process reads the store.

What is not: the internal events are made here in the shape the spool makes them
(``Shard._batch_events`` for an injection, ``outcomes._outcome_base`` and the
outcome loop for a delivery), not by a shard; the checkpoint (the cursors and
syncs every ``checkpoint_interval``, not per event) and the stats pusher are left
out.  The temporary directory is on /dev/shm when there is one (the store's
fsyncs would otherwise swamp the wall time; callgrind counts no disk time).

The load: ``ROUND_RECORDS`` records of ``RECORD_EVENTS`` internal events each are
written, then one ``step()`` takes them all (one log write, one store append).
Default: HTTP injection -- single-recipient transmissions of bench/http_load.py
(``campaign_id``, ``metadata``, From and Subject carried, no substitutions in the
carried fields), each one ``injection`` event.  ``--e2e``: each message's
injection and, in the records after, its ``delivery`` (a 250 from a receiver,
egress source and site named): two events per message.

Timestamps and queue ids follow a fixed clock (``RATE`` messages a second from
``T0``), so two runs of the same count write the same log and store content.
``--harness`` writes the records only (no step), to measure the harness's share.

Instructions per event (callgrind, 5,120 and 15,360 events, 2026-12-06, at 2ec57f3): HTTP
injection 156,700 of which the harness 19,200, so **~137,500 in the events process**;
``--e2e`` 178,000.  CPU: ~19 µs per event HTTP, ~25 µs end to end (the harness ~2.4 µs).
After 2105a24 (no copy per recipient, event ids from an iterator): HTTP 153,100 (events
process ~133,800), ``--e2e`` 174,800.  Where an HTTP injection event's instructions go
(scratch stage-by-stage counts): store append ~73,000 (LMDB ~40,000 of it), shaping
~32,000 (nearly all interpreter), record decode (orjson) ~12,500, log line (orjson) ~10,000.
After the typed per-event kernels (mta._ext.evkernel: the store's keys and time, a
record's entries shaped in one loop with their common and attempt fields and time strings;
one getmulti / putmulti of the minute counters), 2,000 and 6,000 events, 2026-12-07: HTTP
116,000 of which the harness 18,900, so **~97,100 in the events process** (was ~133,700:
-27.4 %); ``--e2e`` 136,600, the harness 28,900, ~107,700 in the events process (was
~145,700: -26.1 %).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import msgspec

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mta.config import resolve  # noqa: E402
from mta.config.schema import Config  # noqa: E402
from mta.events.main import Events  # noqa: E402
from mta.obs import events as ev  # noqa: E402
from mta.store import Store, shard_dir  # noqa: E402

RECORD_EVENTS = 32          # internal events per REC_EVENTS record (one group commit)
ROUND_RECORDS = 4           # records the events process takes in one step
T0 = 1_800_000_000.0        # the fixed clock's start (2027-01-15)
RATE = 14_000.0             # messages a second on that clock (the HTTP injection rate)
QID0 = 0x18A3F2C4B1D2E0300000
SENDER = "news@sender.example.com"
CLIENT = "http [127.0.0.1]"


def injection(n: int) -> dict:
    """Message *n*'s injection event as the spool writes it for an HTTP transmission."""
    t = T0 + n / RATE
    qid = "%020X" % (QID0 + n)
    return {"type": ev.INJECTION, "timestamp": t, "arrival": t, "queue_id": qid,
            "message_id": f"<{qid}.{n}@mx.bench.example>", "sender": SENDER,
            "rcpts": [f"reader{n % 100_000}@example{n % 50}.net"], "size": 2390,
            "client": CLIENT, "campaign_id": "bench", "metadata": {"list": "daily"},
            "transmission_id": str(7_300_000_000_000_000 + n),
            ev.FRIENDLY_FROM: SENDER, ev.SUBJECT: "Today's news"}


def delivery(n: int) -> dict:
    """Message *n*'s delivery event as the spool writes it (a 250, first attempt)."""
    inj = injection(n)
    t = inj["arrival"] + 0.35
    out = {"timestamp": t, "queue_id": inj["queue_id"], "message_id": inj["message_id"],
           "sender": SENDER, "arrival": inj["arrival"], "size": inj["size"],
           "client": CLIENT, "campaign_id": "bench", "metadata": {"list": "daily"},
           "transmission_id": inj["transmission_id"], ev.FRIENDLY_FROM: SENDER,
           ev.SUBJECT: "Today's news", "source": "out-1", "sending_ip": "127.0.0.10",
           "site": f"example{n % 50}.net", "outbound_tls": "1"}
    out.update(recipient=inj["rcpts"][0], remote_host=f"mx.example{n % 50}.net",
               remote_ip="127.0.0.20",
               response={"code": 250, "enhanced": "2.0.0",
                         "text": f"Ok: queued as {n:X}"},
               attempt=1, time_in_queue=0.35)
    out["type"] = ev.DELIVERY
    return out


class Rig:
    """A spool shard's store (the writer) and the events process (the reader)."""

    def __init__(self, e2e: bool = False, harness: bool = False):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-events-", dir=base)
        cfg = msgspec.convert({
            "server": {"state_dir": self.tmp.name, "hostname": "bench.example"},
            "spool": {"shards": 1, "fsync": False},
        }, Config)
        self.settings = s = resolve(cfg, None)
        self.store = Store(shard_dir(s.spool_dir, 0), cfg.spool.segment_size, False,
                           events=True)
        self.events = None if harness else Events(s)
        self.e2e = e2e
        self.n = 0              # messages injected

    def _record(self, i: int) -> list[dict]:
        """The internal events of the *i*-th record of a round."""
        if self.e2e and i % 2:
            # (the deliveries of the messages of the record before: a job's outcome
            # comes back in a later group commit than its injection)
            first = self.n - RECORD_EVENTS
            return [delivery(m) for m in range(first, self.n)]
        first = self.n
        self.n += RECORD_EVENTS
        return [injection(m) for m in range(first, self.n)]

    def round(self) -> int:
        """ROUND_RECORDS records written, then one step of the events process; events made."""
        store = self.store
        for i in range(ROUND_RECORDS):
            store.write([], [], None, ev.encode(self._record(i)))
            store.sync()
        if self.events is None:
            return 0
        e = self.events
        before = e.published.value
        while e.step():
            pass
        return e.published.value - before

    def close(self) -> None:
        if self.events is not None:
            self.events.checkpoint()
            self.events.close()
        self.store.close()
        self.tmp.cleanup()


def test_events_http_injection(benchmark):
    benchmark.group = (f"events: one step of {ROUND_RECORDS} records x {RECORD_EVENTS} "
                       "HTTP injection events")
    rig = Rig()
    try:
        got = benchmark(rig.round)
        assert got == ROUND_RECORDS * RECORD_EVENTS
    finally:
        rig.close()


def test_events_end_to_end(benchmark):
    benchmark.group = (f"events: one step of {ROUND_RECORDS} records x {RECORD_EVENTS} "
                       "injection and delivery events")
    rig = Rig(e2e=True)
    try:
        got = benchmark(rig.round)
        assert got == ROUND_RECORDS * RECORD_EVENTS
    finally:
        rig.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000,
                    help="internal events to write and publish (rounded to whole rounds)")
    ap.add_argument("--e2e", action="store_true", help="injection and delivery events")
    ap.add_argument("--harness", action="store_true", help="write the records only")
    args = ap.parse_args()
    rig = Rig(args.e2e, args.harness)
    per_round = ROUND_RECORDS * RECORD_EVENTS
    for _ in range(4):
        rig.round()        # warm: the store made, the segment mapped
    gc.collect()
    rounds = max(1, args.events // per_round)
    published = 0
    c0 = time.process_time()
    for _ in range(rounds):
        published += rig.round()
    cpu = time.process_time() - c0
    n = rounds * per_round
    print(f"events={n} published={published} rounds={rounds} "
          f"cpu_us_per_event={cpu / n * 1e6:.2f}")
    rig.close()


if __name__ == "__main__":
    main()
