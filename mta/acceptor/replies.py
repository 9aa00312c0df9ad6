"""Every SMTP reply the acceptor sends, named once (tests import these too).

Texts are bland on purpose: no internals, no exception text.  Most replies are
bytes, ready to write; the few with a variable part are str templates
(``{host}``, ``{qid}``, ``{n}``) that the sender formats and encodes.
"""

GREETING = "220 {host} {banner}\r\n"
HELO = "250 {host}\r\n"
BYE = b"221 2.0.0 Bye\r\n"
HELP = b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH\r\n"
TLS_GO = b"220 2.0.0 Ready to start TLS\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
OK = b"250 2.0.0 Ok\r\n"
SENDER_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
QUEUED = "250 2.0.0 Ok: queued as {qid}\r\n"
CHUNK_OK = "250 2.0.0 Ok: {n} octets received\r\n"
VRFY = b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
AUTH_CHALLENGE_EMPTY = b"334 \r\n"
AUTH_USERNAME = b"334 VXNlcm5hbWU6\r\n"   # "Username:"
AUTH_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"   # "Password:"
START_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"
# The node is drained (mta drain): no new mail here, sessions and queue finish.
NODE_DRAINING = b"421 4.3.2 Node draining, not accepting mail, try again later\r\n"
TOO_MANY_CONNECTIONS = b"421 4.7.0 Too many connections, try again later\r\n"
TOO_MANY_FROM_IP = b"421 4.7.0 Too many connections from your address, try again later\r\n"
TOO_MANY_ERRORS = b"421 4.7.0 Too many errors, closing connection\r\n"
TIMEOUT = b"421 4.4.2 Timeout, closing connection\r\n"
# A PROXY header from a client not in server.proxy_protocol_from (mta/acceptor/proxy.py).
PROXY_NOT_ACCEPTED = (b"421 4.7.0 A PROXY protocol header is not accepted from your address, "
                      b"closing connection\r\n")
STORAGE_TEMP = b"451 4.3.0 Temporary storage problem, try again later\r\n"
REPORTS_BUSY = b"451 4.3.2 Too many reports waiting to be read, try again later\r\n"
STORAGE_FULL = b"452 4.3.1 Insufficient system storage, try again later\r\n"
TOO_MANY_RCPTS = b"452 4.5.3 Too many recipients\r\n"
# A report recipient (feedback.bounce_domains) and a recipient to relay in one
# transaction: 452 makes the client send the rest in a transaction of its own.
REPORT_SEPARATELY = (b"452 4.5.3 Reports to a bounce domain and mail to relay go in separate "
                     b"transactions\r\n")
AUTH_TEMP = b"454 4.7.0 Temporary authentication failure\r\n"
# smtp.max_auth_failures from the client's address within smtp.auth_failure_window.
AUTH_LOCKED = (b"454 4.7.0 Too many failed authentication attempts from your address, "
               b"try again later\r\n")
LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
UNKNOWN = b"500 5.5.2 Command not recognized\r\n"
SYNTAX = b"501 5.5.4 Syntax error in parameters or arguments\r\n"
BAD_SENDER = b"501 5.1.7 Bad sender address syntax\r\n"
BAD_RCPT = b"501 5.1.3 Bad recipient address syntax\r\n"
AUTH_CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"
AUTH_BAD_BASE64 = b"501 5.5.2 Cannot decode response\r\n"
NOT_IMPLEMENTED = b"502 5.5.1 Command not implemented\r\n"
BAD_SEQUENCE = b"503 5.5.1 Bad sequence of commands\r\n"
NEED_HELO = b"503 5.5.1 Send EHLO or HELO first\r\n"
NEED_MAIL = b"503 5.5.1 Need MAIL command first\r\n"
NESTED_MAIL = b"503 5.5.1 Sender already specified\r\n"
ALREADY_TLS = b"503 5.5.1 TLS already active\r\n"
ALREADY_AUTH = b"503 5.5.1 Already authenticated\r\n"
AUTH_NOT_AVAILABLE = b"503 5.5.1 Authentication not enabled\r\n"
BAD_MECHANISM = b"504 5.5.4 Unrecognized authentication mechanism\r\n"
AUTH_FAILED = b"535 5.7.8 Authentication credentials invalid\r\n"
ENCRYPTION_REQUIRED = b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
BARE_LINE_END = b"550 5.6.0 Bare CR or LF in message text; lines must end with CRLF\r\n"
NUL_IN_TEXT = b"550 5.6.0 NUL character in message text\r\n"
LONG_TEXT_LINE = "550 5.6.0 Message text line longer than {n} octets\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed limit\r\n"
TOO_MANY_HOPS = b"554 5.4.6 Too many hops: the message has been here before (a mail loop)\r\n"
UNKNOWN_POOL = b"550 5.7.1 Unknown ip_pool in X-MSYS-API\r\n"
UNKNOWN_POOL_NAMED = "550 5.7.1 Unknown ip_pool \"{name}\" in X-MSYS-API\r\n"
NO_VALID_RCPTS = b"554 5.5.1 No valid recipients\r\n"
RELAY_DENIED = b"554 5.7.1 Relay access denied\r\n"
# suppression.smtp_action = "refuse": RCPT of a recipient on the suppression list
# (5.7.1: delivery not authorized, RFC 3463; SparkPost's reason text).
SUPPRESSED = b"550 5.7.1 Recipient address was suppressed due to customer policy\r\n"
# delivery.ipv6 = false (and no '*' route): an IPv6 address literal could never be delivered
NO_IPV6_ROUTE = b"550 5.4.4 Unable to route: no mail is sent over IPv6 from here\r\n"
NEED_SMTPUTF8 = b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n"
# A domain in U-labels or with an xn-- label that is no valid IDN (bad punycode, a code
# point IDNA 2008 does not allow, a label over 63 octets as A-labels): it would bounce.
BAD_SENDER_DOMAIN = b"553 5.1.7 Invalid internationalised domain name in sender address\r\n"
BAD_RCPT_DOMAIN = b"553 5.1.3 Invalid internationalised domain name in recipient address\r\n"
BAD_PARAM = b"555 5.5.4 Unsupported parameter\r\n"
BAD_NOTIFY = b"501 5.5.4 Invalid NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)\r\n"
BAD_ORCPT = b"501 5.5.4 Invalid ORCPT parameter (addr-type;xtext)\r\n"
BAD_ENVID = b"501 5.5.4 Invalid ENVID parameter (xtext, at most 100 characters)\r\n"
BAD_RET = b"501 5.5.4 Invalid RET parameter (FULL or HDRS)\r\n"


# EHLO: "250-{host}", then one line per keyword, the last one "250 " (RFC 5321
# 4.1.1.1).  The acceptor chooses the keywords (STARTTLS before TLS, AUTH over
# TLS before AUTH) and caches the reply.
EHLO_KEYWORDS = ("PIPELINING", "SIZE {size}", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8",
                 "CHUNKING", "DSN")
EHLO_STARTTLS = "STARTTLS"
EHLO_AUTH = "AUTH PLAIN LOGIN"
EHLO_HELP = "HELP"


def ehlo(host: str, keywords: list[str]) -> bytes:
    """The multi-line EHLO reply: *host* on the first line, then one keyword a line."""
    lines = [host, *keywords]
    return ("".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n").encode()


def unknown_pool(name: str) -> bytes:
    """550 for an X-MSYS-API ip_pool that names no pool; the name only when it is tame."""
    if 0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name):
        return UNKNOWN_POOL_NAMED.format(name=name).encode()
    return UNKNOWN_POOL


def parts(reply: bytes) -> tuple[int, str, str]:
    """(code, enhanced status, text) of a one-line reply, for the event that records it."""
    code, _, rest = reply.decode("utf-8", "replace").rstrip("\r\n").partition(" ")
    enhanced, _, text = rest.partition(" ")
    if enhanced.count(".") != 2 or not enhanced.replace(".", "").isdigit():
        enhanced, text = "", rest
    return int(code) if code.isdigit() else 0, enhanced, text
