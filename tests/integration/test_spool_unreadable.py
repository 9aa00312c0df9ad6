"""Poison pills in the spool (the real daemon, loopback only).

A record of a shard's segment files that passes its checksum but cannot be read -- not
the struct its type says, a time no clock reads -- was raised by the shard's recovery: the
shard died, was restarted, read the same record and died again, and the node answered 451
for every message of that shard for good.  Now the record is logged with its place,
counted (mta_spool_skipped_records_total{reason="unreadable"}) and passed over: every
message before and behind it is delivered, and the shard does not restart.  So is a
file in a shard's directory whose name ends in .seg but is no segment number.
"""
from __future__ import annotations

import os
import time

import msgspec
import pytest

from daemon import wait_until
from mta import store as store_mod
from mta.queueid import new_qid_for_shard
from mta.store import MessageMeta, Store, shard_dir
from sinks import AioSink, common_port


@pytest.fixture
def sink():
    port = common_port(["127.0.0.1"])
    s = AioSink("127.0.0.1", port).start()
    yield s
    s.stop()


def put_raw(st: Store, rtype: int, mb: bytes, bd: bytes = b"") -> None:
    """One batch of one record, framed and checksummed as the shard frames its own."""
    seg = st._writable()
    hdr = st.codec.encode_header(rtype, mb, bd, seg.number)
    cm = store_mod._COMMIT.pack(seg.size, 1)
    commit = st.codec.encode_header(store_mod.REC_COMMIT, cm, b"", seg.number)
    st._append(seg, [hdr, mb, bd, commit, cm],
               seg.size + len(hdr) + len(mb) + len(bd) + len(commit) + len(cm))
    st.sync()


def skipped(d, reason: str) -> float | None:
    return d.metric("mta_spool_skipped_records_total", shard="0", reason=reason)


def test_an_unreadable_record_is_passed_over_and_the_shard_goes_on(make_daemon, sink):
    d = make_daemon(acceptors=1, shards=1, delivery={
        "hold": True, "processes": 1,
        "route": [{"domain": "*", "hosts": [f"127.0.0.1:{sink.port}"], "starttls": "none"}]})
    before = [d.send("a@sender.test", [f"before{i}@dest.test"], b"Subject: b\r\n\r\nx\r\n")
              for i in range(3)]
    assert d.stop() == 0
    st = Store(shard_dir(os.path.join(d.state_dir, "spool"), 0), 4 << 20, fsync=True,
               events=True)
    st.recover()
    enc = msgspec.msgpack.encode
    # a message record that is not a message (its recipients are not addresses) ...
    put_raw(st, store_mod.REC_MESSAGE,
            enc([new_qid_for_shard(0, 1), "a@sender.test", [5], time.time(), {}, "c"]),
            b"Subject: odd\r\n\r\nodd\r\n")
    # ... a copy of a queued message (as compaction writes one) whose first recipient is
    # in a state no version writes (`mta queue list` ended the shard over it; then it was
    # passed over; now taken, that recipient pending: test_spool_mended) ...
    put_raw(st, store_mod.REC_MESSAGE,
            enc([before[1], "a@sender.test", ["before1@dest.test"], time.time(), {}, "c",
                 [9], [0], [time.time()]]), b"Subject: b\r\n\r\nx\r\n")
    # ... a recipient update due at no time (infinity: the shard's loop could not wait
    # for it) -- the update is skipped, the message delivered ...
    put_raw(st, store_mod.REC_RCPT, enc([before[0], [[0, 0, 1, float("inf")]]]))
    # ... and a message behind them, as the shard writes one
    behind = new_qid_for_shard(0, 1)
    new = st.write([(MessageMeta(behind, "a@sender.test", ["behind@dest.test"], time.time(),
                                 {}, "client.test [127.0.0.1]"),
                     b"Subject: behind\r\n\r\nbehind\r\n")], [])
    st.sync()
    st.commit(new, [])
    st.close()
    # and a file that is no segment (a copy an operator left): int() of its name ended
    # the shard at every start
    with open(os.path.join(st.dir, "backup-1.seg"), "wb") as fh:
        fh.write(b"x" * 100)
    d.sections["delivery"]["hold"] = False
    d.write_config()
    d.start()
    wait_until(lambda: "spool[0]" in d.children(), 20, "the shard")
    shard_pid = d.children()["spool[0]"]
    d.send("a@sender.test", ["after@dest.test"], b"Subject: a\r\n\r\nafter\r\n")
    want = {"before0@dest.test", "before1@dest.test", "before2@dest.test",
            "behind@dest.test", "after@dest.test"}
    wait_until(lambda: {r for t in sink.txns for r in t.rcpt_tos} >= want, 30,
               "every message delivered")
    d.wait_log(r"segment \S+/shard-00/\d+\.seg: the message record at offset \d+ cannot be "
               r"read \(ValidationError: .*\); passed over")
    d.wait_log(r"recovered queue: messages=4 .* unreadable_records=1 mended_records=1 ")
    d.wait_log(r"shard-00/backup-1\.seg: not a segment file \(its name is not a number\); "
               r"ignored")
    assert d.cli("queue", "list").returncode == 0
    assert d.children()["spool[0]"] == shard_pid, "the shard restarted"
    assert skipped(d, "unreadable") == 1 and skipped(d, "damaged") == 0
    assert "Traceback" not in d.log(since_start=True)
