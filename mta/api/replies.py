"""Every response of the Transmissions API, declared once (tests import these too).

Bodies have SparkPost's shapes:

    200  {"results": {"total_rejected_recipients": R, "total_accepted_recipients": A,
                      "id": "..."}}
    200  {"errors": [{"message": "transmission created, but with validation errors",
                      "code": "2000"}],
          "results": {"rcpt_to_errors": [{"message", "description", "code"}, ...],
                      "total_rejected_recipients": R, "total_accepted_recipients": A,
                      "id": "..."}}
    4xx/5xx  {"errors": [{"message": "...", "description": "...", "code": "NNNN"}]}

Codes follow SparkPost's extended error codes where one fits (1300 invalid
data format/type, 1400 required field is missing, 1101 invalid URI, 1102
invalid HTTP method, 1603 resource not found, 2000 partial acceptance, 3000
template syntax error).  The
description always names the field or the limit concerned; it never carries
internals such as exception names.
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True)
class Error:
    """One kind of error response: HTTP status, SparkPost message and code."""

    status: int
    message: str
    code: str


# Protocol and access.
BAD_REQUEST = Error(400, "invalid params", "1200")                 # malformed HTTP
BAD_JSON = Error(400, "invalid data format/type", "1300")          # body is not JSON
UNAUTHORIZED = Error(401, "Unauthorized.", "1100")                 # missing or wrong key
FORBIDDEN = Error(403, "Forbidden.", "1100")                       # no keys: loopback only
NOT_FOUND = Error(404, "invalid URI", "1101")
BAD_METHOD = Error(405, "invalid HTTP method", "1102")
REQUEST_TIMEOUT = Error(408, "request timeout", "1200")
IN_PROGRESS = Error(409, "request in progress", "1301")            # same Idempotency-Key
TOO_LARGE = Error(413, "request entity too large", "1300")
URI_TOO_LONG = Error(414, "request URI too long", "1200")
UNSUPPORTED_TYPE = Error(415, "unsupported media type", "1200")
HEADERS_TOO_LARGE = Error(431, "request header fields too large", "1200")
NOT_IMPLEMENTED = Error(501, "not implemented", "1200")            # a transfer coding

# The transmission.
INVALID = Error(422, "invalid data format/type", "1300")
REQUIRED = Error(422, "required field is missing", "1400")
NOT_SUPPORTED = Error(422, "resource not found", "1603")           # stored templates/lists
KEY_REUSED = Error(422, "invalid data format/type", "1301")        # Idempotency-Key, new body
SYNTAX = Error(422, "substitution language syntax error in template content", "3000")

# Pressure.
TOO_MANY_REQUESTS = Error(429, "too many requests", "1900")
UNAVAILABLE = Error(503, "service unavailable", "1901")

# Per recipient (partial acceptance, inside results.rcpt_to_errors).
PARTIAL_MESSAGE = "transmission created, but with validation errors"
PARTIAL_CODE = "2000"
RCPT_REQUIRED = Error(422, "required field is missing", "1400")
RCPT_INVALID = Error(422, "invalid data format/type", "1300")
RCPT_TEMPFAIL = Error(503, "temporary failure", "1901")           # the spool said no

RETRY_AFTER_BUSY = 1         # seconds, Retry-After of 429
RETRY_AFTER_UNAVAILABLE = 5  # seconds, Retry-After of 503


class ApiError(Exception):
    """A request that is answered with an error response.

    *allow*: the methods the resource takes, for the Allow header of a 405
    (RFC 9110 15.5.6: a 405 must name them), e.g. ``"GET, PUT"``;
    *accept_encoding*: the content codings a request body may have, for the
    Accept-Encoding header of a 415 about one (RFC 9110 15.5.16).
    """

    def __init__(self, error: Error, description: str, retry_after: int | None = None,
                 allow: str = "", accept_encoding: str = ""):
        super().__init__(description)
        self.error = error
        self.description = description
        self.retry_after = retry_after
        self.allow = allow
        self.accept_encoding = accept_encoding

    def header_lines(self) -> bytes:
        """The header field lines this answer adds (Allow, Accept-Encoding), each
        CRLF-terminated; b"" if none."""
        lines = f"Allow: {self.allow}\r\n" if self.allow else ""
        if self.accept_encoding:
            lines += f"Accept-Encoding: {self.accept_encoding}\r\n"
        return lines.encode()

    @property
    def status(self) -> int:
        return self.error.status

    def body(self) -> bytes:
        return error_body(self.error, self.description)


def error_entry(error: Error, description: str) -> dict:
    return {"message": error.message, "description": description, "code": error.code}


def error_body(error: Error, description: str) -> bytes:
    """``{"errors": [{"message", "description", "code"}]}``."""
    return orjson.dumps({"errors": [error_entry(error, description)]})


def success_body(accepted: int, rejected: int, tid: str,
                 rcpt_errors: list[dict] | None = None) -> bytes:
    """The 200 body; with *rejected* recipients it is SparkPost's partial-acceptance
    shape, listing *rcpt_errors* (as many as num_rcpt_errors asks: none for 0)."""
    results = {"total_rejected_recipients": rejected, "total_accepted_recipients": accepted,
               "id": tid}
    if not rejected:
        return orjson.dumps({"results": results})
    return orjson.dumps({
        "errors": [{"message": PARTIAL_MESSAGE, "code": PARTIAL_CODE}],
        "results": {"rcpt_to_errors": rcpt_errors or [], **results},
    })
