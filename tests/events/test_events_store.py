"""The events store (mta.feedback.events_store) in-process: append, dedupe, read, query, prune."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mta.feedback import events_store as S

T0 = 1_700_000_000          # a fixed Unix time (2023-11-14T22:13:20Z)
MAP = 64 * 1024 * 1024


def ev(i: int, **kw) -> dict:
    e = {"type": "delivery", "event_id": str(10_000 + i), "timestamp": str(T0 + i),
         "message_id": "m%04d" % i, "transmission_id": "t%d" % (i // 10),
         "rcpt_to": "user%d@example.com" % (i % 7), "raw_rcpt_to": "User%d@example.com" % (i % 7),
         "recipient_domain": "example.com", "campaign_id": "spring-sale",
         "friendly_from": "news@sender.example.org", "subject": "Hello there",
         "ip_pool": "default", "sending_ip": "127.0.0.1"}
    e.update(kw)
    return e


@pytest.fixture
def store(tmp_path):
    s = S.EventStore(str(tmp_path / "events"), map_size=MAP, retention=10 * 86400)
    yield s
    s.close()


def ids(events) -> list[str]:
    return [e["event_id"] for e in events]


def test_append_assigns_seq_skips_replays_and_reads_in_order(store):
    assert store.last_seq() == 0
    assert store.append([ev(i) for i in range(5)]) == 5
    # a replay after a crash: the same event ids again, plus one new
    assert store.append([ev(3), ev(4), ev(5)]) == 6
    assert store.count() == 6
    got = store.read(0, 100)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert ids(e for _, e in got) == [str(10_000 + i) for i in range(6)]
    assert got[0][1] == ev(0)              # stored as given
    assert [s for s, _ in store.read(4, 1)] == [5]
    assert store.read(6, 10) == []
    store.sync()


def test_duplicates_within_one_batch_are_stored_once(store):
    assert store.append([ev(1), ev(1), ev(2)]) == 2
    assert store.count() == 2


def test_query_newest_first_with_paging_and_total(store):
    store.append([ev(i) for i in range(50)])
    page, nxt, total = store.query({}, None, 20, start=T0, end=T0 + 100)
    assert total == 50
    assert ids(page) == [str(10_000 + i) for i in range(49, 29, -1)]
    assert page[0]["_ts"] == (T0 + 49) * 1000
    # new events arriving between pages do not move the cursor
    store.append([ev(i) for i in range(50, 60)])
    page2, nxt2, total2 = store.query({}, nxt, 20, start=T0, end=T0 + 50)
    assert ids(page2) == [str(10_000 + i) for i in range(29, 9, -1)]
    assert total2 == 50
    page3, nxt3, _ = store.query({}, nxt2, 20, start=T0, end=T0 + 50)
    assert ids(page3) == [str(10_000 + i) for i in range(9, -1, -1)]
    assert nxt3 is None


def test_time_range_is_from_inclusive_to_exclusive(store):
    store.append([ev(i) for i in range(10)])
    page, _, total = store.query({}, None, 100, start=T0 + 2, end=T0 + 5)
    assert ids(page) == ["10004", "10003", "10002"] and total == 3


def test_total_from_minute_counters_spanning_many_minutes(store):
    # one event every 7 seconds for 2 hours; three types
    types = ["delivery", "injection", "bounce"]
    store.append([ev(i * 7, type=types[i % 3], event_id=str(i)) for i in range(1000)])
    for start, end in [(T0 + 5, T0 + 6000), (T0, T0 + 7 * 1000), (T0 + 61, T0 + 119)]:
        want = [i for i in range(1000) if start <= T0 + i * 7 < end]
        page, _, total = store.query({}, None, 10, start=start, end=end)
        assert total == len(want)
        assert ids(page) == [str(i) for i in reversed(want)][:10]
        page, _, total = store.query({"events": ["bounce", "injection"]}, None, 5000,
                                     start=start, end=end)
        wb = [i for i in want if i % 3 != 0]
        assert total == len(wb) and ids(page) == [str(i) for i in reversed(wb)]
        # counted indexes: campaign tokens, transmissions, bounce classes
        page, _, total = store.query({"campaigns": ["sale"]}, None, 3, start=start, end=end)
        assert total == len(want) and ids(page) == [str(i) for i in reversed(want)][:3]
        page, _, total = store.query({"transmissions": ["t5", "t7"]}, None, 3,
                                     start=start, end=end)
        wt = [i for i in want if (i * 7) // 10 in (5, 7)]
        assert total == len(wt) and ids(page) == [str(i) for i in reversed(wt)][:3]
    # the counters follow a prune
    store.retention = 3000
    store.prune(T0 + 6000, keep_from_seq=10**9)
    _, _, total = store.query({"campaigns": ["sale"]}, None, 3, start=T0, end=T0 + 7000)
    assert total == len([i for i in range(1000) if i * 7 >= 3000])


def test_indexed_filters(store):
    evs = [ev(i) for i in range(70)]
    evs[10].update(type="bounce", bounce_class="10", campaign_id="blackfriday-specials")
    evs[11].update(type="bounce", bounce_class="25", campaign_id="Black Friday")
    evs[12].update(campaign_id="friday_blackfriday")
    store.append(evs)

    def q(**f):
        page, _, total = store.query(f, None, 1000, start=T0, end=T0 + 1000)
        assert total == len(page)
        return sorted(int(e["event_id"]) - 10_000 for e in page)

    assert q(recipients=["USER3@example.com"]) == [i for i in range(70) if i % 7 == 3]
    assert q(recipients=["user3@example.com", "user4@example.com"]) == \
        [i for i in range(70) if i % 7 in (3, 4)]
    assert q(messages=["m0005"]) == [5]
    assert q(transmissions=["t2", "t3"]) == list(range(20, 40))
    assert q(bounce_classes=["10"]) == [10]
    assert q(events=["bounce"]) == [10, 11]
    # keyword match: whole tokens, not substrings
    assert q(campaigns=["blackfriday"]) == [10, 12]
    assert q(campaigns=["friday"]) == [11, 12]
    assert q(campaigns=["black friday"]) == [11]
    assert q(campaigns=["fri"]) == []
    assert q(campaigns=["sale"]) == [i for i in range(70) if i not in (10, 11, 12)]
    # filters combined: AND across, OR within
    assert q(recipients=["user3@example.com"], events=["delivery"], transmissions=["t1"]) == [17]
    assert q(event_ids=["10005", "10006"]) == [5, 6]


def test_unindexed_filters(store):
    evs = [ev(i) for i in range(20)]
    evs[3].update(subject="Your March newsletter", recipient_domain="mail.example.net",
                  ip_pool="bulk-pool", sending_ip="127.0.0.9", reason="550 5.1.1 no such user",
                  friendly_from="Other@Sender.example.org", subaccount_id="7",
                  template_id="welcome_v2")
    store.append(evs)

    def q(**f):
        page, _, total = store.query(f, None, 1000, start=T0, end=T0 + 1000)
        assert total == len(page)
        return sorted(int(e["event_id"]) - 10_000 for e in page)

    assert q(subjects=["march"]) == [3]
    assert q(subjects=["mar"]) == []
    assert q(recipient_domains=["example"]) == list(range(20))
    assert q(recipient_domains=["net"]) == [3]
    assert q(sending_domains=["sender.example.org"]) == list(range(20))
    assert q(ip_pools=["bulk"]) == [3]
    assert q(sending_ips=["127.0.0.9"]) == [3]
    assert q(reasons=["5.1.1"]) == [3]
    assert q(reasons=["5.1"]) == []          # . does not split outside domains
    assert q(reasons=["no such"]) == [3]
    assert q(from_addresses=["other@sender.example.org"]) == [3]
    assert q(subaccounts=["7"]) == [3]
    assert q(templates=["welcome"]) == [3]


def test_bad_cursor_and_unknown_filter(store):
    with pytest.raises(S.BadCursor):
        store.query({}, "not-a-cursor", 10)
    with pytest.raises(ValueError):
        store.query({"colour": ["red"]}, None, 10)


def test_max_scan_bounds_a_query_and_the_cursor_goes_on(store):
    evs = [ev(i, subject="x") for i in range(3000)]
    evs[500]["subject"] = "y"
    store.append(evs)
    # past the budget the page is short, total is a floor, and the cursor goes on
    page, nxt, total = store.query({"subjects": ["y"]}, None, 10, start=T0, end=T0 + 5000,
                                   max_scan=1000)
    assert page == [] and nxt is not None and total == 0
    found = []
    for _ in range(10):
        page, nxt, total = store.query({"subjects": ["y"]}, nxt, 10, start=T0, end=T0 + 5000,
                                       max_scan=1000)
        found += ids(page)
        if nxt is None:
            break
    assert found == ["10500"] and nxt is None
    # with enough budget, one page and the exact total
    page, nxt, total = store.query({"subjects": ["y"]}, None, 10, start=T0, end=T0 + 5000)
    assert ids(page) == ["10500"] and nxt is None and total == 1


def test_prune_keeps_retention_and_unconsumed_events(store):
    store.append([ev(i) for i in range(100)])
    s = store
    s.retention = 50
    # now = T0 + 100: events before T0 + 50 are past the retention;
    # a webhook has consumed up to seq 30 (keep_from_seq 31)
    n = s.prune(T0 + 100, keep_from_seq=31, chunk=7)
    assert n == 30
    assert s.count() == 70
    left = [int(e["event_id"]) - 10_000 for _, e in s.read(0, 1000)]
    assert left == list(range(30, 100))
    # the indexes and counters follow
    page, _, total = s.query({"recipients": ["user0@example.com"]}, None, 100,
                             start=0, end=T0 + 1000)
    assert sorted(int(e["event_id"]) - 10_000 for e in page) == [i for i in range(30, 100)
                                                                 if i % 7 == 0]
    _, _, total = s.query({}, None, 1, start=0, end=T0 + 1000)
    assert total == 70
    _, _, total = s.query({"event_ids": ["10005"]}, None, 1, start=0, end=T0 + 1000)
    assert total == 0
    # consumed: the rest past the retention goes
    assert s.prune(T0 + 100, keep_from_seq=10**9) == 20
    assert s.count() == 50
    assert s.last_seq() == 100
    # a replayed event that was pruned is stored again, with a new seq
    assert s.append([ev(0)]) == 101


def _entries(store, db) -> list:
    with store.env.begin(db=db) as txn:
        return list(txn.cursor().iternext())


INDEXES = ("rcpt", "msg", "tx", "camp", "bcls", "type", "mid")


def _implied(store) -> tuple[dict, list, dict]:
    """The index entries, time entries and counters the stored events imply through
    _index_keys (what prune deletes), each event at the time and seq it was stored with."""
    idx: dict[str, list] = {n: [] for n in INDEXES}
    times = []
    counts: dict[bytes, int] = {}
    for seq, raw in _entries(store, store.ev):
        tk = raw[:8] + seq
        e = S._dec.decode(raw[8:])
        times.append((tk, S._key(e.get("type") or "")))
        minute = S._MIN.pack(S._U64.unpack(tk[:8])[0] // 60000)
        prefixes = [S._ALL]
        for n, k in store._index_keys(e):
            idx[n].append((k, tk))
            if n in S.COUNTED:
                prefixes.append(S._counter(n, k))
        for ck in prefixes:
            counts[ck + minute] = counts.get(ck + minute, 0) + 1
    return {n: sorted(v) for n, v in idx.items()}, sorted(times), counts


def test_append_writes_exactly_the_keys_prune_finds(store):
    """append makes its index keys and counters itself (a fast path with caches); prune
    finds them again from the stored event (_index_keys).  Every index entry, time entry
    and counter must be what _index_keys implies -- none missing, none different -- for
    odd values too, over two appends (the caches warm), and a prune of everything must
    leave nothing behind."""
    first = [
        ev(0),
        ev(1, type="injection", message_id_header=" <Abc.1@Example.COM> "),
        ev(2, type="injection", message_id_header=""),                     # no mid key
        ev(3, type="bounce", bounce_class="10", campaign_id="Spring Sale - 2026 a b c"),
        ev(4, type="bounce", bounce_class=10),             # a number: the key "10" as well
        ev(5, type="delay", bounce_class=True, transmission_id=77),
        ev(6, type="", campaign_id=""),                     # no type or campaign keys
        ev(7, timestamp=T0 + 7.5, transmission_id="t0"),    # a number of seconds
        ev(8, timestamp="2023-11-14T22:14:28Z", rcpt_to="", message_id=""),
        ev(9, type="spam_complaint", campaign_id=["not", "a", "string"]),
        ev(10, bounce_class=["unhashable"]),
        ev(11, type=0, transmission_id=True),               # falsy but present: indexed
        ev(12, type=False, transmission_id=1),              # 1 == True, another key
        # equal values that print differently: each keeps its own key
        ev(13, type=0.0, bounce_class=0.0, transmission_id=[1]),
        ev(14, type=-0.0, bounce_class=-0.0, transmission_id=[True]),
        ev(15, type=[1], transmission_id={"a": 1}),
        ev(16, type=[True], transmission_id={"a": 1.0}),
        ev(17, timestamp=T0 + 3 * 60),                      # another minute
    ] + [ev(18 + i, transmission_id="t-shared") for i in range(5)]
    second = [ev(1), ev(3)] + [                             # two replays, then the same
        ev(100 + i, **{k: v for k, v in e.items() if k not in ("event_id", "timestamp")})
        for i, e in enumerate(first)]                        # values with the caches warm
    assert store.append(first) == len(first)
    assert store.append(second) == 2 * len(first)
    idx, times, counts = _implied(store)
    assert all(idx[n] for n in INDEXES)                      # every index has keys
    for n in INDEXES:
        assert _entries(store, store.idx[n]) == idx[n], n
    assert _entries(store, store.time) == times
    assert {k: S._U64.unpack(v)[0] for k, v in _entries(store, store.count_db)} == counts
    assert store.prune(T0 + 10**6, keep_from_seq=10**9) == 2 * len(first)
    for n in INDEXES:
        assert _entries(store, store.idx[n]) == [], n
    for db in (store.count_db, store.ids, store.time, store.ev):
        assert _entries(store, db) == []


def test_store_full_is_an_exception_and_prune_frees_space(tmp_path):
    s = S.EventStore(str(tmp_path / "small"), map_size=2 * 1024 * 1024, retention=10 * 86400)
    try:
        big = "x" * 2000
        with pytest.raises(S.StoreFull):
            for i in range(0, 100000, 100):
                s.append([ev(j, subject=big) for j in range(i, i + 100)])
        n = s.count()
        assert n > 0
        # nearly full: prune deletes the oldest even within the retention
        assert s.prune(T0, keep_from_seq=10**9) > 0
        assert s.count() < n
        s.append([ev(10**6, subject=big)])
    finally:
        s.close()


def test_readonly_reader_in_another_process_sees_synced_events(store, tmp_path):
    store.append([ev(i) for i in range(3)])
    store.sync()
    code = ("import sys; from mta.feedback.events_store import EventStore;"
            "s = EventStore(sys.argv[1], map_size=1 << 20, retention=1, readonly=True);"
            "print(s.last_seq(), [e['event_id'] for e in s.query({}, None, 10)[0]])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "events")],
                       capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "['10002',", "'10001',", "'10000']"]


def test_readonly_before_creation_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        S.EventStore(str(tmp_path / "none"), map_size=MAP, retention=1, readonly=True)


def test_iso_and_event_time():
    assert S.iso(1460989507000) == "2016-04-18T14:25:07.000+00:00"
    assert S.iso(1460989507123) == "2016-04-18T14:25:07.123+00:00"
    assert S.event_time({"timestamp": "1460989507"}) == 1460989507000
    assert S.event_time({"timestamp": 1460989507.5}) == 1460989507500
    assert S.event_time({"timestamp": "2016-04-18T14:25:07.000+00:00"}) == 1460989507000
    assert S.event_time({"timestamp": "-5"}) == 0 == S.event_time({"timestamp": -5})
    # not a time: now
    for ts in ("inf", "-inf", "nan", "1e400", "1e20", float("inf"), float("nan"), 1e300,
               10**17, None, "", "soon", True, [1]):
        assert S.event_time({"timestamp": ts}, now=T0) == T0 * 1000, ts


def test_a_timestamp_that_is_no_time_does_not_fail_the_batch(store):
    """Such a value (NaN, infinity, beyond year 9999) is stored at the time of the append,
    like a missing one: the events beside it are stored, nothing raises (the events
    process would otherwise fail on the same record after every restart)."""
    odd = ["inf", "1e400", "nan", float("inf"), 1e300, 10**17, "-inf"]
    before = time.time()
    assert store.append([ev(i, timestamp=ts) for i, ts in enumerate(odd)] + [ev(99)]) == 8
    after = time.time()
    stored = [raw for _, raw in _entries(store, store.ev)]
    times = [S._U64.unpack(raw[:8])[0] for raw in stored]
    assert all(int(before * 1000) <= t <= int(after * 1000) + 1 for t in times[:-1])
    assert times[-1] == (T0 + 99) * 1000


def test_originals_finds_a_message_by_queue_id_or_by_its_message_id_header(store):
    """A report's original message: by the queue id (VERP) first, else by the Message-ID
    header of its injection (any case, angle brackets or not); newest message first."""
    store.append([
        ev(1, type="injection", message_id="00aa", message_id_header="<Orig-1@Sender.test>"),
        ev(2, type="delivery", message_id="00aa", message_id_header="<Orig-1@Sender.test>"),
        ev(3, type="injection", message_id="00bb", message_id_header="<orig-2@sender.test>"),
        # a delivery's header is not indexed: only injections are
        ev(4, type="delivery", message_id="00cc", message_id_header="<only-dlv@sender.test>"),
        # the same Message-ID used again later: the newer message is found
        ev(5, type="injection", message_id="00dd", message_id_header="<orig-2@sender.test>"),
    ])
    assert sorted(e["type"] for e in store.originals(message_id="orig-1@sender.test")) == \
        ["delivery", "injection"]
    assert {e["message_id"] for e in store.originals(message_id="<ORIG-1@sender.test>")} == \
        {"00aa"}
    assert {e["message_id"] for e in store.originals(message_id="orig-2@sender.test")} == \
        {"00dd"}
    assert store.originals(message_id="only-dlv@sender.test") == []
    assert {e["message_id"] for e in store.originals(queue_ids=["00BB"],
                                                    message_id="orig-1@sender.test")} == {"00bb"}
    # a queue id with no events falls back to the Message-ID
    assert {e["message_id"] for e in store.originals(queue_ids=["ffff"],
                                                    message_id="orig-1@sender.test")} == {"00aa"}
    assert store.originals(message_id="") == [] and store.originals(queue_ids=["ffff"]) == []
    # pruned injections leave nothing behind in the index
    store.prune(T0 + 10 * 86400 + 100, 10 ** 9)
    assert store.originals(message_id="orig-1@sender.test") == []
    with store.env.begin() as txn:
        assert txn.stat(store.idx["mid"])["entries"] == 0


def test_the_writer_and_the_readers_open_the_same_directory(tmp_path):
    """An empty store_path: the events process (open_sink) wrote <state_dir>/events-store
    while the readers (open_for) opened <state_dir> and found no store."""
    import types

    from mta.events.main import open_sink
    cfg = types.SimpleNamespace(store=True, store_path="", store_max_size=MAP,
                                retention=86400.0)
    settings = types.SimpleNamespace(state_dir=str(tmp_path),
                                     config=types.SimpleNamespace(events=cfg))
    w = open_sink(settings)
    try:
        w.append([ev(1)])
        w.sync()
        wpath = w.path
    finally:
        w.close()          # (LMDB: one handle on an environment per process)
    r = S.open_for(settings, readonly=True)
    try:
        assert r.path == wpath != str(tmp_path)
        assert [e["event_id"] for _, e in r.read(0, 10)] == ["10001"]
    finally:
        r.close()


def _sink_settings(tmp_path):
    """The settings open_sink reads: an events store in *tmp_path*."""
    import types
    cfg = types.SimpleNamespace(store=True, store_path="events", store_max_size=MAP,
                                retention=86400.0)
    return types.SimpleNamespace(state_dir=str(tmp_path),
                                 config=types.SimpleNamespace(events=cfg))


@pytest.mark.parametrize("damage", ["zeros", "garbage", "first_page_only", "pages_zeroed"])
def test_a_store_a_power_cut_damaged_is_set_aside_and_made_anew(tmp_path, caplog, damage):
    """The writer syncs at its checkpoints only (NOSYNC): after a power cut data.mdb may be
    zeros, half a page, or meta pages pointing at pages never written.  The events process
    must start anyway (it used to raise at every start: the supervisor restarted it in a
    loop and no event was published): the damaged store is renamed aside, an error
    logged, a new one made."""
    from mta.events.main import open_sink
    settings = _sink_settings(tmp_path)
    w = open_sink(settings)
    w.append([ev(i) for i in range(2000)])
    w.sync()
    path = w.path
    w.close()
    data_path = os.path.join(path, "data.mdb")
    with open(data_path, "rb") as fh:
        data = fh.read()
    damaged = {"zeros": bytes(8192), "garbage": os.urandom(16384),
               "first_page_only": data[:4096],
               "pages_zeroed": data[:8192] + bytes(len(data) - 8192)}[damage]
    with open(data_path, "wb") as fh:
        fh.write(damaged)
    with caplog.at_level("ERROR", logger="mta.events"):
        w = open_sink(settings)
    try:
        assert w.path == path and w.last_seq() == 0
        assert w.append([ev(1)]) == 1
    finally:
        w.close()
    aside = [n for n in os.listdir(tmp_path) if n.startswith("events.damaged-")]
    assert len(aside) == 1, os.listdir(tmp_path)
    with open(os.path.join(tmp_path, aside[0], "data.mdb"), "rb") as fh:
        assert fh.read() == damaged            # kept as it was, for whoever looks
    assert "damaged" in caplog.text and aside[0] in caplog.text


def test_damage_found_by_an_append_is_said_as_such(store):
    """A page a power cut damaged that the open does not read: the append says
    StoreDamaged (the events process makes the store anew, not a restart loop)."""
    import lmdb

    store.append([ev(1)])

    def broken(events):
        raise lmdb.CorruptedError("MDB_CORRUPTED: Located page was wrong type")
    store._append = broken
    with pytest.raises(S.StoreDamaged):
        store.append([ev(2)])


def test_the_writer_syncs_each_commit(store):
    # NOSYNC lets a power cut leave a meta page on disk that names data pages that never
    # got there (LMDB's documentation): a damaged store, and the webhooks' unsent events
    # with it.  NOMETASYNC lets it take the last commit back, whose seqs the webhooks may
    # have read and passed already (tests/test_state_powerloss.py).  The writer syncs
    # each commit's data, then its meta page.
    flags = store.env.flags()
    assert flags["sync"] is True and flags["metasync"] is True, flags


def test_a_reader_follows_a_store_set_aside_and_made_anew(tmp_path, caplog):
    """A read-only handle (webhooks, acceptors) reads the files it opened: after the events
    process set the store aside and made a new one at the path, successor() gives a handle
    on the new one -- not while the one there is the same, missing or unreadable."""
    from mta.events.main import open_sink, set_aside
    settings = _sink_settings(tmp_path)
    # (one process may not open the same files twice, LMDB's rule: the writer is closed
    # before a reader opens them)
    w = open_sink(settings)
    w.append([ev(i) for i in range(5)])
    w.close()
    r = S.open_for(settings, readonly=True)
    new = None
    try:
        assert r.successor() is None and r.last_seq() == 5
        set_aside(w.path, OSError(5, "damaged"))
        assert r.successor() is None            # nothing there yet
        os.makedirs(w.path)
        with open(os.path.join(w.path, "data.mdb"), "wb") as fh:
            fh.write(bytes(8192))               # there, not readable
        with caplog.at_level("WARNING", logger="mta.feedback.events_store"):
            assert r.successor() is None
            assert r.successor() is None
        assert caplog.text.count("cannot be read yet") == 1
        os.unlink(os.path.join(w.path, "data.mdb"))
        w = open_sink(settings)
        w.append([ev(100)])
        w.close()
        new = r.successor()
        assert new is not None and new.store_id() != r.store_id()
        assert [e["event_id"] for _, e in new.read(0, 10)] == [ev(100)["event_id"]]
        assert new.successor() is None
    finally:
        r.close()
        if new is not None:
            new.close()


def _damage(store, seq: int, value: bytes) -> None:
    """Replace the stored event of *seq* (its time prefix kept) by *value*: damage LMDB,
    which has no checksums, does not see, or what a writer's bug would store."""
    with store.env.begin(write=True, db=store.ev) as txn:
        k = S._U64.pack(seq)
        txn.put(k, bytes(txn.get(k)[:8]) + value)


@pytest.mark.parametrize("value", [b"\x93\x01\x02\x03", b"\xc1", b""],
                         ids=["an-array", "no-msgpack", "empty"])
def test_a_stored_event_that_cannot_be_read_is_passed_over(store, value, caplog):
    """A stored event that is no msgpack map was raised by read() -- a webhook stopped at it
    for good, trying again each second -- and by prune(): the events process died at its
    checkpoint once the event was past the retention, and again after every restart.  It
    now reads as an event of no type (no webhook takes it, the cursor moves past it) and
    is deleted by the prune, logged with its seq."""
    store.append([ev(i) for i in range(10)])
    _damage(store, 4, value)
    with caplog.at_level("ERROR", logger="mta.feedback.events_store"):
        got = store.read(0, 100)
    assert [s for s, _ in got] == list(range(1, 11))
    assert got[3][1] == {} and ids(e for _, e in got if e) == \
        [str(10_000 + i) for i in range(10) if i != 3]
    assert any("the event of seq 4 cannot be read" in r.getMessage() and
               r.getMessage().endswith("; read as an empty event") for r in caplog.records)
    # the Events API's pages and a report's look-up of its message pass over it too
    page, _, _ = store.query({}, None, 100, start=0, end=T0 + 1000)
    assert sorted(ids(page)) == [str(10_000 + i) for i in range(10) if i != 3]
    page, _, _ = store.query({"recipients": ["user3@example.com"]}, None, 100, start=0,
                             end=T0 + 1000)
    assert page == []
    assert store.originals(queue_ids=["m0003"]) == []
    assert ids(store.originals(queue_ids=["m0004"])) == ["10004"]
    store.retention = 50
    assert store.prune(T0 + 100, keep_from_seq=10**9) == 10
    assert store.count() == 0 and store.read(0, 100) == []
    # nothing of it is left: later pages are those of the events there are
    store.append([ev(i) for i in range(20, 22)])
    page, _, _ = store.query({}, None, 100, start=0, end=T0 + 1000)
    assert sorted(ids(page)) == ["10020", "10021"]



def test_the_prune_of_an_unreadable_event_leaves_no_index_entry_or_count(store, caplog):
    """The prune deleted an unreadable stored event (no msgpack map) without its index
    entries, its event_id entry and its counters (it could not read the values they are
    keyed by): a search by recipient, message, campaign, type... counted an event that
    was gone (total_count too high, for ever: its entries were never pruned again), and a
    replay of its event_id was skipped.  What is left after the prune must be exactly
    what the remaining events imply."""
    store.append([ev(i) for i in range(14)]
                 + [ev(14, type="bounce", bounce_class="10", transmission_id=5),
                    ev(15, type=0), ev(16, type="injection", message_id_header="<a@b>")])
    _damage(store, 4, b"\xc1")
    store.retention = 50
    with caplog.at_level("ERROR", logger="mta.feedback.events_store"):
        # events before T0 + 10 go (seq 1..10, one of them damaged)
        assert store.prune(T0 + 60, keep_from_seq=10**9) == 10
    idx, times, counts = _implied(store)
    for n in INDEXES:
        assert _entries(store, store.idx[n]) == idx[n], n
    assert _entries(store, store.time) == times
    assert {k: S._U64.unpack(v)[0] for k, v in _entries(store, store.count_db)} == counts
    assert len(_entries(store, store.ids)) == 7
    # damaged: a delivery, a bounce (bounce class, a number as transmission id), one of
    # type 0 (its time entry has no type), an injection (its Message-ID entry)
    for seq in (12, 15, 16, 17):
        _damage(store, seq, b"\xc1")
    with caplog.at_level("ERROR", logger="mta.feedback.events_store"):
        assert store.prune(T0 + 10**6, keep_from_seq=10**9, chunk=3) == 7
    for n in INDEXES:
        assert _entries(store, store.idx[n]) == [], n
    for db in (store.count_db, store.ids, store.time, store.ev):
        assert _entries(store, db) == []
    # the Events API's totals after a partial prune are right
    store.append([ev(100 + i, rcpt_to="user0@example.com") for i in range(3)])
    _damage(store, 19, b"\xc1")
    store.append([ev(200 + i, timestamp=str(T0 + 10**5 + i)) for i in range(2)])
    store.retention = 10**5 - 200
    with caplog.at_level("ERROR", logger="mta.feedback.events_store"):
        assert store.prune(T0 + 10**5, keep_from_seq=10**9) == 3
    for f in ({}, {"recipients": ["user0@example.com"]}, {"events": ["delivery"]},
              {"campaigns": ["spring sale"]}, {"transmissions": ["t10"]},
              {"messages": ["m0101"]}):
        _, _, total = store.query(f, None, 10, start=0, end=T0 + 10**6)
        assert total == 2 if f in ({}, {"events": ["delivery"]}, {"campaigns": ["spring sale"]}) \
            else total == 0, (f, total)
    # and a replay of the damaged event's id is stored again
    assert store.append([ev(101)]) == 23



def test_the_prune_of_many_unreadable_events_is_one_walk(store, caplog):
    """Many unreadable events in one prune transaction (a damaged stretch of the file):
    their index entries (rcpt, msg, tx, type, three campaign keys, event_id) all go, in
    one walk of the indexes, not one a damaged event."""
    store.append([ev(i, rcpt_to="u%d@example.com" % i) for i in range(600)])
    for seq in range(1, 601, 2):
        _damage(store, seq, b"")
    store.retention = 0
    with caplog.at_level("WARNING", logger="mta.feedback.events_store"):
        assert store.prune(T0 + 10**6, keep_from_seq=10**9, chunk=1000) == 600
    said = [r.getMessage() for r in caplog.records
            if "unreadable or missing event(s)" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("events store: 300 unreadable or missing "
                                                 "event(s) deleted; 2400 index entries"), said   # 8 each
    for n in INDEXES:
        assert _entries(store, store.idx[n]) == [], n
    for db in (store.count_db, store.ids, store.time, store.ev):
        assert _entries(store, db) == []


def test_a_filter_value_longer_than_an_index_key_is_checked_on_the_events(store):
    """An index keeps the first MAX_KEY octets of a value; a filter of one longer value was
    answered from the index alone -- the events of every value sharing those octets (another
    recipient, another transmission), and counted so."""
    long = "a" * (S.MAX_KEY + 100)
    store.append([ev(1, rcpt_to=long + "1@x.example", transmission_id="t" + long + "1",
                     campaign_id="c" + long + "1", bounce_class=long + "1"),
                  ev(2, rcpt_to=long + "2@x.example", transmission_id="t" + long + "2",
                     campaign_id="c" + long + "2", bounce_class=long + "2")])
    for f in ({"recipients": [long + "1@x.example"]}, {"transmissions": ["t" + long + "1"]},
              {"campaigns": ["c" + long + "1"]}, {"bounce_classes": [long.upper() + "1"]},
              {"recipients": [long + "1@X.example", long + "3@x.example"]}):
        page, _, total = store.query(f, None, 10, start=0, end=T0 + 1000)
        assert ids(page) == ["10001"] and total == 1, f
    # a value of exactly MAX_KEY octets: the key of longer ones too
    exact = "b" * (S.MAX_KEY - len("@x.example")) + "@x.example"
    store.append([ev(3, rcpt_to=exact), ev(4, rcpt_to=exact + "zz")])
    for v, want in ((exact, "10003"), (exact + "zz", "10004")):
        page, _, total = store.query({"recipients": [v]}, None, 10, start=0, end=T0 + 1000)
        assert ids(page) == [want] and total == 1


def test_the_prune_of_a_time_entry_whose_event_is_missing_leaves_nothing(store, caplog):
    """A time entry whose stored event is missing (damage again) was deleted by the prune
    with its event's index entries left behind (and counted by searches for ever)."""
    store.append([ev(i) for i in range(5)])
    with store.env.begin(write=True, db=store.ev) as txn:
        txn.delete(S._U64.pack(3))
    store.retention = 0
    with caplog.at_level("WARNING", logger="mta.feedback.events_store"):
        assert store.prune(T0 + 10**6, keep_from_seq=10**9) == 5
    for n in INDEXES:
        assert _entries(store, store.idx[n]) == [], n
    for db in (store.count_db, store.ids, store.time, store.ev):
        assert _entries(store, db) == []


def test_the_sweep_runs_in_pieces_with_appends_between_them(tmp_path, caplog):
    """The sweep for unreadable events' index entries walked every index of the store in
    the prune's transaction: seconds at millions of events, with the events process's
    appends (and the shards' reports behind them) waiting.  It runs in pieces now, each a
    transaction of a bounded number of entries, resumed from where the last one stopped
    -- after a restart too, and again from the start when another prune meets more
    damage.  Events appended between the pieces, with the same values and times among
    the damaged ones', must keep every entry and count; at the end nothing of the
    damaged events is left, and the counters are exactly what the stored events imply."""
    path = str(tmp_path / "events")
    s = S.EventStore(path, map_size=MAP, retention=50)
    s.append([ev(i, rcpt_to="u%d@example.com" % (i % 300), campaign_id="camp %d" % (i % 5),
                 bounce_class=str(i % 3)) for i in range(2000)])
    damaged = list(range(101, 1000, 7))
    for seq in damaged:
        _damage(s, seq, b"\xc1")
    with caplog.at_level("WARNING", logger="mta.feedback.events_store"):
        assert s.prune(T0 + 1050, keep_from_seq=10**9, sweep=False) == 1000
        assert s.sweeping()
        # (the damaged events' entries are still there: the sweep has not run)
        assert _entries(s, s.idx["msg"]) != _implied(s)[0]["msg"]
        pieces = 0
        appended = 0
        more_damage = [1500, 1507]
        while s.sweep(max_entries=100):
            pieces += 1
            assert pieces < 5000
            # an append between two pieces: values and times of the damaged ones
            j = 10 * appended
            appended += 1
            s.append([ev(50_000 + j + k, timestamp=str(T0 + 101 + (j + k) % 900),
                         rcpt_to="u%d@example.com" % ((101 + j + k) % 300),
                         campaign_id="camp %d" % ((j + k) % 5), bounce_class="1")
                      for k in range(10)])
            if pieces == 5:                 # a restart in the middle
                s.close()
                s = S.EventStore(path, map_size=MAP, retention=50)
                assert s.sweeping()
            if pieces == 40:                # more damage met by another prune: start again
                for seq in more_damage:
                    _damage(s, seq, b"")
                assert s.prune(T0 + 1560, keep_from_seq=2001, sweep=False) == 510
    said = [r.getMessage() for r in caplog.records
            if "unreadable or missing event(s)" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        "events store: %d unreadable or missing event(s) deleted" % (len(damaged) + 2)), said
    assert pieces > 100 and not s.sweeping()
    assert s.count() == 2000 - 1510 + 10 * appended
    idx, times, counts = _implied(s)
    for n in INDEXES:
        assert _entries(s, s.idx[n]) == idx[n], n
    assert _entries(s, s.time) == times
    assert {k: S._U64.unpack(v)[0] for k, v in _entries(s, s.count_db)} == counts
    assert len(_entries(s, s.ids)) == s.count()
    _, _, total = s.query({"campaigns": ["camp 1"]}, None, 10, start=0, end=T0 + 10**6)
    assert total == sum(1 for _, raw in _entries(s, s.ev)
                        if S._dec.decode(raw[8:])["campaign_id"] == "camp 1")
    # a replay of a damaged event's id is stored again
    last = s.last_seq()
    assert s.append([ev(damaged[0] - 1)]) == last + 1
    s.close()


def test_a_full_stores_prune_makes_room_for_the_next_append(tmp_path):
    """The events process prunes a full store a transaction of the oldest at a time
    (prune(full=True, finish=False): the rest between its appends) and appends again after
    each: the append goes through after a few -- in a full map a deletion fits only in
    small transactions, and LMDB gives the pages a transaction freed to the second one
    after it, not the next (the prune commits one more for that: without it the events
    loop stayed full for good, test_store_full) -- however the deletions fell."""
    s = S.EventStore(str(tmp_path / "small"), map_size=2 * 1024 * 1024, retention=10 * 86400)
    try:
        big = "x" * 2000
        fulls = []                      # prunes before the append went through
        for i in range(0, 3000, 50):
            batch = [ev(j, subject=big) for j in range(i, i + 50)]
            tries = 0
            while tries < 100:
                try:
                    s.append(batch)
                    break
                except S.StoreFull:
                    tries += 1
                    # (all of it may go: keep nothing)
                    s.prune(T0, keep_from_seq=s.last_seq() + 1, full=True, sweep=False,
                            finish=False)
            else:
                raise AssertionError(f"still full after 100 prunes ({s.count()} events)")
            if tries:
                fulls.append(tries)
        assert len(fulls) > 3 and s.last_seq() == 3000, fulls
        assert 0 < s.count() < 3000
    finally:
        s.close()


def test_the_prune_in_pieces_keeps_what_it_is_told_with_appends_between(store):
    """The events process's prune runs a transaction at a time between its appends
    (prune(finish=False), then prune_piece): what is appended meanwhile is not its to
    delete (seqs at or above the keep_from_seq it was given), the next call's lower
    keep_from_seq (a webhook made since) holds from then on, it ends with exactly the
    expired events below that gone -- indexes and counters too -- and prune() alone,
    after it, still does all in one call."""
    s = store
    s.retention = 1000
    s.append([ev(i) for i in range(1000)])                 # T0 .. T0 + 999
    now = T0 + 2500                                        # all of them expired
    assert s.prune(now, keep_from_seq=s.last_seq() + 1, finish=False, sweep=False) == 0
    assert s.pruning() and s.count() == 1000               # begun, nothing deleted yet
    assert s.prune_piece(chunk=50) and s.count() == 950
    # appended between two pieces: a recent event, and one as old as the pruned ones
    s.append([ev(5000)])
    s.append([ev(100, event_id="late")])                   # seq 1002, time T0 + 100
    assert s.prune_piece(chunk=50) and s.count() == 902
    # the next minute's prune while this one goes on: a webhook needs seq 600 on
    assert s.prune(now, keep_from_seq=600, finish=False, sweep=False) == 0
    pieces = 2
    while s.prune_piece(chunk=50):
        pieces += 1
        assert pieces < 100
    assert not s.pruning() and pieces >= 10
    left = sorted(int(e["event_id"]) - 10_000 if e["event_id"] != "late" else -1
                  for _, e in s.read(0, 10_000))
    assert left == [-1] + list(range(599, 1000)) + [5000]
    _, _, total = s.query({}, None, 1, start=0, end=T0 + 10**6)
    assert total == len(left)
    _, _, total = s.query({"campaigns": ["spring-sale"]}, None, 1, start=0, end=T0 + 10**6)
    assert total == len(left)
    with s.env.begin() as txn:
        assert txn.stat(s.ids)["entries"] == len(left)
        for name in ("rcpt", "msg", "tx", "camp", "type", "mid"):
            for _, tk in txn.cursor(db=s.idx[name]).iternext():
                assert txn.get(tk[8:], db=s.ev) is not None, (name, tk)
    # prune() alone: to the end in one call
    assert s.prune(now, keep_from_seq=10**9) == len(left) - 1 and not s.pruning()
    assert [e["event_id"] for _, e in s.read(0, 10)] == ["15000"]



class _SlowClock:
    """The events store's ``time`` with a monotonic clock that moves 1 ms at each read:
    as a slow disk would make its walks (the prune reads it once in 64 entries), without
    waiting for it."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 0.001
        return self.now

    def time(self) -> float:
        return time.time()


class _Walked:
    """The store's LMDB environment, counting the time entries each write transaction
    walks (its cursor's steps on the ``time`` database): the most, in ``most``."""

    def __init__(self, s):
        self.env, self.time_db, self.most = s.env, s.time, 0
        outer = self

        class Txn:
            def __init__(self, txn):
                self.txn, self.steps = txn, 0

            def __enter__(self):
                self.txn.__enter__()
                return self

            def __exit__(self, *exc):
                outer.most = max(outer.most, self.steps)
                return self.txn.__exit__(*exc)

            def cursor(self, db=None):
                cur = self.txn.cursor(db=db)
                return Cursor(cur, self) if db is outer.time_db else cur

            def __getattr__(self, name):
                return getattr(self.txn, name)

        class Cursor:
            def __init__(self, cur, txn):
                self.cur, self.txn = cur, txn

            def next(self):
                self.txn.steps += 1
                return self.cur.next()

            def delete(self):
                self.txn.steps += 1
                return self.cur.delete()

            def __getattr__(self, name):
                return getattr(self.cur, name)

        self.Txn = Txn

    def begin(self, **kw):
        txn = self.env.begin(**kw)
        return self.Txn(txn) if kw.get("write") else txn

    def __getattr__(self, name):
        return getattr(self.env, name)


def _kept_before_expired(s, kept: int, expired: int) -> int:
    """*expired* events (seqs 1..expired, times T0 + 5000 on), then *kept* events with
    older times (T0 on: first in time order); the keep_from_seq that holds those."""
    s.append([ev(5000 + i) for i in range(expired)])
    s.append([ev(i, event_id="kept%d" % i) for i in range(kept)])
    return expired + 1


def test_prune_alone_commits_in_pieces_bounded_in_time(store, monkeypatch):
    """prune() called alone (tools, `mta` commands) ran each transaction to its chunk of
    deletions with no time bound: entries kept for a webhook are passed over without
    counting, so many of them before the expired ones held the write lock for the whole
    walk.  It runs the events process's pieces now (PRUNE_PIECE_SECONDS each, 20 ms):
    here each 64 entries look like a millisecond, so no transaction walks much more than
    20 x 64 of the 5,200 entries, and the same events go."""
    s = store
    s.retention = 1000
    keep = _kept_before_expired(s, 5000, 200)
    monkeypatch.setattr(S, "time", _SlowClock())
    s.env = walked = _Walked(s)
    assert s.prune(T0 + 10**6, keep_from_seq=keep) == 200
    assert 0 < walked.most <= 1500 and not s.pruning(), walked.most
    left = [e["event_id"] for _, e in s.read(0, 10_000)]
    assert sorted(left) == sorted("kept%d" % i for i in range(5000))


def test_a_full_stores_first_prune_transaction_is_bounded_in_time(store, monkeypatch):
    """The events process's first prune transaction of a full store (prune(full=True),
    run at once for the append to go on) had no time bound either: it walked every entry
    kept for a webhook before it found one to delete.  It stops at PRUNE_PIECE_SECONDS
    as the others do (the events process retries the append and prunes again at once
    while the prune goes on); the pieces that follow delete the rest."""
    s = store
    s.retention = 1000
    keep = _kept_before_expired(s, 5000, 200)
    monkeypatch.setattr(S, "time", _SlowClock())
    s.env = walked = _Walked(s)
    assert s.prune(T0 + 10**6, keep_from_seq=keep, full=True, finish=False, sweep=False) == 0
    assert 0 < walked.most <= 1500 and s.pruning() and s.count() == 5200, walked.most
    pieces = 0
    while s.prune_piece():
        pieces += 1
        assert pieces < 100
    assert s.count() == 5000 and pieces >= 2 and walked.most <= 1500
