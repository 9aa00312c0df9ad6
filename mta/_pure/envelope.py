"""SMTP client writer: the MAIL and RCPT lines of a plain transaction, and the
message's data (pure-Python twin).

This is the readable specification of ``mta._ext.envelope``; both modules
have the same public API and results, and the same tests run against both
(tests/test_envelope.py).

``plain(sender, recipients, params)`` is ``(mail, rcpts)``: the command line
``MAIL FROM:<sender>params`` CRLF and one ``RCPT TO:<recipient>`` CRLF per
recipient, as ASCII octets -- when the transaction is a plain one: *sender*
and *params* a ``str``, *recipients* a non-empty ``list`` of ``str``, every
one ASCII, and no address holding a character that must never reach the
wire (a control character, DEL, "<" or ">": command injection) nor a
recipient empty.  Anything else gives None, and the delivery client's
general path (``SmtpConnection.prepare``) decides: refusals, the SMTPUTF8
or all-ASCII forms, DSN parameters.

``data(message, after)`` is what follows DATA and its 354, then *after* (the
next transaction's envelope, or empty), as one ``bytes``: *message* with a
dot doubled at its start and after every LF (RFC 5321 4.5.2; after a bare LF
too, so a broken message cannot end the data early on a lenient server),
CRLF added when it does not end in one (nor is empty), and "." CRLF -- the
octets of ``mta.delivery.client.dot_stuff(message) + after``.  None when
*message* or *after* is not a ``bytes``.
"""
import re

_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")


def plain(sender, recipients, params):
    """(MAIL line, [RCPT lines]) of a plain transaction, else None."""
    if type(sender) is not str or type(params) is not str or type(recipients) is not list \
            or not recipients or not sender.isascii() or not params.isascii() \
            or _BAD_ADDRESS.search(sender):
        return None
    rcpts = []
    for r in recipients:
        if type(r) is not str or not r or not r.isascii() or _BAD_ADDRESS.search(r):
            return None
        rcpts.append(("RCPT TO:<%s>\r\n" % r).encode("ascii"))
    return ("MAIL FROM:<%s>%s\r\n" % (sender, params)).encode("ascii"), rcpts


def data(message, after):
    """dot_stuff(message) + after (see the module's docstring), or None."""
    if type(message) is not bytes or type(after) is not bytes:
        return None
    body = message.replace(b"\n.", b"\n..")
    if body[:1] == b".":
        body = b"." + body
    if not body or body[-2:] == b"\r\n":
        return body + b".\r\n" + after
    return body + b"\r\n.\r\n" + after
