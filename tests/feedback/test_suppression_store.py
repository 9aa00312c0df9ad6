"""The suppression list store and its API handlers, in process (the daemon: tests/integration)."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from mta.api import replies as R
from mta.api import suppression as api
from mta.feedback import suppression as S


@pytest.fixture
def sl(tmp_path):
    s = S.SuppressionList(str(tmp_path / "sup"), 16 * 1024 * 1024)
    yield s
    s.close()


def test_types_are_separate_records_and_lookup_is_case_insensitive(sl):
    assert sl.put_many([("Ann@Example.COM", S.NON_TRANSACTIONAL, "a"),
                        ("bob@example.com", S.BOTH, "b")], now=1000.0) == 3
    assert sl.check("ann@example.com", False) and not sl.check("ANN@example.com", True)
    assert sl.check("BOB@EXAMPLE.COM", True) and sl.check("bob@example.com", False)
    assert not sl.check("carl@example.com", False)
    assert sl.flags("x" * 400 + "@example.com") == 0          # longer than any key
    got = sl.get("bob@example.com")
    assert [(e["type"], e["source"], e[e["type"]]) for e in got] == [
        ("non_transactional", "Manually Added", True), ("transactional", "Manually Added", True)]
    assert got[0]["created"] == "1970-01-01T00:16:40+00:00"
    # an update keeps created, moves updated, keeps an automatic source
    sl.put_many([("ann@example.com", S.NON_TRANSACTIONAL, "")], S.BOUNCE_RULE, now=2000.0)
    sl.put_many([("ann@example.com", S.NON_TRANSACTIONAL, "again")], now=3000.0)
    (e,) = sl.get("ann@example.com")
    assert (e["source"], e["description"], e["created"], e["updated"]) == (
        "Bounce Rule", "again", S.iso(1000.0), S.iso(3000.0))
    assert sl.summary()["bounce_rule"] == 1 and sl.summary()["manually_added"] == 2
    assert sl.delete("bob@example.com", S.TRANSACTIONAL) == 1
    assert not sl.check("bob@example.com", True) and sl.check("bob@example.com", False)
    assert sl.delete("bob@example.com") == 1 and sl.get("bob@example.com") == []
    assert sl.delete("bob@example.com") == 0
    assert sl.summary()["total"] == 1


def test_search_filters_and_both_kinds_of_paging(sl):
    for i in range(30):
        sl.put_many([(f"u{i:02d}@{'a' if i % 2 else 'b'}.test",
                      S.TRANSACTIONAL if i % 3 == 0 else S.NON_TRANSACTIONAL, f"row {i}")],
                    S.SPAM_COMPLAINT if i % 5 == 0 else S.MANUAL, now=1000.0 + i)
    rows, total, nxt = sl.search(per_page=7)
    assert total == 30 and [r["recipient"] for r in rows][:2] == ["u29@a.test", "u28@b.test"]
    seen = [r["recipient"] for r in rows]
    while nxt is not None:
        rows, total, nxt = sl.search(per_page=7, cursor=nxt)
        assert total == 30
        seen += [r["recipient"] for r in rows]
    assert len(seen) == 30 and len(set(seen)) == 30
    rows, total, _ = sl.search(domain="a.test", types=S.TRANSACTIONAL, descending=False)
    assert [r["recipient"] for r in rows] == ["u03@a.test", "u09@a.test", "u15@a.test",
                                              "u21@a.test", "u27@a.test"] and total == 5
    rows, total, _ = sl.search(sources=frozenset({S.SPAM_COMPLAINT}), start=1004.0, end=1020.0)
    assert [r["recipient"] for r in rows] == ["u20@b.test", "u15@a.test", "u10@b.test",
                                              "u05@a.test"]
    rows, total, nxt = sl.search(domain="b.test", per_page=4, page=2, descending=False)
    assert [r["recipient"] for r in rows] == ["u08@b.test", "u10@b.test", "u12@b.test",
                                              "u14@b.test"] and total == 15 and nxt
    rows, total, _ = sl.search(description="ROW 1", per_page=100)
    assert total == 11                     # row 1, row 10..19
    rows, total, _ = sl.search(description="row 1", description_strict=True)
    assert [r["recipient"] for r in rows] == ["u01@a.test"]
    rows, total, _ = sl.search(max_scan=1000, domain="b.test", per_page=1)
    assert total == 15


def test_full_list_is_an_error_and_keeps_what_it_had(tmp_path):
    sl = S.SuppressionList(str(tmp_path / "full"), 1024 * 1024)
    sl.put_many([("kept@example.com", S.BOTH, "")])
    big = [(f"{i:07d}{'x' * 200}@example.com", S.BOTH, "d" * 1000) for i in range(3000)]
    with pytest.raises(S.ListFull, match="suppression.max_size"):
        sl.put_many(big)
    assert sl.count() == 1 and sl.check("kept@example.com", True)
    assert sl.summary()["total"] == 2


def _child_adds(path: str) -> None:
    s = S.SuppressionList(path, 16 * 1024 * 1024)
    s.put_many([("child@example.com", S.NON_TRANSACTIONAL, "")], S.BOUNCE_RULE)
    s.close()


def test_another_process_sees_writes_at_once(sl):
    assert not sl.check("child@example.com", False)
    p = multiprocessing.get_context("spawn").Process(target=_child_adds, args=(sl.path,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert sl.check("child@example.com", False)
    assert sl.get("child@example.com")[0]["source"] == "Bounce Rule"


def test_bulk_loader(sl):
    assert sl.load_sorted([f"l{i:05d}@x.test" for i in range(2500)], batch=1000) == 2500
    assert sl.check("l02499@x.test", False) and not sl.check("l02499@x.test", True)
    assert sl.summary()["manually_added"] == 2500
    rows, total, _ = sl.search(per_page=10)
    assert total == 2500 and len(rows) == 10
    with pytest.raises(ValueError):
        sl.load_sorted(["a@x.test"])          # not after the last key: refused


@pytest.mark.parametrize("bounce_class,added", [
    (10, True), ("10", True), (50, False), (51, False), (22, False), (25, False), (1, False)])
def test_only_invalid_recipient_failures_add_a_bounce_rule(bounce_class, added):
    assert S.adds_bounce_rule(bounce_class) is added


def _call(sl, method, path, query=b"", body=b""):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    status, out = api.handle(sl, method, path, query, body)
    return status, json.loads(out) if out else None


def test_api_deprecated_forms_and_errors(sl):
    st, body = _call(sl, b"PUT", b"/api/v1/suppression-list", body={"recipients": [
        {"email": "a@x.test", "transactional": True, "non_transactional": True},
        {"recipient": "b@x.test", "type": "transactional", "description": "d"}]})
    assert st == 200 and body == {"results": {"message": "Suppression List successfully updated"}}
    assert sl.flags("a@x.test") == S.BOTH and sl.flags("b@x.test") == S.TRANSACTIONAL
    st, body = _call(sl, b"PUT", b"/api/v1/suppression-list/c%2Btag@x.test",
                     body={"non_transactional": True})
    assert st == 200 and sl.check("c+tag@x.test", False)
    st, body = _call(sl, b"GET", b"/api/v1/suppression-list/a@x.test", b"types=transactional")
    assert st == 200 and body["total_count"] == 1 and body["links"] == []
    # (recipient and type errors: SparkPost's 400s; the others 422)
    for doc, words, status in (
            ({"recipients": "x"}, "recipients", 422),
            ({"recipients": [{"type": "transactional"}]}, "recipients[0].recipient", 400),
            ({"recipients": [{"recipient": "a@x.test"}]}, "recipients[0].type", 400),
            ({"recipients": [{"recipient": "a@x.test", "type": "x"}]},
             "Type must be one of", 400),
            ({"recipients": [{"recipient": "nope", "type": "transactional"}]},
             "not a valid email address", 400),
            ({"recipients": [{"recipient": "a@x.test", "transactional": "yes"}]},
             "recipients[0].transactional", 422),
            ({"recipients": [{"recipient": "a@x.test", "type": "transactional",
                              "description": 5}]}, "recipients[0].description", 422),
            ({"recipients": [{"recipient": "a@x.test", "type": "transactional",
                              "list_id": "l1"}]}, "list_id", 422)):
        with pytest.raises(R.ApiError) as e:
            _call(sl, b"PUT", b"/api/v1/suppression-list", body=doc)
        assert e.value.status == status and words in e.value.description, \
            (doc, e.value.description)
    with pytest.raises(R.ApiError) as e:
        _call(sl, b"GET", b"/api/v1/suppression-list/none@x.test")
    assert e.value.status == 404 and e.value.error.message == "Recipient could not be found"
    sl.put_many([("comp@x.test", S.BOTH, "")], "Compliance")
    with pytest.raises(R.ApiError) as e:
        _call(sl, b"DELETE", b"/api/v1/suppression-list/comp@x.test")
    assert e.value.status == 403
    assert _call(sl, b"DELETE", b"/api/v1/suppression-list/a@x.test",
                 body={"type": "transactional"}) == (204, None)
    assert sl.flags("a@x.test") == S.NON_TRANSACTIONAL
    st, body = _call(sl, b"GET", b"/api/v1/suppression-list/summary")
    assert body["results"]["compliance"] == 2 and body["results"]["total"] == 5


def test_api_search_query_forms(sl):
    for i in range(12):
        sl.put_many([(f"q{i:02d}@x.test", S.TRANSACTIONAL if i < 4 else S.NON_TRANSACTIONAL,
                      "")], now=1_500_000_000.0 + i)
    q = b"types[0]=transactional&types[1]=non_transactional&limit=5&sort=asc"
    st, body = _call(sl, b"GET", b"/api/v1/suppression-list", q)
    assert [e["recipient"] for e in body["results"]] == [f"q{i:02d}@x.test" for i in range(5)]
    assert body["total_count"] == 12
    assert [x["rel"] for x in body["links"]] == ["first", "next", "last"]
    st, body = _call(sl, b"GET", b"/api/v1/suppression-list", b"types=transactional,"
                     b"non_transactional&from=2017-07-14T02:40:02%2B00:00&to=2017-07-14T02:40:05Z")
    assert [e["recipient"] for e in body["results"]] == [f"q{i:02d}@x.test" for i in (5, 4, 3, 2)]
    st, body = _call(sl, b"GET", b"/api/v1/suppression-list",
                     b"from=2017-07-14 02:40:10 00:00&types=non_transactional")
    assert [e["recipient"] for e in body["results"]] == ["q11@x.test", "q10@x.test"]


@pytest.mark.parametrize("query,field", [
    ("per_page=\u00b2", "per_page"), ("limit=\u0661\u0662", "limit"),
    ("per_page=99999999999999999999999", "per_page")])
def test_numbers_that_are_not_ascii_digits_are_refused_naming_the_field(sl, query, field):
    with pytest.raises(R.ApiError) as e:
        api.handle(sl, b"GET", b"/api/v1/suppression-list", query.encode(), b"")
    assert e.value.status < 500 and e.value.description.startswith(field + ":")


def test_a_range_that_ends_before_1970_is_empty_not_an_error(sl):
    sl.put_many([("a@x.test", S.BOTH, "")], now=1000.0)
    st, body = _call(sl, b"GET", b"/api/v1/suppression-list",
                     b"from=1969-01-01T00:00:00Z&to=1969-12-31T00:00:00Z")
    assert st == 200 and body["results"] == [] and body["total_count"] == 0


@pytest.mark.parametrize("sort", ["desc", "asc"])
def test_cursor_paging_with_a_filter_reaches_every_entry_past_the_scan_bound(sl, sort):
    # 300 addresses, every third one transactional only; each call may read 40 index rows
    # (each address of both types has two): the filtered export must still reach the end,
    # and every page must say the same total
    for i in range(300):
        sl.put_many([(f"u{i:04d}@x.test", S.TRANSACTIONAL if i % 3 == 0 else S.BOTH, "")],
                    now=1_700_000_000 + i)
    want = {f"u{i:04d}@x.test" for i in range(300) if i % 3}
    seen, totals, pages = [], set(), 0
    q = f"types=non_transactional&per_page=25&sort={sort}&cursor=initial".encode()
    while pages < 100:
        pages += 1
        st, out = api.handle(sl, b"GET", b"/api/v1/suppression-list", q, b"", max_scan=40)
        body = json.loads(out)
        assert st == 200
        seen += [r["recipient"] for r in body["results"]]
        totals.add(body["total_count"])
        nxt = [link["href"] for link in body["links"] if link["rel"] == "next"]
        if not nxt:
            break
        q = nxt[0].partition("?")[2].encode()
    assert len(seen) == len(set(seen)) and set(seen) == want
    assert seen == sorted(seen, reverse=sort == "desc")
    assert len(totals) == 1            # (a lower bound: the first page read 40 rows)
    # without a scan bound in the way, the total is exact
    st, out = api.handle(sl, b"GET", b"/api/v1/suppression-list",
                         b"types=non_transactional&cursor=initial", b"")
    assert json.loads(out)["total_count"] == 200


def test_a_search_is_bounded_in_time_and_its_cursor_goes_on(tmp_path):
    """A search by description reads a record per index row: bounded only by a count of
    rows (max_scan, a million by default), a large list on a slow disk held the API's
    thread for seconds.  max_seconds bounds it in time too, answered as at the row bound:
    the page so far, a total_count that counts what was read, and with cursor paging a
    next link that goes on after the last row read, so the export still reaches every
    entry (here each call may take 5 ms; reading all 20,000 rows takes ten times that)."""
    sl = S.SuppressionList(str(tmp_path / "sup"), 64 * 1024 * 1024)
    try:
        for b in range(0, 20_000, 10_000):
            sl.put_many([(f"u{i:05d}@t.test", S.NON_TRANSACTIONAL,
                          "wanted" if i % 1000 == 7 else "other") for i in range(b, b + 10_000)],
                        now=1_700_000_000 + b)
        want = sorted(f"u{i:05d}@t.test" for i in range(20_000) if i % 1000 == 7)
        rows, total, nxt = sl.search(description="WANTED", max_seconds=0.005)
        assert len(rows) == total < len(want) and nxt is None       # page mode: cut short
        seen, pages = [], 0
        q = b"description=wanted&per_page=100&cursor=initial"
        while pages < 1000:
            pages += 1
            st, out = api.handle(sl, b"GET", b"/api/v1/suppression-list", q, b"",
                                 max_seconds=0.005)
            body = json.loads(out)
            assert st == 200, body
            seen += [r["recipient"] for r in body["results"]]
            nxt = [link["href"] for link in body["links"] if link["rel"] == "next"]
            if not nxt:
                break
            q = nxt[0].partition("?")[2].encode()
        assert pages > 2 and sorted(seen) == want and len(seen) == len(want)
        # unbounded (the default): one page, the exact total
        rows, total, _ = sl.search(description="wanted")
        assert total == len(want) and sorted(r["recipient"] for r in rows) == want
    finally:
        sl.close()


def test_an_unfiltered_cursor_export_past_the_scan_bound_goes_on(sl):
    """An unfiltered search's total comes from the index; a cursor page larger than the
    scan bound (per_page 2,000, max_scan 1,000) ended there without a next link, so the
    export stopped at 1,000 of 3,000 entries.  It goes on from the last row read."""
    sl.put_many([(f"u{i:05d}@k.test", S.NON_TRANSACTIONAL, "") for i in range(3000)],
                now=1_700_000_000)
    q, seen, pages = b"per_page=2000&cursor=initial", [], 0
    while pages < 20:
        pages += 1
        st, out = api.handle(sl, b"GET", b"/api/v1/suppression-list", q, b"", max_scan=1000)
        body = json.loads(out)
        assert st == 200 and body["total_count"] == 3000
        seen += [r["recipient"] for r in body["results"]]
        nxt = [link["href"] for link in body["links"] if link["rel"] == "next"]
        if not nxt:
            break
        q = nxt[0].partition("?")[2].encode()
    assert sorted(seen) == [f"u{i:05d}@k.test" for i in range(3000)]


def test_every_spelling_of_a_listed_mailbox_is_suppressed(sl):
    sl.put_many([("foo@example.com", S.BOTH, ""), ("user@xn--bcher-kva.de", S.BOTH, ""),
                 ("Other@BÜCHER.de", S.NON_TRANSACTIONAL, "")])
    for spelling in ('"foo"@example.com', '"F\\oo"@Example.COM', "user@bücher.de",
                     "USER@BÜCHER.DE", "other@xn--bcher-kva.de"):
        assert sl.check(spelling, False), spelling
    # quotes that change the mailbox are kept: another address
    assert not sl.check('"foo bar"@example.com', False)
    assert sl.get("user@bücher.de")[0]["recipient"] == "user@xn--bcher-kva.de"
    assert [e["recipient"] for e in sl.get("other@xn--bcher-kva.de")] == [
        "other@xn--bcher-kva.de"]
    assert sl.delete('"foo"@example.com') == 2 and not sl.check("foo@example.com", False)


def test_entries_stored_before_the_canonical_form_still_count(sl):
    # a list written by an earlier version keyed a U-label domain and a quoted local part
    # as given (lower case): those entries must still suppress, show and delete
    with sl.env.begin(write=True) as txn:
        for key in ("user@bücher.de", '"foo"@example.com'):
            k = key.encode()
            sl._put(txn, key, S.BOTH, S.MANUAL, "old", 1000.0)
            assert txn.get(k, db=sl.rcpt) is not None
    for spelling in ("user@bücher.de", "User@Bücher.de", '"foo"@example.com'):
        assert sl.check(spelling, False) and sl.get(spelling), spelling
    assert sl.delete("user@bücher.de") == 2 and not sl.check("user@bücher.de", False)
    assert sl.delete('"foo"@example.com') == 2 and sl.summary()["total"] == 0


@pytest.mark.parametrize("method, path, body", [
    (b"PUT", b"/api/v1/suppression-list/a%00b@x.test", {"type": "transactional"}),
    (b"PUT", b"/api/v1/suppression-list/a%01b@x.test", {"type": "transactional"}),
    (b"PUT", b"/api/v1/suppression-list/a%7Fb@x.test", {"type": "transactional"}),
    (b"PUT", b"/api/v1/suppression-list/a%FFb@x.test", {"type": "transactional"}),
    (b"PUT", b"/api/v1/suppression-list/a\xffb@x.test", {"type": "transactional"}),
    (b"GET", b"/api/v1/suppression-list/a%FFb@x.test", b""),
    (b"PUT", b"/api/v1/suppression-list", {"recipients": [
        {"recipient": "a\x00b@x.test", "type": "transactional"}]}),
])
def test_an_address_with_a_control_character_or_not_utf8_is_refused(sl, method, path, body):
    # (stored, NUL and U+FFFD made entries no mail could match and nobody could type)
    with pytest.raises(R.ApiError) as e:
        _call(sl, method, path, body=body)
    # (in a bulk PUT: SparkPost's 400 naming the malformed recipients)
    status = 400 if path == api.PATH else 422
    assert e.value.status == status and "recipient" in e.value.description, \
        e.value.description
    assert _call(sl, b"GET", b"/api/v1/suppression-list/summary")[1]["results"]["total"] == 0


def test_search_description_and_domain_keep_their_commas(sl):
    sl.put_many([("a@example.com", S.NON_TRANSACTIONAL, "bounced, then complained"),
                 ("b@example.com", S.NON_TRANSACTIONAL, "then complained")], now=1000.0)
    st, body = api.handle(sl, b"GET", api.PATH,
                              b"description=bounced%2C+then&types=non_transactional", b"")
    res = json.loads(body)
    assert st == 200 and [e["recipient"] for e in res["results"]] == ["a@example.com"]
    st, body = api.handle(sl, b"GET", api.PATH,
                              b"description=bounced%2C+then+complained&description_strict=true",
                              b"")
    assert [e["recipient"] for e in json.loads(body)["results"]] == ["a@example.com"]
    # lists are still comma-separated
    st, body = api.handle(sl, b"GET", api.PATH,
                              b"types=transactional,non_transactional", b"")
    assert json.loads(body)["total_count"] == 2


def _fill_every_way(sl):
    """Entries written every way an index row is: the bulk loader, a new entry, an update
    that changes its source and one that keeps it, a delete of one of two types."""
    sl.load_sorted(["l0@x.test", "l1@x.test", "l2@y.test"], S.BOTH, S.BOUNCE_RULE, now=900.0)
    sl.put_many([(f"m{i}@x.test", S.BOTH, f"manual {i}") for i in range(4)], now=1000.0)
    sl.put_many([("s0@y.test", S.NON_TRANSACTIONAL, "fbl")], S.SPAM_COMPLAINT, now=1001.0)
    sl.put_many([("m0@x.test", S.NON_TRANSACTIONAL, "550 5.1.1")], S.BOUNCE_RULE, now=1002.0)
    sl.put_many([("l1@x.test", S.TRANSACTIONAL, "again")], now=1003.0)   # keeps Bounce Rule
    sl.put_many([("s0@y.test", S.NON_TRANSACTIONAL, "")], S.BOUNCE_RULE, now=1004.0)
    assert sl.delete("l0@x.test", S.TRANSACTIONAL) == 1
    assert sl.delete("m3@x.test") == 2


def _searches(sl):
    out = []
    for query in ({"sources": frozenset({S.BOUNCE_RULE})},
                  {"sources": frozenset({S.MANUAL, S.SPAM_COMPLAINT})},
                  {"sources": frozenset({S.SPAM_COMPLAINT})},
                  {"sources": frozenset({S.BOUNCE_RULE}), "types": S.TRANSACTIONAL},
                  {"sources": frozenset({S.BOUNCE_RULE}), "domain": "y.test"},
                  {"sources": frozenset({S.MANUAL}), "description": "MANUAL"},
                  {"sources": frozenset({S.MANUAL}), "descending": False, "start": 1000.0}):
        rows, total, _ = sl.search(per_page=100, **query)
        out.append(([(r["recipient"], r["type"], r["source"], r["description"])
                     for r in rows], total))
        # paged by cursor, one entry a page: the same entries
        seen, nxt = [], b""
        while nxt is not None:
            page, t, nxt = sl.search(per_page=1, cursor=nxt, total=total if nxt else None,
                                     **query)
            assert t == total
            seen += [(r["recipient"], r["type"], r["source"], r["description"]) for r in page]
        assert seen == out[-1][0]
    return out


def test_a_search_by_source_finds_the_source_in_the_index(sl):
    # every index row carries its entry's source (one octet): a search by source reads
    # the index alone, not each entry's record (4-5 s at a million entries)
    _fill_every_way(sl)
    with sl.env.begin() as txn:
        rows = list(txn.cursor(db=sl.index))
        for k, v in rows:
            (e,) = [e for e in sl.get(k[9:].decode()) if S.TYPES[e["type"]] == k[8]]
            assert v == S.SOURCE_CODES[e["source"]], (k, v, e["source"])
    assert len(rows) == sl.summary()["total"] == 12
    nt, t = "non_transactional", "transactional"
    assert _searches(sl)[:3] == [
        ([("s0@y.test", nt, "Bounce Rule", ""), ("l1@x.test", t, "Bounce Rule", "again"),
          ("m0@x.test", nt, "Bounce Rule", "550 5.1.1"), ("l2@y.test", nt, "Bounce Rule", ""),
          ("l1@x.test", nt, "Bounce Rule", ""), ("l0@x.test", nt, "Bounce Rule", ""),
          ("l2@y.test", t, "Bounce Rule", "")], 7),
        ([("m2@x.test", nt, "Manually Added", "manual 2"),
          ("m1@x.test", nt, "Manually Added", "manual 1"),
          ("m2@x.test", t, "Manually Added", "manual 2"),
          ("m1@x.test", t, "Manually Added", "manual 1"),
          ("m0@x.test", t, "Manually Added", "manual 0")], 5),
        ([], 0)]


def test_a_list_written_before_the_index_kept_the_source_is_searched_alike(sl, tmp_path):
    # a list written by an earlier version has no source in its index rows: its record
    # is read, and every search gives the same answer, also with the two kinds of row mixed
    _fill_every_way(sl)
    want = _searches(sl)
    assert want[0][1] == 7 and want[1][1] == 5 and want[3][1] == 2 and want[4][1] == 3
    for which in ("every row", "every other row"):
        with sl.env.begin(write=True) as txn:
            rows = list(txn.cursor(db=sl.index))
            for i, (k, _) in enumerate(rows):
                if which == "every row" or i % 2:
                    txn.put(k, b"", db=sl.index)
        sl.close()
        sl = S.SuppressionList(str(tmp_path / "sup"), 16 * 1024 * 1024)
        assert _searches(sl) == want, which
    sl.close()


@pytest.mark.parametrize("value", [b"", b"\x02\xc1junk", b"\x03" + S._enc.encode([1, 2]),
                                   b"\x02" + S._enc.encode({"non_transactional": [1]}),
                                   b"\x02" + S._enc.encode({"bogus": ["a", "", 1, 1]}),
                                   b"\x02" + S._enc.encode({"non_transactional":
                                                            ["a", "", "x", 1]}),
                                   b"\x02" + S._enc.encode({})])
def test_a_damaged_entry_suppresses_and_can_be_deleted_or_put_again(sl, value):
    sl.put_many([("bad@example.com", S.BOTH, "d"), ("good@example.com", S.BOTH, "g")],
                now=1000.0)
    with sl.env.begin(write=True) as txn:
        txn.put(b"bad@example.com", value, db=sl.rcpt)
    # suppressed (both types when the flags octet is missing), shown, searched past
    assert sl.check("bad@example.com", False)
    assert sl.check("bad@example.com", True) == (not value or bool(value[0] & S.TRANSACTIONAL))
    assert {e["description"] for e in sl.get("bad@example.com")} == {S.DAMAGED}
    assert [e["recipient"] for e in sl.search()[0]] == ["good@example.com"] * 2
    st, body = _call(sl, b"GET", api.PATH)
    assert st == 200 and len(body["results"]) == 2
    # put again: the new record only, once in the search (the old index rows are stale)
    assert sl.put_many([("bad@example.com", S.TRANSACTIONAL, "new")], now=2000.0) == 1
    assert [(e["type"], e["description"]) for e in sl.get("bad@example.com")] == [
        ("transactional", "new")]
    assert sorted(e["recipient"] for e in sl.search()[0]) == \
        ["bad@example.com"] + ["good@example.com"] * 2
    with sl.env.begin(write=True) as txn:
        txn.put(b"bad@example.com", value, db=sl.rcpt)
    assert _call(sl, b"DELETE", api.PATH + b"/bad@example.com")[0] == 204
    assert sl.flags("bad@example.com") == 0 and sl.get("bad@example.com") == []


def _filled(path: str, n: int = 2000) -> list[str]:
    sl = S.SuppressionList(path, 1 << 24)
    try:
        sl.put_many([(f"u{i:05d}@example.com", S.NON_TRANSACTIONAL, "old") for i in range(n)],
                    now=1000.0)
        return sorted(map(str, sl.search(per_page=10_000)[0]))
    finally:
        sl.close()


def test_a_truncated_list_is_rebuilt_from_its_pages(tmp_path):
    path = str(tmp_path / "sup")
    _filled(path)
    sl = S.SuppressionList(path, 1 << 24)
    # a later version of some (its earlier one stays on freed pages): the newest is kept
    sl.put_many([(f"u{i:05d}@example.com", S.TRANSACTIONAL, "new") for i in range(0, 2000, 7)],
                now=2000.0)
    want = sorted(map(str, sl.search(per_page=10_000)[0]))
    sl.close()
    assert S.check_store(path) is None
    data = tmp_path / "sup" / "data.mdb"
    # the last pages written (the roots: LMDB can read nothing) are lost
    cut = data.stat().st_size - 8192
    with open(data, "r+b") as fh:
        fh.truncate(cut)
    why = S.check_store(path)
    assert why and "shorter than" in why
    ticks = []
    line = S.check_at_start(path, 1 << 24, lambda: ticks.append(1))
    assert line and why in line and "moved to " + path + ".damaged-" in line
    assert ticks        # (the supervisor tells systemd it is alive meanwhile)
    assert S.check_store(path) is None
    sl = S.SuppressionList(path, 1 << 24)
    try:
        got = sl.search(per_page=10_000)[0]
        # every address is back; each as its newest version, or as the version before it
        # (transactional not yet added) when that one's page was lost: a subset of want
        assert len({e["recipient"] for e in got}) == 2000 == sl.count()
        assert set(map(str, got)) <= set(want) and len(got) >= len(want) - 20
        assert sl.summary()["total"] == len(got)
        assert sl.check("u00007@example.com", True) and not sl.check("u00008@example.com", True)
    finally:
        sl.close()
    # the damaged list is kept, as it was, for the operator
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("sup.damaged-")]
    assert len(aside) == 1 and (aside[0] / "data.mdb").stat().st_size == cut


def test_a_sound_list_an_empty_file_or_none_is_left_as_it_is(tmp_path):
    path = str(tmp_path / "sup")
    assert S.check_at_start(path, 1 << 24) is None and not os.path.exists(path)
    want = _filled(path)
    data = tmp_path / "sup" / "data.mdb"
    before = data.stat()
    assert S.check_at_start(path, 1 << 24) is None
    after = data.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    sl = S.SuppressionList(path, 1 << 24)
    try:
        assert sorted(map(str, sl.search(per_page=10_000)[0])) == want
    finally:
        sl.close()
    # an empty data.mdb is one LMDB makes a new list in (a first start cut off)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    open(os.path.join(empty, "data.mdb"), "wb").close()
    assert S.check_at_start(empty, 1 << 24) is None
    assert sorted(os.listdir(tmp_path)) == ["empty", "sup"]


def _hold_open(path: str, ready, done) -> None:
    sl = S.SuppressionList(path, 1 << 24)
    ready.set()
    done.wait(30)
    sl.close()


def test_a_list_another_process_has_open_is_not_checked(tmp_path, caplog):
    """The check cannot tell a list being written (LMDB grows the file as it writes)
    from a truncated one: while any process has the list open it reads nothing, even
    a list that looks cut short, and says so."""
    path = str(tmp_path / "sup")
    _filled(path)
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_open, args=(path, ready, done))
    p.start()
    try:
        assert ready.wait(30)
        data = tmp_path / "sup" / "data.mdb"
        size = data.stat().st_size
        with open(data, "r+b") as fh:
            fh.truncate(size - 8192)
        assert S.check_store(path)          # (it does look short)
        with caplog.at_level("WARNING", logger="mta.suppression"):
            assert S.check_at_start(path, 1 << 24) is None
        assert "open in another process" in caplog.text and path in caplog.text
        assert sorted(os.listdir(tmp_path)) == ["sup"]
        assert data.stat().st_size == size - 8192
    finally:
        done.set()
        p.join(30)
    # closed: now it is checked and rebuilt
    assert "moved to" in S.check_at_start(path, 1 << 24)


class _Killed(BaseException):
    pass


def test_a_rebuild_cut_short_leaves_the_damaged_list_for_the_next_start(tmp_path):
    """A start killed while the new list is made (systemd's start timeout, a kill -9)
    must not leave part of the entries in the list's place, taken for the whole list at
    the next start: the damaged list stays until the new one is whole; the next start
    rebuilds it again; one killed between the renames is finished."""
    path = str(tmp_path / "sup")
    want = _filled(path)
    data = tmp_path / "sup" / "data.mdb"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size - 8192)
    cut = data.stat().st_size
    calls = []

    def kill_at_the_writes() -> None:
        calls.append(1)
        if len(calls) == 2:         # (the scan's first call, then the first batch's)
            raise _Killed

    with pytest.raises(_Killed):
        S.check_at_start(path, 1 << 24, kill_at_the_writes)
    assert data.stat().st_size == cut and S.check_store(path)
    assert sorted(os.listdir(tmp_path)) == ["sup", "sup.rebuilding"]
    line = S.check_at_start(path, 1 << 24)
    assert "2000 entries" in line
    assert sorted(os.listdir(tmp_path))[0] == "sup" and len(os.listdir(tmp_path)) == 2
    sl = S.SuppressionList(path, 1 << 24)
    try:
        assert sorted(map(str, sl.search(per_page=10_000)[0])) == want
    finally:
        sl.close()
    # killed after the new list was whole: before the damaged one went aside, or after
    for step in ("before", "after"):
        base = tmp_path / step
        base.mkdir()
        p = str(base / "sup")
        _filled(p + S.REBUILT, 10)
        os.makedirs(p)
        if step == "before":
            with open(os.path.join(p, "data.mdb"), "wb") as fh:
                fh.write(b"\0" * 100)       # (the damaged one)
        else:
            os.rmdir(p)
        line = S.check_at_start(p, 1 << 24)
        assert line and "cut short" in line, line
        names = sorted(os.listdir(base))
        assert names[0] == "sup" and len(names) == (2 if step == "before" else 1), names
        sl = S.SuppressionList(p, 1 << 24)
        try:
            assert sl.count() == 10
        finally:
            sl.close()
        assert S.check_at_start(p, 1 << 24) is None


def test_a_rebuild_that_cannot_write_is_an_oserror_and_leaves_the_damaged_list(
        tmp_path, monkeypatch):
    """A rebuild whose writes fail (a full disk: LMDB's own error, not an OSError) is an
    OSError naming the list -- what the supervisor turns into a failed reload or start
    (an lmdb.Error escaped its loop at a reload and ended it, orphaning the node's
    processes) -- and the damaged list stays where it was, rebuilt at the next start."""
    import lmdb
    path = str(tmp_path / "sup")
    _filled(path)
    data = tmp_path / "sup" / "data.mdb"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size - 8192)

    def full(self, txn, source, d):
        raise lmdb.DiskError("mdb_put: No space left on device")

    monkeypatch.setattr(S.SuppressionList, "_count", full)
    with pytest.raises(OSError, match=f"suppression list {path}: .*No space left"):
        S.check_at_start(path, 1 << 24)
    assert S.check_store(path)          # (still the damaged one, in its place)
    monkeypatch.undo()
    line = S.check_at_start(path, 1 << 24)
    assert line and "moved to " + path + ".damaged-" in line
    assert S.check_store(path) is None
    assert not os.path.exists(path + ".rebuilding")


def _records_by_source(sl) -> dict[str, int]:
    """Records per source, counted from the records themselves (the counts' truth)."""
    out: dict[str, int] = {}
    with sl.env.begin(db=sl.rcpt) as txn:
        for k, v in txn.cursor():
            for e in S._entries(k, v):
                key = S.SUMMARY_KEYS[e["source"]]
                out[key] = out.get(key, 0) + 1
    return out


def test_a_bulk_put_writes_every_entry_and_keeps_the_counts(sl):
    """A bulk PUT of SparkPost's 10,000 entries: new addresses (one type and both),
    addresses already there from an automatic source (which they keep), manual ones
    put again, and an address twice in the request: every entry is written as sent,
    and the summary (counts added up over the request, written once) is what the
    records say."""
    sl.put_many([(f"bounced{i}@old.test", S.NON_TRANSACTIONAL, "550 old")
                 for i in range(500)], S.BOUNCE_RULE, now=1000.0)
    sl.put_many([(f"manual{i}@old.test", S.BOTH, "first") for i in range(500)], now=1000.0)
    rcpts = [{"recipient": f"Bounced{i}@Old.test", "type": "non_transactional",
              "description": "put by hand"} for i in range(500)]
    rcpts += [{"email": f"manual{i}@old.test", "transactional": True,
               "description": "again"} for i in range(500)]
    rcpts += [{"recipient": f" new{i:05d}@bulk.test ", "type": "non_transactional",
               "description": f"new {i}"} for i in range(8_000)]
    rcpts += [{"recipient": f"both{i}@bulk.test", "transactional": True,
               "non_transactional": True, "description": "both"} for i in range(999)]
    rcpts.append({"recipient": "new00007@bulk.test", "type": "non_transactional",
                  "description": "the last one wins"})
    assert len(rcpts) == api.MAX_BULK
    st, out = _call(sl, b"PUT", api.PATH, body={"recipients": rcpts})
    assert st == 200, out
    summary = sl.summary()
    assert summary == {**{k: 0 for k in S.SUMMARY_KEYS.values()}, **_records_by_source(sl),
                       "total": 500 + 1000 + 8_000 + 2 * 999}
    assert summary["bounce_rule"] == 500 and summary["manually_added"] == 1000 + 8_000 + 1998
    (e,) = sl.get("bounced7@old.test")
    assert (e["source"], e["description"], e["created"]) == \
        (S.BOUNCE_RULE, "put by hand", S.iso(1000.0))
    assert [(e["type"], e["description"]) for e in sl.get("manual7@old.test")] == \
        [("non_transactional", "first"), ("transactional", "again")]
    assert sl.get("new00007@bulk.test")[0]["description"] == "the last one wins"
    for i in (0, 4_321, 7_999):
        if i != 7:
            (e,) = sl.get(f"new{i:05d}@bulk.test")
            assert (e["type"], e["description"]) == ("non_transactional", f"new {i}")
    assert sl.flags("both998@bulk.test") == S.BOTH
    # a search by description reads each record once and answers the entries as get does
    rows, total, _ = sl.search(description="NEW 12", per_page=100)
    assert total == 111 and len(rows) == 100      # new 12, new 120-129, new 1200-1299
    assert rows[0] == sl.get(rows[0]["recipient"])[0]
    assert all(r["description"].startswith("new 12") for r in rows)
    rows, total, _ = sl.search(description="both", description_strict=True,
                               types=S.TRANSACTIONAL, per_page=10_000)
    assert total == len(rows) == 999 and {r["type"] for r in rows} == {"transactional"}
    st, out = _call(sl, b"GET", api.PATH, b"domain=bulk.test&per_page=1")
    assert out["total_count"] == 8_000 + 2 * 999


@pytest.mark.parametrize("address,ok", [
    ("a@b.test", True), (" Padded@B.test\t", True), ("\u00fc@b\u00fccher.de", True),
    ("a+b/c=d@b.test", True), ("a b@b.test", False), ("a\tb@b.test", False),
    ("a\x1fb@b.test", False), ("a\x7fb@b.test", False), ("a\u00a0b@b.test", False),
    ("a\u2028b@b.test", False), ("a\u3000b@b.test", False), ("a\x85b@b.test", False),
    ("@b.test", False), ("a@", False), ("ab.test", False), ("", False), (7, False),
    ("x" * 313 + "@b.test", True), ("x" * 314 + "@b.test", False),
    # 320 characters, more octets than a key holds
    ("\u00fc" * 313 + "@b.test", False), ("\u00fc" * 156 + "@b.test", True),
])
def test_a_bulk_puts_addresses_are_checked_as_the_single_puts_are(sl, address, ok):
    """One check for every address (white space as str.isspace has it, controls, the
    key's octets), named by its field; a bulk PUT's refusal is SparkPost's 400."""
    body = {"recipients": [{"recipient": "first@b.test", "type": "transactional"},
                           {"recipient": address, "type": "transactional"}]}
    if ok:
        assert _call(sl, b"PUT", api.PATH, body=body)[0] == 200
        assert sl.check(address, True)
        return
    with pytest.raises(R.ApiError) as e:
        _call(sl, b"PUT", api.PATH, body=body)
    assert e.value.status == 400 and e.value.description.startswith("recipients[1].recipient")
    assert sl.count() == 0
    if isinstance(address, str):
        with pytest.raises(R.ApiError) as e:
            api._address(address, "recipient")
        assert e.value.description.startswith("recipient: ")
