"""Fuzz targets for the MTA: differential (compiled vs pure twin) and whole-protocol.

Run one with ``python -m fuzz TARGET [libFuzzer options] [CORPUS_DIR]``; see
fuzz/README.md.  Importing this package imports nothing of the MTA, so the
runner can instrument the modules under test as they are imported.
"""

TARGETS = {
    "scanner": "fuzz.scanner",              # SMTP command/DATA/BDAT scanner, compiled vs pure
    "record": "fuzz.record",                # spool record codec, compiled vs pure
    "mime_headers": "fuzz.mime_headers",    # header parsing (find_header, ...), compiled vs pure
    "mime_canon": "fuzz.mime_canon",        # DKIM canonicalisation, compiled vs pure
    "smtp_session": "fuzz.smtp_session",    # the SMTP session on a fake transport
    "http_api": "fuzz.http_api",            # HTTP framing and the JSON APIs on a fake transport
    "bus_stream": "fuzz.bus_stream",        # the acceptors' stream to a shard, as it reads it
}
DIFFERENTIAL = ("scanner", "record", "mime_headers", "mime_canon")
