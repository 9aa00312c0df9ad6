"""The SparkPost-compatible Transmissions API (leaf library; no I/O of its own but SQLite).

- :mod:`mta.api.replies` — every status, error code and response body, declared once;
- :mod:`mta.api.transmissions` — decode and validate a ``POST /api/v1/transmissions``
  body (msgspec Structs; unknown fields ignored, as SparkPost does), and the
  ``X-MSYS-API`` header of SMTP injection;
- :mod:`mta.api.build` — one RFC 5322 message per recipient, with substitutions;
- :mod:`mta.api.idempotency` — the ``Idempotency-Key`` store shared by every acceptor.

The HTTP server that uses them is :mod:`mta.acceptor.http`; this package knows
nothing about sockets, the bus or the spool.
"""
