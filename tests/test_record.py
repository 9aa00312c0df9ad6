"""Tests of the spool record codec, run against the compiled module and its pure twin."""

import mmap
import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta import native

PURE = native.load("record", pure=True)
COMPILED = native.load("record", pure=False)
IMPLS = {"pure": PURE, "compiled": COMPILED}

OK, INCOMPLETE, CORRUPT, STALE = PURE.OK, PURE.INCOMPLETE, PURE.CORRUPT, PURE.STALE
HEADER = struct.Struct("<4sBBHIII")
LENGTH_FIELDS = range(8, 16)        # meta_len and body_len

SAMPLES = [
    (0, b"", b""),
    (1, b"", b"body only"),
    (7, b'{"queue_id": "7Kx2"}', b"Subject: hi\r\n\r\nhello\r\n" * 90),
    (255, b"m" * 300, b""),
    (42, bytes(range(256)), bytes(range(256)) * 8),
]


@pytest.fixture(params=sorted(IMPLS))
def mod(request):
    return IMPLS[request.param]


def test_constants():
    for impl in IMPLS.values():
        assert (impl.MAGIC, impl.HEADER_SIZE, impl.VERSION) == (b"\x89MTA", 20, 1)
        assert (impl.OK, impl.INCOMPLETE, impl.CORRUPT, impl.STALE) == (0, 1, 2, 3)
        assert impl.VERSION_SEGMENT == 2
        assert impl.DEFAULT_MAX_RECORD == 1 << 31


@pytest.mark.parametrize("rtype, meta, body", SAMPLES)
def test_layout_matches_the_specification(mod, rtype, meta, body):
    record = mod.encode(rtype, meta, body)
    magic, got_rtype, version, reserved, meta_len, body_len, crc = HEADER.unpack_from(record)
    assert (magic, got_rtype, version, reserved) == (b"\x89MTA", rtype, 1, 0)
    assert (meta_len, body_len) == (len(meta), len(body))
    assert record[20:] == meta + body
    assert crc == zlib.crc32(record[4:16] + meta + body)
    assert mod.encode_header(rtype, meta, body) == record[:20]
    assert mod.encode_header(rtype, memoryview(meta), bytearray(body)) == record[:20]


@pytest.mark.parametrize("rtype, meta, body", SAMPLES)
def test_round_trip(mod, rtype, meta, body):
    record = mod.encode(rtype, meta, body)
    assert mod.decode(record) == (OK, rtype, meta, 20 + len(meta), len(body), len(record))


def test_decode_any_buffer_at_any_offset(mod):
    records = [mod.encode(*sample) for sample in SAMPLES]
    segment = b"".join(records)
    with mmap.mmap(-1, len(segment)) as mapped:
        mapped[:] = segment
        for buf in (segment, bytearray(segment), memoryview(segment), mapped):
            offset = 0
            for (rtype, meta, body), record in zip(SAMPLES, records, strict=True):
                status, got_rtype, got_meta, body_at, body_len, nxt = mod.decode(buf, offset)
                assert (status, got_rtype, got_meta) == (OK, rtype, meta)
                assert bytes(buf[body_at:body_at + body_len]) == body
                assert nxt == offset + len(record)
                offset = nxt
            assert mod.decode(buf, offset) == (INCOMPLETE, 0, None, 0, 0, 0)


def test_argument_checks(mod):
    record = mod.encode(1, b"m", b"b")
    for rtype in (-1, 256, 1 << 70):
        with pytest.raises(ValueError):
            mod.encode(rtype, b"", b"")
        with pytest.raises(ValueError):
            mod.encode_header(rtype, b"", b"")
    with pytest.raises(TypeError):
        mod.encode(1.0, b"", b"")
    with pytest.raises(TypeError):
        mod.encode(1, "meta", b"")
    with pytest.raises(TypeError):
        mod.decode("text")
    for offset in (-1, len(record) + 1, 1 << 70, -(1 << 70)):
        with pytest.raises(ValueError):
            mod.decode(record, offset)
    with pytest.raises(ValueError):
        mod.decode(record, 0, -1)
    with pytest.raises(ValueError):
        mod.Decoder(-1)
    assert mod.decode(record, 0, 1 << 70)[0] == OK


def test_max_record_bounds_meta_plus_body(mod):
    record = mod.encode(3, b"1234", b"567890")
    assert mod.decode(record, 0, 10)[0] == OK
    assert mod.decode(record, 0, 9) == (CORRUPT, 0, None, 0, 0, 0)
    # A torn record that could never fit is corrupt, not incomplete.
    assert mod.decode(record[:20], 0, 9)[0] == CORRUPT


@pytest.mark.parametrize("rtype, meta, body", SAMPLES[1:3])
def test_every_flipped_byte_is_detected(mod, rtype, meta, body):
    record = mod.encode(rtype, meta, body)
    for i in range(len(record)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(record)
            damaged[i] ^= mask
            status = mod.decode(damaged)[0]
            if i in LENGTH_FIELDS:
                assert status in (CORRUPT, INCOMPLETE), i
            else:
                assert status == CORRUPT, i


@pytest.mark.parametrize("at, value", [(5, 0), (5, 2), (6, 1), (7, 0x80)])
def test_bad_version_or_reserved_is_corrupt_even_with_a_good_crc(mod, at, value):
    record = bytearray(mod.encode(1, b"m", b"body"))
    record[at] = value
    record[16:20] = struct.pack("<I", zlib.crc32(bytes(record[4:16]) + b"mbody"))
    assert mod.decode(record)[0] == CORRUPT


def test_every_truncation_is_incomplete(mod):
    record = mod.encode(9, b"meta", b"x" * 100)
    for end in range(len(record)):
        assert mod.decode(record[:end]) == (INCOMPLETE, 0, None, 0, 0, 0)
        assert mod.decode(record + record[:end], len(record))[0] == INCOMPLETE


# -- version 2: records that belong to one segment ---------------------------

SEGMENTS = [1, 7, 0xFFFF, 0x10000, 70_000, 1 << 40]


@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("rtype, meta, body", SAMPLES[:3])
def test_version_2_layout(mod, segment, rtype, meta, body):
    record = mod.encode(rtype, meta, body, segment)
    magic, got_rtype, version, generation, meta_len, body_len, crc = HEADER.unpack_from(record)
    assert (magic, got_rtype, version, generation) == (b"\x89MTA", rtype, 2, segment & 0xFFFF)
    assert (meta_len, body_len) == (len(meta), len(body))
    assert crc == zlib.crc32(record[4:16] + meta + body, zlib.crc32(segment.to_bytes(8, "little")))
    assert mod.encode_header(rtype, meta, body, segment) == record[:20]
    assert mod.decode(record, segment=segment) == (
        OK, rtype, meta, 20 + len(meta), len(body), len(record))
    # Without the segment number it cannot be checked.
    assert mod.decode(record)[0] == CORRUPT


@pytest.mark.parametrize("segment", SEGMENTS)
def test_a_record_read_in_a_later_segment_is_stale_and_never_ok(mod, segment):
    record = mod.encode(4, b"meta", b"body" * 50, segment)
    for later in (segment + 1, segment + 2, segment + 1000, segment + 0xFFFF):
        assert mod.decode(record, segment=later) == (STALE, 0, None, 0, 0, 0), later
    # 65,536 numbers later the generation is the same: the checksum still tells
    # them apart (corrupt: skipped, never taken for the later segment's record).
    for other in (segment + 0x10000, segment + 0x30000):
        assert mod.decode(record, segment=other)[0] == CORRUPT
    # Read in an earlier segment's file (which never happens): corrupt, not stale.
    for earlier in (segment - 1, segment // 2, 0):
        if 0 <= earlier < segment:
            assert mod.decode(record, segment=earlier)[0] == CORRUPT
    # A damaged stale record is corrupt; a torn one is incomplete.
    for i in range(4, len(record)):
        damaged = bytearray(record)
        damaged[i] ^= 0x01
        assert mod.decode(damaged, segment=segment + 1)[0] in (CORRUPT, INCOMPLETE), i
    assert mod.decode(record[:-1], segment=segment + 1)[0] == INCOMPLETE


def test_version_1_records_are_read_in_any_segment(mod):
    record = mod.encode(3, b"m", b"body")
    for segment in (None, 0, 1, 99, 1 << 40):
        assert mod.decode(record, segment=segment)[:3] == (OK, 3, b"m")


def test_segment_argument_checks(mod):
    record = mod.encode(1, b"m", b"b", 5)
    for bad in (-1, 1 << 63, 1 << 70):
        with pytest.raises(ValueError):
            mod.encode(1, b"m", b"b", bad)
        with pytest.raises(ValueError):
            mod.encode_header(1, b"m", b"b", bad)
        with pytest.raises(ValueError):
            mod.decode(record, 0, 100, bad)
        with pytest.raises(ValueError):
            mod.Decoder(100, bad)
    with pytest.raises(TypeError):
        mod.encode(1, b"m", b"b", 5.0)


def test_decoder_of_a_segment_stops_at_an_older_segments_record(mod):
    own = [mod.encode(1, b"a", b"one", 9), mod.encode(2, b"b", b"two", 9)]
    older = mod.encode(3, b"c", b"three", 8)
    for pieces in splits(b"".join(own) + older + own[0], random.Random(5)):
        decoder = mod.Decoder(segment=9)
        assert feed_all(decoder, pieces) == [(1, b"a", b"one"), (2, b"b", b"two")]
        assert decoder.corrupt


@settings(max_examples=300, deadline=None)
@given(rtype=st.integers(0, 255), meta=st.binary(max_size=64), body=st.binary(max_size=300),
       written=st.integers(0, (1 << 63) - 2), read=st.integers(0, (1 << 63) - 2),
       near=st.integers(-3, 70_000), flip=st.integers(0, 10_000))
def test_compiled_matches_pure_across_segments(rtype, meta, body, written, read, near, flip):
    record = PURE.encode(rtype, meta, body, written)
    assert COMPILED.encode(rtype, meta, body, written) == record
    damaged = bytearray(record)
    damaged[flip % len(damaged)] ^= 1 + flip % 255
    for seg in (read, written, min(max(written + near, 0), (1 << 63) - 2), None):
        for rec in (record, bytes(damaged)):
            got = PURE.decode(rec, 0, 1 << 20, seg)
            assert COMPILED.decode(rec, 0, 1 << 20, seg) == got
            if got[0] == OK:
                assert seg == written   # a version-2 record is valid only in its own segment


# -- Decoder ----------------------------------------------------------------

def feed_all(decoder, pieces):
    records = []
    for piece in pieces:
        records.extend(decoder.feed(piece))
    return records


def cut(data, points):
    """Split *data* at the sorted offsets *points*."""
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def splits(data, rng):
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 20))))
        yield cut(data, cuts)


def test_decoder_any_split(mod):
    segment = b"".join(mod.encode(*sample) for sample in SAMPLES)
    for pieces in splits(segment, random.Random(7)):
        decoder = mod.Decoder()
        assert feed_all(decoder, pieces) == SAMPLES
        assert (decoder.corrupt, decoder.consumed, decoder.pending) == (False, len(segment), 0)


def test_decoder_accepts_bytes_like(mod):
    record = mod.encode(2, b"m", b"b")
    decoder = mod.Decoder()
    assert decoder.feed(bytearray(record[:5])) == []
    assert decoder.feed(memoryview(record)[5:]) == [(2, b"m", b"b")]


def test_decoder_keeps_a_torn_tail_pending(mod):
    first, second = mod.encode(1, b"a", b"one"), mod.encode(2, b"b", b"two")
    decoder = mod.Decoder()
    assert decoder.feed(first + second[:-1]) == [(1, b"a", b"one")]
    assert (decoder.consumed, decoder.pending) == (len(first), len(second) - 1)
    assert decoder.feed(second[-1:]) == [(2, b"b", b"two")]
    assert (decoder.consumed, decoder.pending) == (len(first + second), 0)


def test_decoder_stops_at_the_first_corrupt_record(mod):
    good, bad = mod.encode(1, b"", b"good"), bytearray(mod.encode(2, b"", b"bad"))
    bad[-1] ^= 1
    after = mod.encode(3, b"", b"after")
    stream = good + bad + after
    for pieces in splits(stream, random.Random(3)):
        decoder = mod.Decoder()
        assert feed_all(decoder, pieces) == [(1, b"", b"good")]
        assert decoder.corrupt
        assert (decoder.consumed, decoder.pending) == (len(good), len(bad) + len(after))
    assert decoder.feed(after) == []
    assert decoder.pending == len(bad) + 2 * len(after)


def test_decoder_max_record(mod):
    record = mod.encode(1, b"12", b"345")
    decoder = mod.Decoder(4)
    assert decoder.feed(record[:19]) == []
    assert not decoder.corrupt
    assert decoder.feed(record[19:]) == []
    assert decoder.corrupt


def test_decoder_big_record_fed_in_small_pieces(mod):
    body = bytes(range(256)) * 4096                 # 1 MiB
    record = mod.encode(5, b"meta", body)
    decoder = mod.Decoder()
    got = []
    for i in range(0, len(record), 1000):
        got += decoder.feed(record[i:i + 1000])
    assert got == [(5, b"meta", body)]
    assert decoder.pending == 0


# -- properties -------------------------------------------------------------

records = st.tuples(st.integers(0, 255), st.binary(max_size=64), st.binary(max_size=300))


@settings(max_examples=200, deadline=None)
@given(rtype=st.integers(0, 255), meta=st.binary(max_size=100), body=st.binary(max_size=3000))
def test_round_trip_property(rtype, meta, body):
    encoded = {name: impl.encode(rtype, meta, body) for name, impl in IMPLS.items()}
    assert encoded["pure"] == encoded["compiled"]
    for impl in IMPLS.values():
        assert impl.decode(encoded["pure"]) == (
            OK, rtype, meta, 20 + len(meta), len(body), 20 + len(meta) + len(body))


@settings(max_examples=500, deadline=None)
@given(items=st.lists(records, max_size=5), edits=st.lists(
    st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), max_size=3),
    tear=st.integers(0, 10 ** 6), max_record=st.integers(0, 400), data=st.data())
def test_compiled_matches_pure_on_damaged_streams(items, edits, tear, max_record, data):
    stream = bytearray(b"".join(PURE.encode(*item) for item in items))
    for at, value in edits:
        if stream:
            stream[at % len(stream)] = value
    del stream[tear % (len(stream) + 1):]
    stream = bytes(stream)
    offset = data.draw(st.integers(0, len(stream)))
    assert COMPILED.decode(stream, offset, max_record) == PURE.decode(stream, offset, max_record)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6).map(sorted))
    pieces = cut(stream, cuts)
    results = []
    for impl in IMPLS.values():
        for feed in (pieces, [stream]):
            decoder = impl.Decoder(max_record)
            results.append((feed_all(decoder, feed), decoder.corrupt, decoder.consumed,
                            decoder.pending))
    assert all(result == results[0] for result in results)
    records_out, corrupt, consumed, pending = results[0]
    assert consumed + pending == len(stream)
    if not edits:
        # Undamaged: a prefix of the records, cut short by the tear or an oversized record.
        assert records_out == items[:len(records_out)]
        fits = [len(meta) + len(body) <= max_record for _, meta, body in items]
        assert corrupt == (not all(fits[:len(records_out) + 1]) and len(records_out) < len(items)
                           and consumed + 20 <= len(stream))
