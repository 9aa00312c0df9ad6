"""The fields every event of a message repeats, read once at injection (Acceptor.submit)."""
from mta.acceptor.main import _event_fields
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
