"""Tests of the SMTP input scanner, run against the compiled module and its pure twin.

Every explicit case is fed whole, one byte at a time and at random split
points, and must give the same events each way.  Property tests compare the
two implementations call by call and check DATA, BDAT and command mode
against small byte-level reference models written here.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mta import native, scancodes

PURE = native.load("scanner", pure=True)
COMPILED = native.load("scanner", pure=False)
IMPLS = {"pure": PURE, "compiled": COMPILED}

EV_COMMAND = PURE.EV_COMMAND
EV_COMMAND_TOO_LONG = PURE.EV_COMMAND_TOO_LONG
EV_DATA = PURE.EV_DATA
EV_CHUNK = PURE.EV_CHUNK
BARE_LF = PURE.FLAG_BARE_LF
BARE_CR = PURE.FLAG_BARE_CR
LONG_LINE = PURE.FLAG_LONG_LINE
TOO_BIG = PURE.FLAG_TOO_BIG
EIGHT_BIT = PURE.FLAG_8BIT

LIMITS = {"max_command_line": 512, "max_text_line": 1000, "max_message": 1 << 20}

PUBLIC_NAMES = (
    "EV_COMMAND", "EV_COMMAND_TOO_LONG", "EV_DATA", "EV_CHUNK",
    "MODE_COMMAND", "MODE_DATA", "MODE_CHUNK",
    "FLAG_BARE_LF", "FLAG_BARE_CR", "FLAG_LONG_LINE", "FLAG_TOO_BIG", "FLAG_8BIT", "FLAG_NUL",
)


@pytest.fixture(params=sorted(IMPLS))
def mod(request):
    return IMPLS[request.param]


# -- drivers ----------------------------------------------------------------

def smtp_switch(scanner, event):
    """Switch modes after a command, the way the SMTP protocol does."""
    if event[0] != EV_COMMAND:
        return
    verb, _, arg = event[1].partition(b" ")
    verb = verb.upper()
    if verb == b"DATA":
        scanner.start_data()
    elif verb == b"BDAT":
        words = arg.split()
        scanner.start_chunk(int(words[0]), len(words) > 1 and words[1].upper() == b"LAST")
    elif verb == b"RSET":
        scanner.reset_message()


def run(mod, pieces, **limits):
    """Feed *pieces* with SMTP mode switches; return (events, scanner)."""
    scanner = mod.Scanner(**{**LIMITS, **limits})
    events = []
    for piece in pieces:
        scanner.feed(piece)
        while (event := scanner.next()) is not None:
            events.append(event)
            smtp_switch(scanner, event)
    return events, scanner


def cut(data, points):
    """Split *data* at the sorted offsets *points*."""
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def splits(data, seed=1234):
    """Yield *data* whole, in one-byte pieces and at random split points."""
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
        yield cut(data, cuts)


def scan(mod, data, **limits):
    """Run *data* fed every way; check they agree; return the events."""
    results = []
    for pieces in splits(data):
        events, scanner = run(mod, pieces, **limits)
        results.append((events, scanner.buffered, scanner.mode))
    for other in results[1:]:
        assert other == results[0]
    return results[0][0]


def commands(*lines):
    return [(EV_COMMAND, line, 0) for line in lines]


# -- API --------------------------------------------------------------------

def test_constants_are_the_specified_values():
    expected = dict(zip(PUBLIC_NAMES, (1, 2, 3, 4, 0, 1, 2, 1, 2, 4, 8, 16, 32), strict=True))
    assert {name: getattr(scancodes, name) for name in PUBLIC_NAMES} == expected
    for impl in IMPLS.values():
        assert {name: getattr(impl, name) for name in PUBLIC_NAMES} == expected


def test_mime_flags_share_the_bit_layout():
    for pure in (True, False):
        mime = native.load("mime", pure=pure)
        for name in ("FLAG_BARE_LF", "FLAG_BARE_CR", "FLAG_LONG_LINE", "FLAG_8BIT", "FLAG_NUL"):
            assert getattr(mime, name) == getattr(scancodes, name)
        assert mime.scan_body(b"\xe9\0a\nb\rc" + b"x" * 999 + b"\r\n") == (
            scancodes.FLAG_8BIT | scancodes.FLAG_NUL | scancodes.FLAG_BARE_LF
            | scancodes.FLAG_BARE_CR | scancodes.FLAG_LONG_LINE)


def test_compiled_flags_are_the_declared_ones():
    """The compiled module's C copies of the flags: each one set by the input that sets it."""
    cases = {
        "FLAG_BARE_LF": b"a\nb\r\n", "FLAG_BARE_CR": b"a\rb\r\n",
        "FLAG_LONG_LINE": b"x" * 1000 + b"\r\n", "FLAG_8BIT": b"\xe9\r\n",
        "FLAG_NUL": b"\0\r\n", "FLAG_TOO_BIG": b"y\r\n" * 400_000,
    }
    for name, text in cases.items():
        for impl in IMPLS.values():
            assert scan(impl, b"DATA\r\n" + text + b".\r\n")[1][2] == getattr(scancodes, name)


def test_limits_are_validated(mod):
    with pytest.raises(ValueError):
        mod.Scanner(0, 1000, 100)
    with pytest.raises(ValueError):
        mod.Scanner(512, 0, 100)
    with pytest.raises(ValueError):
        mod.Scanner(512, 1000, -1)
    with pytest.raises(TypeError):
        mod.Scanner(512.0, 1000, 100)
    scanner = mod.Scanner(512, 1000, 1 << 80)   # past sys.maxsize: no limit
    with pytest.raises(ValueError):
        scanner.start_chunk(-1, False)
    with pytest.raises(TypeError):
        scanner.start_chunk("1", False)
    with pytest.raises(TypeError):
        scanner.feed("text")


def test_feed_accepts_bytes_like(mod):
    scanner = mod.Scanner(**LIMITS)
    scanner.feed(bytearray(b"NO"))
    scanner.feed(memoryview(b"OP\r"))
    scanner.feed(b"")
    scanner.feed(memoryview(b"x\nQUIT\r\n")[1:])
    assert scanner.next() == (EV_COMMAND, b"NOOP", 0)
    assert scanner.next() == (EV_COMMAND, b"QUIT", 0)
    assert scanner.next() is None


# -- command mode -----------------------------------------------------------

def test_pipelined_commands(mod):
    data = b"EHLO client.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nNOOP\r\n\r\nQUIT\r\n"
    assert scan(mod, data) == commands(
        b"EHLO client.example", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"NOOP", b"", b"QUIT")


def test_partial_command_waits_for_crlf(mod):
    scanner = mod.Scanner(**LIMITS)
    scanner.feed(b"NOOP\r")
    assert scanner.next() is None
    assert scanner.buffered == 5
    assert scanner.next() is None
    scanner.feed(b"\nNO")
    assert scanner.next() == (EV_COMMAND, b"NOOP", 0)
    assert scanner.next() is None
    assert scanner.buffered == 2


def test_bare_cr_and_lf_do_not_end_a_command(mod):
    data = b"NOOP\nRSET\r\nNO\rOP\r\nA\r\rB\n\r\n"
    assert scan(mod, data) == commands(b"NOOP\nRSET", b"NO\rOP", b"A\r\rB\n")


def test_command_line_limit_counts_the_crlf(mod):
    data = b"12345678\r\n123456789\r\nok\r\n"
    assert scan(mod, data, max_command_line=10) == [
        (EV_COMMAND, b"12345678", 0), (EV_COMMAND_TOO_LONG, None, 0), (EV_COMMAND, b"ok", 0)]


def test_each_over_long_line_is_one_event(mod):
    data = b"A" * 40 + b"\r\n" + b"B\rB\nB" * 10 + b"\r\n" + b"NOOP\r\n" + b"C" * 11 + b"\r\n"
    assert scan(mod, data, max_command_line=12) == [
        (EV_COMMAND_TOO_LONG, None, 0), (EV_COMMAND_TOO_LONG, None, 0),
        (EV_COMMAND, b"NOOP", 0), (EV_COMMAND_TOO_LONG, None, 0)]


def test_over_long_command_is_discarded_as_it_arrives(mod):
    scanner = mod.Scanner(512, 1000, 1 << 20)
    for _ in range(1000):
        scanner.feed(b"X" * 1023 + b"\r")
        assert scanner.next() is None
        assert scanner.buffered <= 512
    scanner.feed(b"\nQUIT\r\n")
    assert scanner.next() == (EV_COMMAND_TOO_LONG, None, 0)
    assert scanner.next() == (EV_COMMAND, b"QUIT", 0)


def test_command_arriving_in_small_pieces_is_scanned_once(mod):
    # A rescan from the start of the line on every feed would take minutes here.
    scanner = mod.Scanner(1 << 21, 1000, 1 << 20)
    for _ in range(1 << 17):
        scanner.feed(b"AAAAAAA\r")
        assert scanner.next() is None
    scanner.feed(b"\n")
    event = scanner.next()
    assert event[0] == EV_COMMAND and len(event[1]) == (1 << 20) - 1


# -- DATA mode --------------------------------------------------------------

def test_data_is_dot_unstuffed_and_ends_at_crlf_dot_crlf(mod):
    data = (b"MAIL FROM:<a@b>\r\nDATA\r\n.first\r\nplain\r\n...\r\n..\r\n. \r\n.x.\r\n"
            b"last\r\n.\r\nQUIT\r\n")
    assert scan(mod, data) == [
        *commands(b"MAIL FROM:<a@b>", b"DATA"),
        (EV_DATA, b"first\r\nplain\r\n..\r\n.\r\n \r\nx.\r\nlast\r\n", 0),
        *commands(b"QUIT")]


def test_empty_message(mod):
    assert scan(mod, b"DATA\r\n.\r\nQUIT\r\n") == [
        *commands(b"DATA"), (EV_DATA, b"", 0), *commands(b"QUIT")]


def test_message_of_one_empty_line(mod):
    assert scan(mod, b"DATA\r\n\r\n.\r\n") == [*commands(b"DATA"), (EV_DATA, b"\r\n", 0)]


def test_data_waits_for_the_whole_terminator(mod):
    scanner = mod.Scanner(**LIMITS)
    scanner.start_data()
    for piece in (b"a\r", b"\n", b".", b"\r"):
        scanner.feed(piece)
        assert scanner.next() is None
    scanner.feed(b"\n")
    assert scanner.next() == (mod.EV_DATA, b"a\r\n", 0)
    assert scanner.mode == mod.MODE_COMMAND


def test_pipelined_transactions(mod):
    one = (b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: s\r\n\r\n..body\r\n.\r\n")
    events = scan(mod, one * 3 + b"QUIT\r\n")
    transaction = [*commands(b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA"),
                   (EV_DATA, b"Subject: s\r\n\r\n.body\r\n", 0)]
    assert events == transaction * 3 + commands(b"QUIT")


SMUGGLED = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n.\r\n"

# (false end of data, flags it must raise)
SMUGGLING = [
    (b"\n.\n", BARE_LF),
    (b"\r.\r", BARE_CR),
    (b"\n.\r\n", BARE_LF),
    (b"\r\n.\n", BARE_LF),
    (b"\r\n.\r", BARE_CR),
    (b"\r.\r\n", BARE_CR),
    (b"\n.\r", BARE_LF | BARE_CR),
    (b"\r.\n", BARE_LF | BARE_CR),
    (b"\r\n\n.\r\n", BARE_LF),
    (b"\r\n\r.\r\n", BARE_CR),
    (b"\r\n.\n\r\n", BARE_LF),
    (b"\r\n.\r\r\n", BARE_CR),
]


@pytest.mark.parametrize("false_end, flags", SMUGGLING, ids=[repr(s) for s, _ in SMUGGLING])
def test_smuggling_attempt_stays_inside_the_message(mod, false_end, flags):
    data = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nhello" + false_end + SMUGGLED + b"QUIT\r\n"
    events = scan(mod, data)
    assert [e[0] for e in events] == [EV_COMMAND] * 3 + [EV_DATA, EV_COMMAND]
    _, payload, got = events[3]
    assert b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n" in payload
    assert payload.startswith(b"hello") and payload.endswith(b"smuggled\r\n")
    assert got == flags
    assert events[4] == (EV_COMMAND, b"QUIT", 0)


def test_bare_line_ends_are_content_and_flagged(mod):
    data = b"DATA\r\na\nb\r\nc\rd\r\n.\r\n"
    assert scan(mod, data)[1] == (EV_DATA, b"a\nb\r\nc\rd\r\n", BARE_LF | BARE_CR)


def test_bare_lf_at_the_start_of_data(mod):
    assert scan(mod, b"DATA\r\n\n\r\n.\r\n")[1] == (EV_DATA, b"\n\r\n", BARE_LF)


def test_long_lines(mod):
    ok = b"x" * 8 + b"\r\n"             # 10 octets with its CRLF
    stuffed = b"." + ok                 # 10 after unstuffing
    long = b"y" * 9 + b"\r\n"
    assert scan(mod, b"DATA\r\n" + ok + stuffed + b".\r\n", max_text_line=10)[1] == (
        EV_DATA, ok + ok, 0)
    assert scan(mod, b"DATA\r\n" + ok + long + ok + b".\r\n", max_text_line=10)[1] == (
        EV_DATA, ok + long + ok, LONG_LINE)


def test_line_with_bare_line_ends_is_one_long_line(mod):
    data = b"DATA\r\n" + b"abc\ndef\rghi\r\n" + b".\r\n"
    assert scan(mod, data, max_text_line=12)[1][2] == BARE_LF | BARE_CR | LONG_LINE
    assert scan(mod, data, max_text_line=13)[1][2] == BARE_LF | BARE_CR


def test_8bit(mod):
    assert scan(mod, b"DATA\r\ncaf\xc3\xa9\r\n.\r\n")[1] == (EV_DATA, b"caf\xc3\xa9\r\n", EIGHT_BIT)
    assert scan(mod, b"DATA\r\n" + b"a" * 20 + b"\xff\r\n.\r\n")[1][2] == EIGHT_BIT


def test_too_big_counts_octets_after_unstuffing(mod):
    fits = b"." * 99 + b"\r\n"          # 98 + CRLF = 100 octets after unstuffing
    assert scan(mod, b"DATA\r\n" + fits + b".\r\n", max_message=100)[1] == (
        EV_DATA, b"." * 98 + b"\r\n", 0)
    events = scan(mod, b"DATA\r\n" + b"." + fits + b".\r\nQUIT\r\n", max_message=100)
    assert events[1:] == [(EV_DATA, b"", TOO_BIG), *commands(b"QUIT")]


def test_too_big_message_is_not_buffered(mod):
    max_message = 1 << 20
    piece = (b"x" * 76 + b"\r\n" + b".." + b"y" * 74 + b"\r\n") * 420     # ~64 KB
    scanner = mod.Scanner(512, 1000, max_message)
    scanner.feed(b"DATA\r\n")
    smtp_switch(scanner, scanner.next())
    sent = 0
    while sent < 50 << 20:
        scanner.feed(piece)
        sent += len(piece)
        assert scanner.next() is None
        assert scanner.buffered <= max_message
        if sent > max_message + len(piece):
            assert scanner.buffered <= 2
    scanner.feed(b".\r\nQUIT\r\n")
    assert scanner.next() == (EV_DATA, b"", TOO_BIG)
    assert scanner.next() == (EV_COMMAND, b"QUIT", 0)
    assert scanner.buffered == 0


def test_flags_and_size_reset_per_message(mod):
    data = (b"DATA\r\n\xff\n" + b"z" * 50 + b"\r\n.\r\nDATA\r\nclean\r\n.\r\n")
    events = scan(mod, data, max_text_line=20, max_message=40)
    assert events[1] == (EV_DATA, b"", BARE_LF | EIGHT_BIT | LONG_LINE | TOO_BIG)
    assert events[3] == (EV_DATA, b"clean\r\n", 0)


# -- BDAT mode --------------------------------------------------------------

def test_chunks(mod):
    data = b"BDAT 5\r\nhelloBDAT 7 LAST\r\n\r\n.\r\n\nxQUIT\r\n"
    assert scan(mod, data) == [
        *commands(b"BDAT 5"), (EV_CHUNK, b"hello", 0),
        *commands(b"BDAT 7 LAST"), (EV_CHUNK, b"\r\n.\r\n\nx", BARE_LF),
        *commands(b"QUIT")]


def test_chunk_is_not_parsed_for_commands_or_dots(mod):
    inner = b"..\r\n.\r\n" + SMUGGLED
    data = b"BDAT %d LAST\r\n" % len(inner) + inner + b"NOOP\r\n"
    assert scan(mod, data)[1:] == [(EV_CHUNK, inner, 0), *commands(b"NOOP")]


def test_crlf_split_across_chunks_is_not_bare(mod):
    data = b"BDAT 3\r\nab\rBDAT 3 LAST\r\n\ncd"
    assert scan(mod, data)[1::2] == [(EV_CHUNK, b"ab\r", 0), (EV_CHUNK, b"\ncd", 0)]


def test_cr_ending_a_chunk_is_classified_by_the_next(mod):
    data = b"BDAT 3\r\nab\rBDAT 2 LAST\r\nxy"
    assert scan(mod, data)[1::2] == [(EV_CHUNK, b"ab\r", 0), (EV_CHUNK, b"xy", BARE_CR)]


def test_cr_ending_the_last_chunk_is_bare(mod):
    data = b"BDAT 2\r\naxBDAT 2 LAST\r\nb\rBDAT 3 LAST\r\nc\r\n"
    assert scan(mod, data)[1::2] == [
        (EV_CHUNK, b"ax", 0), (EV_CHUNK, b"b\r", BARE_CR), (EV_CHUNK, b"c\r\n", 0)]


def test_cr_before_an_empty_last_chunk_is_bare(mod):
    data = b"BDAT 2\r\nz\rBDAT 0 LAST\r\n"
    assert scan(mod, data)[1::2] == [(EV_CHUNK, b"z\r", 0), (EV_CHUNK, b"", BARE_CR)]


def test_empty_chunk(mod):
    scanner = mod.Scanner(**LIMITS)
    scanner.start_chunk(0, False)
    assert scanner.mode == mod.MODE_CHUNK
    assert scanner.next() == (mod.EV_CHUNK, b"", 0)
    assert scanner.mode == mod.MODE_COMMAND


def test_flags_are_cumulative_over_the_chunks_of_a_message(mod):
    data = b"BDAT 4\r\na\nb\xffBDAT 6\r\n123456BDAT 2 LAST\r\n\r\nBDAT 1 LAST\r\nq"
    assert scan(mod, data, max_text_line=8)[1::2] == [
        (EV_CHUNK, b"a\nb\xff", BARE_LF | EIGHT_BIT),
        (EV_CHUNK, b"123456", BARE_LF | EIGHT_BIT | LONG_LINE),      # "a\nb\xff123456" so far
        (EV_CHUNK, b"\r\n", BARE_LF | EIGHT_BIT | LONG_LINE),
        (EV_CHUNK, b"q", 0)]


def test_line_length_spans_chunks(mod):
    data = b"BDAT 5\r\nabcdeBDAT 5 LAST\r\nfgh\r\n"
    assert scan(mod, data, max_text_line=10)[3] == (EV_CHUNK, b"fgh\r\n", 0)
    assert scan(mod, data, max_text_line=9)[3] == (EV_CHUNK, b"fgh\r\n", LONG_LINE)


def test_chunks_too_big_across_the_message(mod):
    data = b"BDAT 6\r\nabcdefBDAT 6\r\nghijklBDAT 1 LAST\r\nmRSET\r\nBDAT 10 LAST\r\n0123456789"
    assert [e for e in scan(mod, data, max_message=10) if e[0] == EV_CHUNK] == [
        (EV_CHUNK, b"abcdef", 0), (EV_CHUNK, b"", TOO_BIG), (EV_CHUNK, b"", TOO_BIG),
        (EV_CHUNK, b"0123456789", 0)]


def test_reset_message_forgets_chunk_state(mod):
    data = b"BDAT 4\r\n123\rRSET\r\nBDAT 4 LAST\r\n\n567"
    assert scan(mod, data, max_message=6) == [
        *commands(b"BDAT 4"), (EV_CHUNK, b"123\r", 0),
        *commands(b"RSET", b"BDAT 4 LAST"), (EV_CHUNK, b"\n567", BARE_LF)]


def test_too_big_chunks_are_not_buffered(mod):
    scanner = mod.Scanner(512, 1000, 1 << 16)
    scanner.start_chunk(10 << 20, True)
    piece = b"a" * 99 + b"\n"
    for _ in range((10 << 20) // len(piece)):
        scanner.feed(piece)
        assert scanner.next() is None
        assert scanner.buffered <= 1 << 16
    scanner.feed(b"b" * ((10 << 20) % len(piece)) + b"NOOP\r\n")
    assert scanner.next() == (EV_CHUNK, b"", BARE_LF | LONG_LINE | TOO_BIG)
    assert scanner.next() == (EV_COMMAND, b"NOOP", 0)


# -- discard ----------------------------------------------------------------

def test_discard_drops_pipelined_input_after_starttls(mod):
    scanner = mod.Scanner(**LIMITS)
    scanner.feed(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT")
    assert scanner.next() == (EV_COMMAND, b"STARTTLS", 0)
    assert scanner.buffered == len(b"MAIL FROM:<evil@x>\r\nRCPT")
    assert scanner.discard() == len(b"MAIL FROM:<evil@x>\r\nRCPT")
    assert scanner.buffered == 0
    assert scanner.next() is None
    assert scanner.discard() == 0
    scanner.feed(b"EHLO tls\r\n")
    assert scanner.next() == (EV_COMMAND, b"EHLO tls", 0)


def test_discard_ends_an_over_long_line(mod):
    scanner = mod.Scanner(8, 1000, 100)
    scanner.feed(b"0123456789")
    assert scanner.next() is None
    assert scanner.discard() == 0
    scanner.feed(b"NOOP\r\n")
    assert scanner.next() == (EV_COMMAND, b"NOOP", 0)


# -- reference models -------------------------------------------------------

def message_flags(content, line_limit, size_limit, final=True):
    """Flags of message content, byte by byte (a CR at the end is bare only if final)."""
    flags = 0
    for i, octet in enumerate(content):
        if octet == 0x0A and (i == 0 or content[i - 1] != 0x0D):
            flags |= BARE_LF
        if octet == 0x0D and (i + 1 < len(content) and content[i + 1] != 0x0A
                              or i + 1 == len(content) and final):
            flags |= BARE_CR
        if octet >= 0x80:
            flags |= EIGHT_BIT
    lines = content.split(b"\r\n")
    if any(len(line) + 2 > line_limit for line in lines[:-1]) or len(lines[-1]) > line_limit:
        flags |= LONG_LINE
    if len(content) > size_limit:
        flags |= TOO_BIG
    return flags


def reference_data(stream, line_limit, size_limit):
    """Return the EV_DATA event and the rest of *stream*, or None: lines end only at CRLF."""
    lines = []
    start = 0
    while True:
        end = stream.find(b"\r\n", start) + 2
        if end == 1:
            return None
        line = stream[start:end]
        start = end
        if line == b".\r\n":
            break
        lines.append(line[1:] if line.startswith(b".") else line)
    content = b"".join(lines)
    flags = message_flags(content, line_limit, size_limit)
    return (EV_DATA, b"" if flags & TOO_BIG else content, flags), stream[start:]


def reference_commands(stream, line_limit):
    events = []
    lines = stream.split(b"\r\n")
    for line in lines[:-1]:
        if len(line) + 2 > line_limit:
            events.append((EV_COMMAND_TOO_LONG, None, 0))
        else:
            events.append((EV_COMMAND, line, 0))
    return events


# -- properties -------------------------------------------------------------

TOKENS = [b"\r", b"\n", b".", b"A", b"\x80", b"\r\n", b".\r\n", b"\r\n.\r\n", b"..", b"BDAT"]
streams = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)
# After each event: 0 stay, 1 start_data, 2 start_chunk, 3 reset_message.
actions = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12), st.booleans()),
                   min_size=1, max_size=6)
limits = st.fixed_dictionaries({
    "max_command_line": st.integers(2, 14),
    "max_text_line": st.integers(1, 12),
    "max_message": st.integers(0, 40),
})


MAX_SWITCHES = 100


def apply(scanner, action):
    kind, size, last = action
    if kind == 1:
        scanner.start_data()
    elif kind == 2:
        scanner.start_chunk(size, last)
    elif kind == 3:
        scanner.reset_message()


def trace(mod, pieces, plan, limit):
    """Feed *pieces*, switching modes by *plan*; record every result and the buffered count."""
    scanner = mod.Scanner(**limit)
    apply(scanner, plan[0])
    calls = []
    events = 0
    for piece in [b"", *pieces]:            # an empty chunk needs no input
        scanner.feed(piece)
        while True:
            event = scanner.next()
            calls.append((event, scanner.buffered, scanner.mode))
            if event is None:
                break
            events += 1
            if events < MAX_SWITCHES:       # a plan of empty chunks would never stop
                apply(scanner, plan[events % len(plan)])
    return calls, scanner


def events_of(calls):
    return [event for event, _, _ in calls if event is not None]


@settings(max_examples=600, deadline=None)
@given(stream=streams, plan=actions, limit=limits, data=st.data())
def test_split_points_do_not_matter(stream, plan, limit, data):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8).map(sorted))
    random_pieces = cut(stream, cuts)
    byte_pieces = [stream[i:i + 1] for i in range(len(stream))]
    for mod in IMPLS.values():
        whole, scanner = trace(mod, [stream], plan, limit)
        end_state = (scanner.buffered, scanner.mode)
        for pieces in (byte_pieces, random_pieces):
            calls, scanner = trace(mod, pieces, plan, limit)
            assert events_of(calls) == events_of(whole)
            assert (scanner.buffered, scanner.mode) == end_state


@settings(max_examples=600, deadline=None)
@given(stream=streams, plan=actions, limit=limits, data=st.data())
def test_compiled_matches_pure_call_by_call(stream, plan, limit, data):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8).map(sorted))
    pieces = cut(stream, cuts)
    assert trace(COMPILED, pieces, plan, limit)[0] == trace(PURE, pieces, plan, limit)[0]


@settings(max_examples=400, deadline=None)
@given(stream=streams, limit=limits)
def test_data_matches_reference(stream, limit):
    expected = reference_data(stream, limit["max_text_line"], limit["max_message"])
    for mod in IMPLS.values():
        for pieces in ([stream], [stream[i:i + 1] for i in range(len(stream))]):
            scanner = mod.Scanner(**limit)
            scanner.start_data()
            event = None
            for piece in pieces:
                scanner.feed(piece)
                if event is None:
                    event = scanner.next()
            if expected is None:
                assert event is None
            else:
                assert event == expected[0]
                assert scanner.buffered == len(expected[1])


@settings(max_examples=400, deadline=None)
@given(stream=streams, limit=limits)
def test_commands_match_reference(stream, limit):
    expected = reference_commands(stream, limit["max_command_line"])
    for mod in IMPLS.values():
        for pieces in ([stream], [stream[i:i + 1] for i in range(len(stream))]):
            scanner = mod.Scanner(**limit)
            events = []
            for piece in pieces:
                scanner.feed(piece)
                while (event := scanner.next()) is not None:
                    events.append(event)
            assert events == expected


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(streams, min_size=1, max_size=4), limit=limits, data=st.data())
def test_chunks_match_reference(chunks, limit, data):
    stream = b"".join(chunks)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6).map(sorted))
    pieces = cut(stream, cuts)
    expected = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        flags = message_flags(b"".join(chunks[:i + 1]), limit["max_text_line"],
                              limit["max_message"], final=last)
        expected.append((EV_CHUNK, b"" if flags & TOO_BIG else chunk, flags))
    for mod in IMPLS.values():
        scanner = mod.Scanner(**limit)
        scanner.start_chunk(len(chunks[0]), len(chunks) == 1)
        events = []
        for piece in pieces:
            scanner.feed(piece)
            while (event := scanner.next()) is not None:
                events.append(event)
                if len(events) < len(chunks):
                    scanner.start_chunk(len(chunks[len(events)]), len(events) == len(chunks) - 1)
        assert events == expected
        assert scanner.buffered == 0


@pytest.mark.parametrize("last", [False, True])
def test_a_chunk_not_kept_is_read_and_dropped(mod, last):
    # (a BDAT the session refuses -- no transaction -- must still be read, RFC 3030; it
    # was held whole, up to max_message, for a client that may not even relay)
    s = mod.Scanner(512, 1000, 1 << 20)
    s.feed(b"BDAT 5\r\nabcde")                  # a kept chunk of a message in progress
    ev = s.next()
    s.start_chunk(5, False)
    assert s.next() == (EV_CHUNK, b"abcde", 0)
    s.start_chunk(3 << 20, last, False)        # larger than max_message: no FLAG_TOO_BIG
    piece = b"\r\n.\r\n\x00x\ry\n" * 6000
    sent = 0
    while sent + len(piece) <= 3 << 20:
        s.feed(piece)
        sent += len(piece)
        assert s.next() is None
        assert s.buffered < 1024, s.buffered   # nothing held
    s.feed(b"z" * ((3 << 20) - sent) + b"NOOP\r\n")
    assert s.next() == (EV_CHUNK, b"", 0)
    assert s.mode == mod.MODE_COMMAND
    assert s.next() == (EV_COMMAND, b"NOOP", 0)
    # the message in progress goes on (the dropped chunk's NUL and bare CR / LF are
    # not its flags)
    s.start_chunk(2, True)
    s.feed(b"fg")
    assert s.next() == (EV_CHUNK, b"fg", 0)
    assert ev == (EV_COMMAND, b"BDAT 5", 0)
