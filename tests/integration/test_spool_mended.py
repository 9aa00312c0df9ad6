"""Messages whose times were damaged on disk are mended, not passed over (the real daemon,
loopback only).

A message record whose checksum holds but whose arrival time is none a clock reads (NaN,
infinite, beyond the year 5138, far before 1970) was passed over whole by the shard's
recovery: logged and counted as unreadable, and then nothing -- its recipients were never
delivered, bounced nor reported, though the message had been acknowledged.  Its queue id,
sender and recipients are still there to read: the recovery now takes it with its times
mended (the arrival from its queue id, which holds the time it was taken), logs it,
counts it in mta_spool_mended_records_total{reason="time"}, and it goes as any other.

The damage is made the way it can reach a record whose checksum still holds -- a writer's
bug or memory damaged before the checksum was computed: the record's arrival field is
rewritten in place and its header (the CRC) computed again.  (Octets damaged after the
checksum fail it: a damaged record, which is another matter.)
"""
from __future__ import annotations

import datetime
import os
import time

import msgspec
import pytest

from daemon import wait_until
from mta import native
from mta import store as store_mod
from mta.queueid import new_qid_for_shard
from mta.store import Store, shard_dir
from sinks import AioSink, common_port
from test_spool_unreadable import put_raw


@pytest.fixture
def sink():
    port = common_port(["127.0.0.1"])
    s = AioSink("127.0.0.1", port).start()
    yield s
    s.stop()


def damage_field(spool_dir: str, qid: str, field: int, value) -> None:
    """Rewrite field *field* of *qid*'s message record (MessageMeta's array) with *value*
    (a float: the record keeps its length) and give the record a checksum that holds."""
    st = Store(shard_dir(spool_dir, 0), 4 << 20, fsync=False)
    st.recover()
    seg, moff, mlen, blen = st.index.location(qid)
    path = st.segments[seg].path
    st.close()
    with open(path, "r+b") as f:
        f.seek(moff)
        data = f.read(mlen + blen)
        meta, body = data[:mlen], data[mlen:]
        fields = msgspec.msgpack.decode(meta)
        assert fields[0] == qid
        fields[field] = value
        new = msgspec.msgpack.encode(fields)
        assert len(new) == mlen
        codec = native.load("record")
        header = codec.encode_header(store_mod.REC_MESSAGE, new, body, seg)
        f.seek(moff - codec.HEADER_SIZE)
        f.write(header + new)
        os.fsync(f.fileno())


def mended(d, reason: str = "time") -> float | None:
    return d.metric("mta_spool_mended_records_total", shard="0", reason=reason)


def when(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["injection_time"].replace("Z", "+00:00")) \
        .timestamp()


ARRIVAL = 3         # MessageMeta: qid, sender, rcpts, arrival, params, client, ...


def test_a_message_with_its_arrival_damaged_is_delivered_and_reported(make_daemon, sink):
    d = make_daemon(acceptors=1, shards=1, delivery={
        "hold": True, "processes": 1,
        "route": [{"domain": "*", "hosts": [f"127.0.0.1:{sink.port}"], "starttls": "none"}]})
    garbage = {"nan": float("nan"), "inf": float("inf"), "year-99999": 3e12,
               "before-1970": -5e11,
               # within MAX_TIME, but no clock read them: expired at once without an
               # attempt; every due time of the shard stepped back by centuries
               "minus-one": -1.0, "two-years-ahead": time.time() + 2 * 365 * 86400.0}
    qids = {name: d.send("a@sender.test", [f"{name}@dest.test"],
                         f"Subject: {name}\r\n\r\n{name}\r\n".encode())
            for name in [*garbage, "intact"]}
    assert d.stop() == 0
    spool = os.path.join(d.state_dir, "spool")
    for name, value in garbage.items():
        damage_field(spool, qids[name], ARRIVAL, value)
    d.sections["delivery"]["hold"] = False
    d.write_config()
    d.start()
    want = {f"{name}@dest.test" for name in qids}
    wait_until(lambda: {r for t in sink.txns for r in t.rcpt_tos} >= want, 30,
               "every message delivered")
    delivered = {}
    wait_until(lambda: delivered.update(
        (e["queue_id"], e) for e in d.events() if e.get("type") == "delivery") or
        set(delivered) >= set(qids.values()), 30, "a delivery event for every message")
    for name in garbage:
        # its arrival is the time its queue id was made (the intact one's, near enough)
        assert abs(when(delivered[qids[name]]) - when(delivered[qids["intact"]])) < 60, \
            delivered[qids[name]]
    d.wait_log(r"segment \S+/shard-00/\d+\.seg: the message record at offset \d+ has a "
               r"time out of range \(arrival\); mended", count=len(garbage))
    d.wait_log(rf"recovered queue: messages={len(qids)} .* unreadable_records=0 "
               rf"mended_records={len(garbage)} ")
    assert "the clock is behind the spool" not in d.log(since_start=True)
    assert mended(d) == len(garbage)
    assert "Traceback" not in d.log(since_start=True)
    assert d.stop() == 0
    assert d.spool_dump() == []


def test_a_compaction_copy_with_its_progress_damaged_is_delivered(make_daemon, sink):
    """A compaction copy -- once its old segment is gone, the message's only record --
    whose recipients' progress is out of range (a state no version writes, attempts beyond
    64 bits, flags beyond a byte) was passed over whole: none of its recipients was ever
    delivered.  Now the recipient whose state is unknown is pending and delivered, the one
    the copy says was delivered is not sent again, and the record is counted as mended."""
    d = make_daemon(acceptors=1, shards=1, delivery={
        "hold": True, "processes": 1,
        "route": [{"domain": "*", "hosts": [f"127.0.0.1:{sink.port}"], "starttls": "none"}]})
    intact = d.send("a@sender.test", ["intact@dest.test"], b"Subject: i\r\n\r\ni\r\n")
    assert d.stop() == 0
    st = Store(shard_dir(os.path.join(d.state_dir, "spool"), 0), 4 << 20, fsync=True,
               events=True)
    st.recover()
    copy = new_qid_for_shard(0, 1)
    now = time.time()
    put_raw(st, store_mod.REC_MESSAGE, msgspec.msgpack.encode(
        [copy, "a@sender.test", ["done@dest.test", "unknown@dest.test", "huge@dest.test"],
         now, {}, "client.test [127.0.0.1]", [store_mod.DELIVERED, 9, 0], [1, 0, 2**64 - 1],
         [now] * 3, [0, 300, 0]]), b"Subject: copy\r\n\r\ncopy\r\n")
    st.close()
    d.sections["delivery"]["hold"] = False
    d.write_config()
    d.start()
    want = {"intact@dest.test", "unknown@dest.test", "huge@dest.test"}
    wait_until(lambda: {r for t in sink.txns for r in t.rcpt_tos} >= want, 30,
               "every pending recipient delivered")
    wait_until(lambda: {(e["queue_id"], e["rcpt_to"]) for e in d.events()
                        if e.get("type") == "delivery"} >=
               {(intact, "intact@dest.test"), (copy, "unknown@dest.test"),
                (copy, "huge@dest.test")}, 30, "their delivery events")
    d.wait_log(r"the message record at offset \d+ has its recipients' progress out of range "
               r"\(state, attempts, flags\); mended: " + copy)
    d.wait_log(r"recovered queue: messages=2 .* unreadable_records=0 mended_records=1 ")
    assert "done@dest.test" not in {r for t in sink.txns for r in t.rcpt_tos}
    assert mended(d, "progress") == 1
    assert "Traceback" not in d.log(since_start=True)


def test_messages_of_a_batch_damaged_after_its_sync_are_delivered(make_daemon, sink):
    """A batch of a segment damaged after it was synced (one octet of its events record:
    say, a media error) made the recovery drop the whole batch -- the message it held,
    acknowledged with a 250, was never delivered, bounced nor reported.  A later batch of
    the same segment shows it was synced: its intact message record is taken now."""
    d = make_daemon(acceptors=1, shards=1, delivery={
        "hold": True, "processes": 1,
        "route": [{"domain": "*", "hosts": [f"127.0.0.1:{sink.port}"], "starttls": "none"}]})
    qids = [d.send("a@sender.test", [f"m{i}@dest.test"], f"Subject: {i}\r\n\r\n{i}\r\n".encode())
            for i in range(3)]
    assert d.stop() == 0
    st = Store(shard_dir(os.path.join(d.state_dir, "spool"), 0), 4 << 20, fsync=False)
    st.recover()
    seg, moff, _, _ = st.index.location(qids[1])
    path = st.segments[seg].path
    st.close()
    codec = native.load("record")
    data = bytearray(open(path, "rb").read())
    off, events_at = 0, None
    while True:       # the REC_EVENTS record that begins the batch of the second message
        status, rtype, _, boff, blen, nxt = codec.decode(data, off, segment=seg)
        assert status == codec.OK
        if rtype == store_mod.REC_EVENTS:
            events_at = off
        if rtype == store_mod.REC_MESSAGE and off + codec.HEADER_SIZE == moff:
            break
        off = nxt
    data[events_at + codec.HEADER_SIZE + 2] ^= 0x20
    with open(path, "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    d.sections["delivery"]["hold"] = False
    d.write_config()
    d.start()
    want = {f"m{i}@dest.test" for i in range(3)}
    wait_until(lambda: {r for t in sink.txns for r in t.rcpt_tos} >= want, 30,
               "every message delivered")
    wait_until(lambda: {e["queue_id"] for e in d.events() if e.get("type") == "delivery"}
               >= set(qids), 30, "their delivery events")
    d.wait_log(r"1 message record\(s\) of a batch damaged after it was synced \(a whole "
               r"batch follows it\) are taken")
    d.wait_log(r"recovered queue: messages=3 .* mended_records=1 ")
    assert mended(d, "batch") == 1
    assert "Traceback" not in d.log(since_start=True)


def test_a_message_whose_client_is_no_text_is_delivered(make_daemon, sink):
    """A message record whose client (where it came from) is no text was passed over whole:
    acknowledged, never delivered.  It is taken with the client unknown."""
    d = make_daemon(acceptors=1, shards=1, delivery={
        "hold": True, "processes": 1,
        "route": [{"domain": "*", "hosts": [f"127.0.0.1:{sink.port}"], "starttls": "none"}]})
    d.send("a@sender.test", ["intact@dest.test"], b"Subject: i\r\n\r\ni\r\n")
    assert d.stop() == 0
    st = Store(shard_dir(os.path.join(d.state_dir, "spool"), 0), 4 << 20, fsync=True,
               events=True)
    st.recover()
    odd = new_qid_for_shard(0, 1)
    put_raw(st, store_mod.REC_MESSAGE, msgspec.msgpack.encode(
        [odd, "a@sender.test", ["odd@dest.test"], time.time(), {}, 5]),
        b"Subject: odd\r\n\r\nodd\r\n")
    st.close()
    d.sections["delivery"]["hold"] = False
    d.write_config()
    d.start()
    wait_until(lambda: {r for t in sink.txns for r in t.rcpt_tos} >=
               {"intact@dest.test", "odd@dest.test"}, 30, "both delivered")
    wait_until(lambda: odd in {e["queue_id"] for e in d.events()
                               if e.get("type") == "delivery"}, 30, "its delivery event")
    d.wait_log(r"has its client out of range \(client\); mended: " + odd)
    assert mended(d, "client") == 1
    assert "Traceback" not in d.log(since_start=True)
