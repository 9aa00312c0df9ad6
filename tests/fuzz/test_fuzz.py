"""The fuzz targets (fuzz/): a short campaign of each, the saved inputs, and that they can fail.

The long campaigns (10 million inputs per differential target) are run by hand
(fuzz/README.md) and recorded in bench/RESULTS.md; here each target runs a
bounded number of inputs with a fixed seed, coverage-guided by atheris
(installed with the test extras; the runner's own mutation engine otherwise).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from fuzz import TARGETS  # noqa: E402
from fuzz.common import Divergence  # noqa: E402

REGRESSIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regressions")
# Inputs per target in CI: about 25 s in all on this machine.
RUNS = {"scanner": 20_000, "record": 20_000, "mime_headers": 20_000, "mime_canon": 20_000,
        "smtp_session": 10_000, "http_api": 10_000, "bus_stream": 20_000}


def _target(name):
    import importlib
    return importlib.import_module(TARGETS[name])


def test_every_target_has_a_short_campaign():
    assert set(RUNS) == set(TARGETS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_short_campaign(name, tmp_path):
    corpus = tmp_path / "corpus"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    runs = RUNS[name]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # (libFuzzer ends the process from C, so no finalizer removes what a target made in
    # the temporary directory -- the http_api target's state directory: it is made here)
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz", name, f"-runs={runs}", "-seed=1",
         f"-artifact_prefix={artifacts}/", str(corpus)],
        cwd=REPO, capture_output=True, text=True, timeout=280,
        env={**os.environ, "TMPDIR": str(scratch)})
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, f"{name}: the campaign found a failure:\n{tail}"
    assert f"Done {runs} runs" in proc.stderr, tail
    assert not os.listdir(artifacts), tail
    assert os.listdir(corpus), "the corpus was not seeded"


def _saved_inputs():
    out = []
    if os.path.isdir(REGRESSIONS):
        for name in sorted(os.listdir(REGRESSIONS)):
            for f in sorted(os.listdir(os.path.join(REGRESSIONS, name))):
                out.append(pytest.param(name, os.path.join(REGRESSIONS, name, f),
                                        id=f"{name}/{f}"))
    return out


@pytest.mark.parametrize("name, path", _saved_inputs())
def test_saved_input_passes(name, path):
    """Every input a campaign found failing (each one fixed) passes now."""
    with open(path, "rb") as f:
        _target(name).one_input(f.read())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_pass(name):
    mod = _target(name)
    assert mod.SEEDS
    for seed in mod.SEEDS:
        mod.one_input(seed)


# -- the targets can fail ------------------------------------------------------


def test_a_twin_that_disagrees_is_found(monkeypatch):
    """The differential targets compare what the twins return (a broken twin fails)."""
    mh = _target("mime_headers")
    seed = next(s for s in mh.SEEDS if s[0] % len(mh.FUNCTIONS) == mh.FUNCTIONS.index("scan_body"))
    mh.one_input(seed)
    monkeypatch.setattr(mh.PURE, "scan_body", lambda buf, start=0, max_line=998: 0)
    with pytest.raises(Divergence, match="scan_body"):
        mh.one_input(seed)


def test_a_scanner_that_depends_on_the_split_is_found(monkeypatch):
    sc = _target("scanner")
    real = sc.PURE.Scanner

    class Lossy(real):
        def feed(self, data):    # drops the last byte of every piece but the first
            super().feed(data if not getattr(self, "_fed", False) else data[:-1])
            self._fed = True

    data = bytes([5, 4, 5, 2, 0, 3, 0, 7, 0]) + b"EHLO x\r\nNOOP\r\nQUIT\r\n"
    sc.one_input(data)
    monkeypatch.setattr(sc.PURE, "Scanner", Lossy)
    with pytest.raises(Divergence):
        sc.one_input(data)


def test_bus_stream_finds_framing_that_depends_on_the_cuts_or_a_raising_decode(monkeypatch):
    bs = _target("bus_stream")
    from mta.bus import messages, sockets
    real = sockets._Stream.feed

    def lossy(self, data, out):     # loses the last octet of a piece that ends a frame
        real(self, data[:-1] if self.pieces and len(data) > 1 else data, out)

    # mode 0: two frames, cut at 5, 9 and 12 (the second frame in three)
    data = b"\x00" + bs._CUT3 + sockets.frame_head(3) + b"\x93\x01\x02" + \
        sockets.frame_head(4) + b"\x92\x0b\x01\x02"
    bs.one_input(data)
    monkeypatch.setattr(sockets._Stream, "feed", lossy)
    with pytest.raises(Divergence, match="framing depends on the cuts"):
        bs.one_input(data)
    monkeypatch.undo()

    def broken(frame):
        raise RuntimeError("a decoder bug")

    monkeypatch.setattr(messages, "_decode", broken)
    with pytest.raises(Divergence, match="receive raised"):
        bs.one_input(data)


def test_a_traceback_in_the_smtp_session_is_found(monkeypatch):
    ss = _target("smtp_session")
    from mta.acceptor import smtp

    def broken(session, arg):
        raise RuntimeError("a bug in NOOP")

    monkeypatch.setitem(smtp.COMMANDS, b"NOOP", broken)
    with pytest.raises(RuntimeError, match="a bug in NOOP"):
        ss.one_input(b"\0" * 6 + b"EHLO x\r\nNOOP\r\n")


def test_a_malformed_smtp_reply_is_found():
    ss = _target("smtp_session")
    ss.check_replies(b"220 ok\r\n250-a\r\n250 b\r\n")
    for bad in (b"220 ok", b"220 ok\r\n250-a\r\n", b"2200 x\r\n", b"250-a\r\n354 b\r\n",
                b"451 4.3.0 Internal error\r\n", b"600 x\r\n", b"250 caf\xc3\xa9\r\n"):
        with pytest.raises(Divergence):
            ss.check_replies(bad)


def test_a_5xx_or_a_logged_traceback_in_the_http_path_is_found(monkeypatch):
    ha = _target("http_api")
    from mta.api import transmissions
    seed = ha.SEEDS[1]
    ha.one_input(seed)

    def broken(body):
        raise RuntimeError("a bug in the decoder")

    monkeypatch.setattr(transmissions, "decode", broken)
    with pytest.raises(Divergence, match="logged at ERROR"):
        ha.one_input(seed)
    # The answer to a HEAD has its Content-Length and no body; to anything else, its body.
    bodiless = (b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 14\r\nAllow: GET\r\n"
                b"\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 14\r\n\r\n")
    ha.check_responses(bodiless, heads=2)
    with pytest.raises(Divergence, match="not JSON"):
        ha.check_responses(bodiless)
    assert ha.head_requests(b"HEAD / HTTP/1.1\r\n\r\nGET /HEAD HTTP/1.1\r\n\r\n"
                            b"HEAD /x HTTP/1.1\r\n\r\n") == 2
    with pytest.raises(Divergence, match="a 503 for bad input"):
        ha.check_responses(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 26\r\n\r\n"
                           b'{"errors":[{"message":1}]}')
