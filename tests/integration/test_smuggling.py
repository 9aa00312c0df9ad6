"""SMTP smuggling: a fake end-of-data inside DATA never starts a second transaction.

Every fake end-of-data sequence (bare LF / bare CR variants) followed by a
smuggled second transaction inside DATA produces no second message: the
daemon's documented policy is that only CRLF "." CRLF ends DATA and that a
message containing a bare CR or bare LF is rejected with 550 5.6.0.  Each
dialogue is sent twice: pipelined in one write, and one byte per write (so the
fake terminator is split across reads in every possible place).  The whole
transcript of replies is compared, so a reply to a smuggled command would show.
"""
import socket
import time

import pytest

from daemon import HOST
from mta.acceptor import replies as R

GREETING = b"220 mta.test ESMTP\r\n"
SMUGGLED = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\n"
            b"DATA\r\nsmuggled\r\n")
REAL_END = b"\r\n.\r\n"
ENVELOPE = (b"EHLO client.test\r\nMAIL FROM:<sender@example.com>\r\n"
            b"RCPT TO:<rcpt@example.net>\r\nDATA\r\n")
TRAILER = b"NOOP\r\nQUIT\r\n"


@pytest.fixture(scope="module")
def mta(make_module_daemon):
    return make_module_daemon(acceptors=1, shards=1)


def split_replies(data: bytes) -> list[bytes]:
    """Cut a reply stream into whole (possibly multi-line) replies."""
    out, cur = [], b""
    lines = data.split(b"\r\n")
    assert lines[-1] == b"", f"reply stream does not end with CRLF: {data[-80:]!r}"
    for line in lines[:-1]:
        cur += line + b"\r\n"
        if line[3:4] != b"-":
            out.append(cur)
            cur = b""
    assert cur == b""
    return out


def dialogue(d, script: bytes, byte_by_byte: bool) -> list[bytes]:
    """Send *script* (which ends with QUIT) and return every reply until the server closes."""
    with socket.create_connection((HOST, d.port), timeout=20) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if byte_by_byte:
            for i in range(len(script)):
                s.sendall(script[i:i + 1])
                time.sleep(0.0003)
        else:
            s.sendall(script)
        data = b""
        while True:
            got = s.recv(65536)
            if not got:
                break
            data += got
    replies = split_replies(data)
    assert replies[0] == GREETING
    assert replies[1].startswith(b"250-mta.test\r\n") and b"CHUNKING" in replies[1]
    return replies[2:]


# Fake terminators that follow "text" (a line in progress).
FAKE_AFTER_TEXT = [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r",
    b"\r\n.\r\r\n", b"\n..\n", b"\r\n.\n\r\n", b"\r\n.\n\n", b"\n\n.\n\n", b"\r\r.\r\r",
    b"\n\r.\r\n", b"\r\n\r.\r\n", b"\n.\r\r\n", b"\r\n.\r\x00\n", b"\r\n\n.\r\n",
    b"\r\n.\r.\r\n",
]
# Fake terminators as the very first bytes of DATA.
FAKE_AT_START = [b".\n", b".\r", b".\r\r\n", b"\n.\n", b"\r.\r\n", b"\n.\r\n"]

# Lookalikes with a NUL: a server downstream that drops NULs would see a "." line we did
# not, so a message with a NUL is refused too.
NUL_LOOKALIKES = [(b"\r\n\x00.\r\n", "NUL-dot"), (b"\r\n.\x00\r\n", "dot-NUL"),
                  (b"\r\nplain\x00text\r\n", "NUL-in-text")]

# (what DATA starts with, before the smuggled transaction; the reply refusing the message)
CASES = ([pytest.param(b"Subject: t\r\n\r\ntext" + f, R.BARE_LINE_END, id=f"text+{f!r}")
          for f in FAKE_AFTER_TEXT]
         + [pytest.param(f, R.BARE_LINE_END, id=f"start+{f!r}") for f in FAKE_AT_START]
         + [pytest.param(b"Subject: t\r\n\r\ntext" + f, R.NUL_IN_TEXT, id=name)
            for f, name in NUL_LOOKALIKES])


@pytest.mark.parametrize("head, refusal", CASES)
def test_fake_end_of_data_smuggles_nothing(mta, head, refusal):
    body = head + SMUGGLED + REAL_END
    # The case itself is sound: the only real end of data is the one at the end.
    assert body.find(b"\r\n.\r\n") == len(body) - 5 and not body.startswith(b".\r\n")
    for byte_by_byte in (False, True):
        replies = dialogue(mta, ENVELOPE + body + TRAILER, byte_by_byte)
        assert replies == [R.SENDER_OK, R.RCPT_OK, R.START_DATA, refusal, R.OK, R.BYE], \
            f"byte_by_byte={byte_by_byte}"
    assert mta.queue_list() == []


QUEUED = b"250 2.0.0 Ok: queued as "


def queued_id(reply: bytes) -> str:
    """The queue id of a 250 reply to the end of a message."""
    assert reply.startswith(QUEUED), reply
    return reply[len(QUEUED):-2].decode()


def _accepted_once(mta, replies: list[bytes]) -> str:
    assert replies[:3] == [R.SENDER_OK, R.RCPT_OK, R.START_DATA]
    assert replies[4:] == [R.OK, R.BYE]
    return queued_id(replies[3])


def only_message(mta, qid: str, sender: str, rcpt: str) -> bytes:
    """The queue holds exactly the message qid from sender to rcpt: its stored bytes.
    It is deleted, so the next case starts with an empty queue."""
    q = mta.queue_list()
    assert [(x["queue_id"], x["sender"], x["recipients"]) for x in q] == [(qid, sender, [rcpt])]
    raw = mta.cli("queue", "show", "--raw", qid).stdout
    mta.cli("queue", "delete", qid)
    return raw


@pytest.mark.parametrize("between, stored", [
    pytest.param(b"\r\n", b"\r\n", id="plain-line-break"),
    pytest.param(b"\r\n. \r\n", b"\r\n \r\n", id="dot-space"),
    pytest.param(b"\r\n..\r\n", b"\r\n.\r\n", id="dot-stuffed-dot"),
])
def test_lookalike_content_is_one_message(mta, between, stored):
    """Control: with no bare CR/LF or NUL the text is one message, kept exact."""
    head = b"Subject: t\r\n\r\ntext"
    body = head + between + SMUGGLED + REAL_END
    expected = head + stored + SMUGGLED + b"\r\n"
    for byte_by_byte in (False, True):
        qid = _accepted_once(mta, dialogue(mta, ENVELOPE + body + TRAILER, byte_by_byte))
        raw = only_message(mta, qid, "sender@example.com", "rcpt@example.net")
        assert raw.startswith(b"Received: ") and raw.endswith(b"\r\n" + expected)


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


BDAT_ENVELOPE = (b"EHLO client.test\r\nMAIL FROM:<sender@example.com>\r\n"
                 b"RCPT TO:<rcpt@example.net>\r\n")
TEXT = b"Subject: t\r\n\r\ntext"


def chunk_ok(n: int) -> bytes:
    return R.CHUNK_OK.format(n=n).encode()


def test_bdat_bare_line_ends_rejected_at_last(mta):
    """Bare LF / CR inside BDAT chunks (or a CR split across chunks) rejects the message."""
    smuggle = TEXT + b"\n.\n" + SMUGGLED + REAL_END
    split_cr = [TEXT + b"\r", b".\r\n" + SMUGGLED + REAL_END]
    cases = [
        # bare LF in a middle chunk: accepted as a chunk, the message is refused at LAST
        (bdat(smuggle) + bdat(b"", last=True),
         [chunk_ok(len(smuggle)), R.BARE_LINE_END]),
        # the same in the one and only chunk
        (bdat(smuggle, last=True), [R.BARE_LINE_END]),
        # a CR ending one chunk and a "." starting the next is a bare CR
        (bdat(split_cr[0]) + bdat(split_cr[1], last=True),
         [chunk_ok(len(split_cr[0])), R.BARE_LINE_END]),
        # a CR ending the LAST chunk is bare
        (bdat(TEXT + b"\r\n") + bdat(b"more\r", last=True),
         [chunk_ok(len(TEXT) + 2), R.BARE_LINE_END]),
        # a CR ending a chunk followed by an empty LAST chunk is bare
        (bdat(TEXT + b"\r") + bdat(b"", last=True),
         [chunk_ok(len(TEXT) + 1), R.BARE_LINE_END]),
        # bare CR at "\r.\r" inside one chunk
        (bdat(TEXT + b"\r.\r" + SMUGGLED, last=True), [R.BARE_LINE_END]),
    ]
    for script, expected in cases:
        for byte_by_byte in (False, True):
            replies = dialogue(mta, BDAT_ENVELOPE + script + TRAILER, byte_by_byte)
            assert replies == [R.SENDER_OK, R.RCPT_OK, *expected, R.OK, R.BYE], \
                (script, byte_by_byte)
    assert mta.queue_list() == []


def test_bdat_crlf_split_across_chunks_is_one_message(mta):
    """Control: a CRLF split between two chunks is a line end; the message is kept exact."""
    first, second = TEXT + b"\r", b"\n.\r\n" + SMUGGLED
    script = BDAT_ENVELOPE + bdat(first) + bdat(second, last=True) + TRAILER
    for byte_by_byte in (False, True):
        replies = dialogue(mta, script, byte_by_byte)
        assert replies[:3] == [R.SENDER_OK, R.RCPT_OK, chunk_ok(len(first))]
        assert replies[4:] == [R.OK, R.BYE]
        raw = only_message(mta, queued_id(replies[3]), "sender@example.com", "rcpt@example.net")
        # BDAT content is not dot-unstuffed: stored exactly as sent.
        assert raw.endswith(b"\r\n" + first + second)


def test_session_usable_after_rejected_smuggling_attempt(mta):
    """After the 550 the session is in a clean state: a real transaction works."""
    body = TEXT + b"\n.\n" + SMUGGLED + REAL_END
    ok = b"Subject: t\r\n\r\nfine\r\n.\r\n"
    script = (ENVELOPE + body + b"RCPT TO:<x@example.net>\r\n"
              + b"MAIL FROM:<second@example.com>\r\nRCPT TO:<r2@example.net>\r\nDATA\r\n"
              + ok + b"QUIT\r\n")
    replies = dialogue(mta, script, byte_by_byte=False)
    assert replies[:6] == [R.SENDER_OK, R.RCPT_OK, R.START_DATA, R.BARE_LINE_END,
                           R.NEED_MAIL, R.SENDER_OK]
    assert replies[6:8] == [R.RCPT_OK, R.START_DATA]
    assert replies[9:] == [R.BYE]
    only_message(mta, queued_id(replies[8]), "second@example.com", "r2@example.net")
