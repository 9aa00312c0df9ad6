"""The protocol states of an SMTP session (mta/acceptor/smtp.py, tls_auth.py).

A session is in exactly one state; every verb handler checks it and moves it.
The order matters: the states from WAITING on hold the input (the session
reads nothing until what it waits for is done), except AUTH, which reads the
client's next line.  A session holds its state as the member's value, a plain int
(``State(session.state)`` names it): 3.11 compares plain ints in the interpreter's
loop, an IntEnum member through a call.
"""
import enum


class State(enum.IntEnum):
    CONNECTED = 0   # greeting sent, no EHLO/HELO yet (again after STARTTLS)
    READY = 1       # EHLO/HELO done, no transaction
    MAIL = 2        # MAIL accepted
    RCPT = 3        # at least one RCPT accepted
    BDAT = 4        # inside a BDAT sequence
    WAITING = 5     # waiting for the spool (or an AUTH check); input is held
    AUTH = 6        # reading an AUTH continuation line
    TLS = 7         # STARTTLS under way; input is discarded
    CLOSED = 8
