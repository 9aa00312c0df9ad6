"""SMTP AUTH credentials: a file of hashed passwords, and checking a password.

Leaf library: the configuration parses ``smtp.auth_file`` with it when it is
loaded, the acceptor checks AUTH PLAIN/LOGIN passwords with it, and
``mta passwd`` makes the lines.  It imports nothing from the rest of mta.

File format, one user per line (blank lines and '#' comments allowed)::

    user:pbkdf2_sha256$<iterations>$<salt, base64>$<hash, base64>

``mta passwd USER`` prints such a line.  PBKDF2-HMAC-SHA256 is in the
standard library (hashlib) and is the scheme Django and many tools use, so
operators can produce the hashes elsewhere too.  Checking costs tens of
milliseconds by design, so the acceptor runs it in a worker thread.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os

SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 200_000
MIN_ITERATIONS = 10_000


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Return the stored form of *password*."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return "%s$%d$%s$%s" % (SCHEME, iterations, base64.b64encode(salt).decode(),
                            base64.b64encode(digest).decode())


def parse_password_file(text: str) -> dict[str, tuple[int, bytes, bytes]]:
    """Parse the file into {user: (iterations, salt, digest)}; ValueError names the line."""
    users = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        parts = stored.split("$")
        if not sep or not user or len(parts) != 4 or parts[0] != SCHEME:
            raise ValueError(f"line {n}: expected user:{SCHEME}$iterations$salt$hash")
        try:
            iterations = int(parts[1])
            salt = base64.b64decode(parts[2], validate=True)
            digest = base64.b64decode(parts[3], validate=True)
        except ValueError:
            raise ValueError(f"line {n}: bad iterations, salt or hash") from None
        if iterations < MIN_ITERATIONS or not salt or len(digest) != 32:
            raise ValueError(f"line {n}: iterations below {MIN_ITERATIONS} or bad hash length")
        users[user] = (iterations, salt, digest)
    return users


def check_password(users: dict, user: str, password: bytes) -> bool:
    """True when *password* is right for *user*; the same work is done for unknown users."""
    entry = users.get(user)
    if entry is None:
        # As much work as the costliest real user, so timing does not say who exists.
        iterations = max((e[0] for e in users.values()), default=DEFAULT_ITERATIONS)
        salt, digest = b"\0" * 16, b"\0" * 32
    else:
        iterations, salt, digest = entry
    got = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    return hmac.compare_digest(got, digest) and entry is not None
