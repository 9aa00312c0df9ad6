"""The fields every event of a message repeats, read once at injection (Acceptor.submit),
and the Message-ID and Date smtp.add_missing_headers puts in front in the same pass."""
import email.utils

import pytest

from acceptor import fake
from mta.acceptor import main, smtp
from mta.acceptor.main import _event_fields, add_missing_headers
from mta.obs import events as ev


def test_message_id_from_and_subject_in_one_pass():
    msg = (b"DKIM-Signature: v=1; d=x\r\nMessage-ID:  <m1@x.test> \r\n"
           b"From: \"Desk, News\" <News@Example.ORG>\r\n"
           b"Subject: =?utf-8?q?Caf=C3=A9?=\r\n deals\r\nSubject: second\r\n\r\n"
           b"Subject: in the body\r\n")
    params: dict = {}
    assert _event_fields(msg, params) == "<m1@x.test>"
    assert params == {"friendly_from": "News@Example.ORG", "subject": "Caf\u00e9 deals"}


def test_bounded_and_absent_fields():
    huge = b"Subject: " + b"x" * 100_000 + b"\r\nFrom: " + b"a" * 400 + b"@x.test\r\n\r\n"
    params: dict = {}
    assert _event_fields(huge, params) == ""
    assert params == {"subject": "x" * ev.MAX_SUBJECT}     # cut; a From that long: left out
    params = {}
    assert _event_fields(b"X-Other: 1\r\n\r\nbody\r\n", params) == "" and params == {}


def test_values_the_http_builder_gave_are_kept():
    params = {"friendly_from": "rendered@example.org", "subject": "rendered"}
    _event_fields(b"From: =?utf-8?b?w6k=?= <x@example.org>\r\nSubject: =?utf-8?b?w6k=?=\r\n\r\n",
                  params)
    assert params == {"friendly_from": "rendered@example.org", "subject": "rendered"}


# -- smtp.add_missing_headers ------------------------------------------------------

def test_missing_message_id_and_date_are_put_in_front():
    msg = b"From: a@x.test\r\nSubject: s\r\n\r\nMessage-ID: <body@x>\r\nDate: body\r\n"
    params: dict = {}
    out, mid = add_missing_headers(msg, params, "0123456789ABCDEF0123", "mta.test")
    assert mid == "<0123456789ABCDEF0123@mta.test>"
    head = b"Message-ID: <0123456789ABCDEF0123@mta.test>\r\nDate: "
    assert out.startswith(head) and out.endswith(b" +0000\r\n" + msg)
    date = out[len(head):len(out) - len(msg) - 2].decode()
    assert email.utils.format_datetime(email.utils.parsedate_to_datetime(date)) == date
    assert params == {"friendly_from": "a@x.test", "subject": "s"}     # as _event_fields


def test_present_fields_are_kept_and_the_message_is_the_same_object():
    msg = b"date: d\r\nMessage-Id:\r\n <m@x.test> \r\n\r\n"
    params: dict = {}
    out, mid = add_missing_headers(msg, params, "Q", "h")
    assert out is msg and mid == "<m@x.test>" == _event_fields(msg, {})
    only_date, mid = add_missing_headers(b"Message-ID: <m@x>\r\n\r\nb\r\n", {}, "Q", "h")
    assert mid == "<m@x>" and only_date.startswith(b"Date: ")
    assert only_date.endswith(b" +0000\r\nMessage-ID: <m@x>\r\n\r\nb\r\n")
    only_id, mid = add_missing_headers(b"Date: d\r\n\r\nb\r\n", {}, "Q", "h")
    assert (only_id, mid) == (b"Message-ID: <Q@h>\r\nDate: d\r\n\r\nb\r\n", "<Q@h>")
    # fields named like them, or Date only in the body, do not count
    near, _ = add_missing_headers(b"Resent-Date: d\r\nX-Message-ID: <m>\r\n\r\nDate: d\r\n",
                                  {}, "Q", "h")
    assert near.startswith(b"Message-ID: <Q@h>\r\nDate: ")


@pytest.mark.parametrize("mode, peers", [
    ("off", {"127.0.0.1": False, "192.0.2.1": False}),
    ("local", {"127.0.0.1": True, "127.3.4.5": True, "::1": True, "::ffff:127.0.0.1": True,
               "192.0.2.1": False, "2001:db8::1": False, "unknown": False}),
    ("all", {"127.0.0.1": True, "192.0.2.1": True, "unknown": True}),
])
def test_which_clients_get_them(mode, peers):
    loop = fake.Loop()
    acc = fake.Acceptor(fake.settings(smtp={"add_missing_headers": mode}), loop)
    for peer in peers:
        acc.commit(smtp.Submission("s@x.test", ["r@y.test"], {}, f"h [{peer}]", peer,
                                   b"Subject: x\r\n\r\nbody\r\n", lambda qid: b"",
                                   lambda qid, ok: None, lambda reply: None))
    assert {m.peer: m.add_missing for m in acc.submitted} == peers


def test_submit_adds_them_before_signing_and_reports_the_message_id(monkeypatch):
    """Acceptor.submit (the real one, spool replaced): the signer sees the added fields,
    the envelope carries the Message-ID made."""
    loop = fake.Loop()
    acc = main.Acceptor(fake.settings(smtp={"add_missing_headers": "all"}), 0, loop)
    signed = []

    class Signer:
        def sign_message(self, message, now, scheduled):
            signed.append(message)
            return b"DKIM-Signature: x\r\n" + message
    acc.signer = Signer()
    acc.outbox.append([])
    qid = acc.submit("s@x.test", ["r@y.test"], {}, "h", b"Subject: x\r\n\r\nb\r\n",
                     lambda q: b"Received: r\r\n", lambda q, ok: None, add_missing=True)
    [(_, env, body, _)] = acc.outbox[0]
    assert signed[0].startswith(f"Message-ID: <{qid}@{fake.HOSTNAME}>\r\nDate: ".encode())
    assert body == b"Received: r\r\nDKIM-Signature: x\r\n" + signed[0]
    assert env.message_id == f"<{qid}@{fake.HOSTNAME}>"
    assert env.params == {"subject": "x"}
    acc.submit("s@x.test", ["r@y.test"], {}, "h", b"Subject: y\r\n\r\nb\r\n",
               lambda q: b"Received: r\r\n", lambda q, ok: None)
    assert signed[1] == b"Subject: y\r\n\r\nb\r\n" and acc.outbox[0][1][1].message_id == ""
