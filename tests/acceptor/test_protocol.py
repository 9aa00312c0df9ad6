"""What the session declares once: its verbs, its states, its replies, and what it hands over."""
from __future__ import annotations

import re
from pathlib import Path

from acceptor import fake
from mta.acceptor import replies as R
from mta.acceptor import smtp
from mta.acceptor.state import State

HERE = Path(__file__).parent


def test_help_names_the_listed_verbs_in_table_order():
    listed = [v.decode() for v, (_, flags) in smtp.VERBS.items() if flags & smtp.LISTED]
    assert R.HELP == f"214 2.0.0 Commands: {' '.join(listed)}\r\n".encode()


def test_dispatch_tables_come_from_the_verb_table():
    assert smtp.COMMANDS == {v: h for v, (h, _) in smtp.VERBS.items()}
    assert smtp.BDAT_ALLOWED == {b"BDAT", b"RSET", b"NOOP", b"QUIT"}
    assert all(v == v.upper() and callable(h) for v, (h, _) in smtp.VERBS.items())


def test_states_hold_input_from_waiting_on():
    # Session.process() reads input in the states below WAITING, and in AUTH.
    assert [s.name for s in State] == ["CONNECTED", "READY", "MAIL", "RCPT", "BDAT", "WAITING",
                                       "AUTH", "TLS", "CLOSED"]
    assert State.WAITING < State.AUTH < State.TLS < State.CLOSED


def reply_constants():
    return {n: getattr(R, n) for n in dir(R)
            if n.isupper() and isinstance(getattr(R, n), (bytes, str)) and not n.startswith("EHLO")}


def test_replies_are_one_line_with_a_code_and_no_internals():
    for name, reply in reply_constants().items():
        text = reply if isinstance(reply, str) else reply.decode("ascii")
        assert re.fullmatch(r"[2-5][0-9][0-9] [^\r\n]*\r\n", text), name
        assert not re.search(r"Error|Exception|Traceback|errno", text), name


def test_every_reply_is_exercised_by_the_session_tests():
    used = set()
    for path in (HERE / "dialogues").glob("*.txt"):
        used |= set(re.findall(r"@([A-Z0-9_]+)", path.read_text(encoding="utf-8")))
    for path in HERE.glob("test_*.py"):
        used |= set(re.findall(r"\bR\.([A-Z0-9_]+)", path.read_text(encoding="utf-8")))
    # GREETING and HELO are spelled out in ehlo_helo.txt, like the EHLO reply.
    assert set(reply_constants()) - used == {"GREETING", "HELO"}


def test_commit_takes_one_submission():
    """Acceptor.commit needs nothing from the session but the Submission."""
    loop = fake.Loop()
    acc = fake.Acceptor(fake.settings(), loop)
    answers = []
    msg = smtp.Submission(
        "s@example.com", ["r@example.net"], {"SIZE": "9", "BODY": "8BITMIME"},
        "helo.example [192.0.2.1] user=alice", "192.0.2.1",
        b"X-MSYS-API: {\"campaign_id\": \"c\"}\r\nSubject: x\r\n\r\nbody\r\n",
        lambda qid: b"Received: by test; " + qid.encode() + b"\r\n",
        lambda qid, ok: answers.append((qid, ok)), lambda reply: answers.append(reply))
    acc.commit(msg)
    loop.run_ready()
    [m] = acc.submitted
    assert (m.sender, m.rcpts, m.client, m.peer) == (
        "s@example.com", ["r@example.net"], "helo.example [192.0.2.1] user=alice", "192.0.2.1")
    assert m.params == {"BODY": "8BITMIME", "campaign_id": "c"}
    assert m.message == b"Subject: x\r\n\r\nbody\r\n"
    assert m.received == b"Received: by test; " + m.qid.encode() + b"\r\n"
    assert answers == [(m.qid, True)]


def test_a_report_beyond_the_waiting_bound_gets_451_at_once():
    """feedback.report_readers are parsing and feedback.max_waiting_reports wait: one more
    report is refused with REPORTS_BUSY (451 4.3.2) at once, not parsed, not held; mail
    that is not a report is not concerned."""
    import dataclasses

    import msgspec

    base = fake.settings()
    cfg = msgspec.structs.replace(base.config, feedback=msgspec.structs.replace(
        base.config.feedback, bounce_domains=["bounces.example"], report_readers=1,
        max_waiting_reports=2))
    loop = fake.Loop()
    acc = fake.Acceptor(dataclasses.replace(base, config=cfg), loop)
    answers = []

    def submission(rcpt):
        return smtp.Submission("", [rcpt], {}, "mx.isp.example [192.0.2.9]", "192.0.2.9",
                               b"Subject: report\r\n\r\nbody\r\n",
                               lambda qid: b"Received: x\r\n",
                               lambda qid, ok: answers.append((qid, ok)), answers.append)
    acc.reports_unread = 3                 # one being read, two waiting: the bound
    assert acc.commit(submission("b@bounces.example")) == R.REPORTS_BUSY
    assert R.REPORTS_BUSY.startswith(b"451 4.3.2 ")
    assert acc.report_stats["deferred"] == 1 and acc.reports_unread == 3
    assert acc.report_tasks == set() and answers == []
    assert acc.commit(submission("r@example.net")) is None     # a message: spooled
    loop.run_ready()
    assert [m.rcpts for m in acc.submitted] == [["r@example.net"]]
