"""Closing a client's connection from the server's side, for the SMTP and HTTP sessions.

Closing a socket with unread input makes the kernel answer with a reset, and a client
whose next request crossed our last answer (a 421, a 413 while the body still comes)
then reads ECONNRESET instead of it.  So the write side is shut down after the answer
(the client reads it, then end of file) and whatever the client still sends is read and
dropped (the session's data_received ignores input once it is closing) until the client
closes too.  Over TLS, or when the client has shut its side already, the transport's own
close is used.  Either way the connection is aborted after *linger* seconds unless it is
gone by then: a client that never reads its answers cannot keep it open (a plain close
waits for the unsent answers for ever).
"""
from __future__ import annotations

FLUSH_BOUND = 5.0   # seconds a close without lingering (linger 0) may take to flush


def close_lingering(session, loop, linger: float, peer_eof: bool = False) -> None:
    """Close *session*'s transport as the module docstring says.

    *session* has ``transport``, ``reading_paused`` and ``lost`` (set by its
    connection_lost); *peer_eof*: the client has shut its side.
    """
    t = session.transport
    if linger > 0 and not peer_eof and t.can_write_eof():
        t.write_eof()       # FIN once the answer is written; eof_received() then closes
        if session.reading_paused:
            session.reading_paused = False
            t.resume_reading()
    else:
        t.close()
    loop.call_later(linger if linger > 0 else FLUSH_BOUND, _abort_unless_lost, session, t)


def _abort_unless_lost(session, transport) -> None:
    if not session.lost:
        transport.abort()
