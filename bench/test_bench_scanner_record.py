"""Microbenchmarks: SMTP input scanner and spool record codec, compiled vs pure twin.

Run: python -m pytest bench/test_bench_scanner_record.py --benchmark-only

One benchmark group per operation, each with the compiled module and the pure
twin side by side:

* scanner: a session of 20 pipelined transactions (MAIL, RCPT, DATA and a 2 KB
  dot-stuffed message; then QUIT) fed whole, the same fed in 1460-byte TCP
  segments, and the same with BDAT instead of DATA;
* record: encode, encode_header, decode and Decoder.feed of one record with
  100 bytes of meta and a 2 KB body, as the spool writes them (version 2: numbered
  for its segment, SEGMENT below), and decode of a version-1 record (older spools).
"""

import pytest

from mta import native

IMPLS = ["compiled", "pure"]
TRANSACTIONS = 20
MESSAGE_BYTES = 2048
SEGMENT_BYTES = 1460                # one TCP segment on Ethernet
LIMITS = (512, 1000, 35 << 20)      # max_command_line, max_text_line, max_message


def load(name, impl):
    return native.load(name, pure=impl == "pure")


def message():
    """A ~2 KB message: headers, then 78-octet lines, every eighth one starting with a dot."""
    head = (b"From: Sender <sender@example.com>\r\nTo: rcpt@example.net\r\n"
            b"Subject: benchmark\r\nMessage-ID: <1@example.com>\r\n\r\n")
    count = (MESSAGE_BYTES - len(head)) // 78
    return head + b"".join((b"." if i % 8 == 7 else b"") + b"%04d " % i + b"x" * 71 + b"\r\n"
                           for i in range(count))


MESSAGE = message()
STUFFED = b"".join(b"." + line if line.startswith(b".") else line
                   for line in MESSAGE.splitlines(keepends=True))
ENVELOPE = b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.net>\r\n"
DATA_SESSION = (ENVELOPE + b"DATA\r\n" + STUFFED + b".\r\n") * TRANSACTIONS + b"QUIT\r\n"
BDAT_SESSION = (ENVELOPE + b"BDAT %d LAST\r\n" % len(MESSAGE) + MESSAGE) * TRANSACTIONS + b"QUIT\r\n"
DATA_SEGMENTS = [DATA_SESSION[i:i + SEGMENT_BYTES]
                 for i in range(0, len(DATA_SESSION), SEGMENT_BYTES)]


def session(mod, pieces):
    """Scan one session the way the protocol does; return the messages received."""
    scanner = mod.Scanner(*LIMITS)
    ev_command, ev_data, ev_chunk = mod.EV_COMMAND, mod.EV_DATA, mod.EV_CHUNK
    messages = 0
    for piece in pieces:
        scanner.feed(piece)
        while (event := scanner.next()) is not None:
            kind, payload, _ = event
            if kind == ev_command:
                if payload == b"DATA":
                    scanner.start_data()
                elif payload.startswith(b"BDAT "):
                    scanner.start_chunk(int(payload.split()[1]), True)
            elif kind == ev_data or kind == ev_chunk:
                messages += 1
    return messages


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_data_session(benchmark, impl):
    benchmark.group = "scanner: 20 pipelined DATA transactions, fed whole"
    mod = load("scanner", impl)
    assert benchmark(session, mod, [DATA_SESSION]) == TRANSACTIONS


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_data_session_segments(benchmark, impl):
    benchmark.group = "scanner: 20 pipelined DATA transactions, 1460-byte segments"
    mod = load("scanner", impl)
    assert benchmark(session, mod, DATA_SEGMENTS) == TRANSACTIONS


@pytest.mark.parametrize("impl", IMPLS)
def test_scan_bdat_session(benchmark, impl):
    benchmark.group = "scanner: 20 pipelined BDAT transactions, fed whole"
    mod = load("scanner", impl)
    assert benchmark(session, mod, [BDAT_SESSION]) == TRANSACTIONS


META = b'{"queue_id":"7Kx2bQ9","sender":"sender@example.com","rcpt":["rcpt@example.net"]}'.ljust(100)
SEGMENT = 1234                      # the segment the records are written for
RECORD = load("record", "pure").encode(1, META, MESSAGE, SEGMENT)
RECORD_V1 = load("record", "pure").encode(1, META, MESSAGE)


@pytest.mark.parametrize("impl", IMPLS)
def test_record_encode(benchmark, impl):
    benchmark.group = "record: encode, 2 KB body"
    mod = load("record", impl)
    assert benchmark(mod.encode, 1, META, MESSAGE, SEGMENT) == RECORD


@pytest.mark.parametrize("impl", IMPLS)
def test_record_encode_header(benchmark, impl):
    benchmark.group = "record: encode_header, 2 KB body"
    mod = load("record", impl)
    assert benchmark(mod.encode_header, 1, META, MESSAGE, SEGMENT) == RECORD[:20]


@pytest.mark.parametrize("impl", IMPLS)
def test_record_decode(benchmark, impl):
    benchmark.group = "record: decode, 2 KB body"
    mod = load("record", impl)
    assert benchmark(mod.decode, RECORD, 0, mod.DEFAULT_MAX_RECORD, SEGMENT)[0] == mod.OK


@pytest.mark.parametrize("impl", IMPLS)
def test_record_decode_version_1(benchmark, impl):
    benchmark.group = "record: decode of a version-1 record, 2 KB body"
    mod = load("record", impl)
    assert benchmark(mod.decode, RECORD_V1)[0] == mod.OK


@pytest.mark.parametrize("impl", IMPLS)
def test_record_decoder_feed(benchmark, impl):
    benchmark.group = "record: Decoder.feed of one whole record, 2 KB body"
    mod = load("record", impl)
    decoder = mod.Decoder(mod.DEFAULT_MAX_RECORD, SEGMENT)
    assert benchmark(decoder.feed, RECORD) == [(1, META, MESSAGE)]
