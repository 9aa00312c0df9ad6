"""mta drain, as one acceptor sees it: while <run>/drain exists it takes no new mail.

The acceptor looks for the file at each sweep; a new connection gets
``421 4.3.2`` and is closed, and so does a session already open that starts a
new transaction.  A transaction under way when the drain began is finished.
"""
from __future__ import annotations

import os

from acceptor import fake
from mta.acceptor import replies as R
from mta.acceptor import smtp
from test_session import Client


def test_drain_refuses_new_connections_and_transactions_then_cancel_resumes(tmp_path):
    loop = fake.Loop()
    acc = fake.Acceptor(fake.settings(), loop)
    acc.drain_flag = str(tmp_path / "drain")
    open_before = Client(acc)
    assert open_before.output().startswith(b"220 ")
    open_before.send(b"EHLO client.example\r\n")
    mid = Client(acc)
    mid.output()
    mid.send(b"EHLO client.example\r\n")
    assert mid.send(b"MAIL FROM:<s@example.com>\r\n") == R.SENDER_OK

    with open(acc.drain_flag, "w") as fh:
        fh.write("{}")
    acc._check_node_drain()
    assert acc.node_draining
    # A new connection: 421 4.3.2 at once.
    late = Client(acc)
    assert late.output() == R.NODE_DRAINING
    assert late.transport.eof_written or late.transport.closed
    # The transaction under way is finished and queued.
    out = mid.send(b"RCPT TO:<r@example.net>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert out.startswith(R.RCPT_OK) and b"250 2.0.0 Ok: queued as " in out
    # A new transaction on an open session: 421 4.3.2 and the session ends.
    assert open_before.send(b"MAIL FROM:<s@example.com>\r\n") == R.NODE_DRAINING
    assert open_before.transport.eof_written or open_before.transport.closed
    assert len(acc.submitted) == 1

    os.unlink(acc.drain_flag)
    acc._check_node_drain()
    assert not acc.node_draining
    again = Client(acc)
    assert again.output().startswith(b"220 ")
    again.send(b"EHLO client.example\r\n")
    assert again.send(b"MAIL FROM:<s@example.com>\r\n") == R.SENDER_OK
    assert isinstance(again.session, smtp.Session)
