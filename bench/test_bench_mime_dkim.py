"""Microbenchmarks: MIME header parsing, DKIM body canonicalisation and DKIM signing.

Run: python -m pytest bench/test_bench_mime_dkim.py --benchmark-only --benchmark-group-by=group

Each group puts our compiled module and its pure twin next to the peer the
issue names, measured in the same run:

* header-parse: the header block of a realistic 2 KB message (14 fields, two
  folded) parsed by ``mta.mime.parse_headers`` against the standard library's
  ``email.parser.BytesHeaderParser`` (compat32, its fastest policy);
  header-lookup: the value of Message-ID, ours against parse-then-get;
* body-hash-*: DKIM body canonicalisation plus SHA-256 of a 2 KB and a 100 KB
  body, ours (streaming into hashlib) against dkimpy's canonicalisation
  (regular expressions over the whole body) plus hashlib;
* sign-rsa2048 / sign-ed25519: one complete DKIM signature of the 2 KB
  message (relaxed/relaxed, default header list) by ``mta.dkim.Signer``
  against a bare loop of ``cryptography`` signatures over the same bytes, the
  ceiling for a signer; dkimpy's own signing is there for scale;
  sign-*-paired: the same two, alternated call by call in one loop, so that
  load from other processes hits both alike; the per-pair ratio (bare time /
  signer time, i.e. the signer's rate as a fraction of the bare rate) is in
  the JSON's extra_info and printed at the end.
"""
import email.parser
import email.policy
import hashlib
import statistics
import time

import dkim
import dkim.canonicalization as dkim_canon
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mta import dkim as mdkim
from mta import native

EXT = native.load("mime", pure=False)
PURE = native.load("mime", pure=True)
IMPLS = {"compiled": EXT, "pure": PURE}
DOMAIN = "example.com"
BIG_BODY_BYTES = 100 * 1024
PAIRS = 600  # alternated bare/signer calls in the paired benchmarks


def _message():
    head = (b"Return-Path: <bounce-123@bounces.example.com>\r\n"
            b"Received: from injector.example.com (injector [192.0.2.10])\r\n"
            b"\tby mta.example.com with ESMTPS id 4Xyz; Tue, 24 Nov 2026 09:30:00 +0000\r\n"
            b"From: \"Example News\" <news@example.com>\r\n"
            b"To: subscriber.12345@example.org\r\n"
            b"Subject: Breaking: something important happened in the world today\r\n"
            b"Date: Tue, 24 Nov 2026 09:30:00 +0000\r\n"
            b"Message-ID: <20261124093000.12345.abcdef@example.com>\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n"
            b"List-Unsubscribe: <https://example.com/u/12345>,\r\n"
            b" <mailto:unsubscribe-12345@example.com>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            b"Feedback-ID: 123:news:example\r\n"
            b"X-Campaign: breaking-2026-11-24\r\n"
            b"\r\n")
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    return head + line * ((2048 - len(head)) // len(line))


MESSAGE = _message()
HEADER_END, BODY_START = EXT.split_message(MESSAGE)
BODY = MESSAGE[BODY_START:]
BIG_BODY = (BODY * (BIG_BODY_BYTES // len(BODY) + 1))[:BIG_BODY_BYTES].rsplit(b"\r\n", 1)[0] + b"\r\n"


# -- header parsing --------------------------------------------------------------

@pytest.mark.benchmark(group="header-parse")
def test_header_parse_stdlib_email(benchmark):
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    msg = benchmark(parser.parsebytes, MESSAGE)
    assert len(msg.items()) == 14


@pytest.mark.benchmark(group="header-parse")
@pytest.mark.parametrize("impl", IMPLS)
def test_header_parse_mime(benchmark, impl):
    fields = benchmark(IMPLS[impl].parse_headers, MESSAGE)
    assert len(fields) == 14


@pytest.mark.benchmark(group="header-lookup")
def test_header_lookup_stdlib_email(benchmark):
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    value = benchmark(lambda: parser.parsebytes(MESSAGE)["Message-ID"])
    assert value.startswith("<2026")


@pytest.mark.benchmark(group="header-lookup")
@pytest.mark.parametrize("impl", IMPLS)
def test_header_lookup_mime(benchmark, impl):
    value = benchmark(IMPLS[impl].find_header, MESSAGE, b"message-id")
    assert value.startswith(b"<2026")


# -- body canonicalisation + hash ------------------------------------------------

def _dkimpy_body_hash(body):
    return hashlib.sha256(dkim_canon.Relaxed.canonicalize_body(body)).digest()


def _our_body_hash(mod, body):
    h = hashlib.sha256()
    c = mod.BodyCanonicalizer(True, h.update)
    c.update(body)
    c.finish()
    return h.digest()


@pytest.mark.parametrize("size, body", [("2k", BODY), ("100k", BIG_BODY)], ids=["2k", "100k"])
def test_body_hash_dkimpy(benchmark, size, body):
    benchmark.group = f"body-hash-{size}"
    assert benchmark(_dkimpy_body_hash, body) == _our_body_hash(EXT, body)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size, body", [("2k", BODY), ("100k", BIG_BODY)], ids=["2k", "100k"])
def test_body_hash_mime(benchmark, size, body, impl):
    benchmark.group = f"body-hash-{size}"
    assert benchmark(_our_body_hash, IMPLS[impl], body) == _dkimpy_body_hash(body)


# -- signing -----------------------------------------------------------------------

def _pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("benchkeys")
    out = {}
    for name, key in (("rsa", rsa.generate_private_key(65537, 2048)),
                      ("ed", ed25519.Ed25519PrivateKey.generate())):
        path = d / f"{name}.pem"
        path.write_bytes(_pem(key))
        out[name] = (str(path), key)
    return out


def _signer(keys, name, algorithm):
    return mdkim.Signer.from_config(mdkim.DkimConfig(keys=[mdkim.DkimKey(
        domain=DOMAIN, selector="bench", key_file=keys[name][0], algorithm=algorithm)]))


@pytest.mark.benchmark(group="sign-rsa2048")
def test_sign_rsa_bare_cryptography(benchmark, keys):
    key = keys["rsa"][1]
    pad, sha = padding.PKCS1v15(), hashes.SHA256()
    assert len(benchmark(key.sign, MESSAGE, pad, sha)) == 256


@pytest.mark.benchmark(group="sign-rsa2048")
@pytest.mark.parametrize("impl", IMPLS)
def test_sign_rsa_signer(benchmark, keys, impl, monkeypatch):
    monkeypatch.setattr(mdkim, "mime", IMPLS[impl])
    signer = _signer(keys, "rsa", "rsa-sha256")
    fields = benchmark(signer.sign, MESSAGE)
    assert fields.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")


@pytest.mark.benchmark(group="sign-rsa2048")
def test_sign_rsa_dkimpy(benchmark, keys):
    pem = _pem(keys["rsa"][1])
    benchmark.pedantic(dkim.sign, args=(MESSAGE, b"bench", DOMAIN.encode(), pem),
                       kwargs={"canonicalize": (b"relaxed", b"relaxed")}, rounds=20)


@pytest.mark.benchmark(group="sign-ed25519")
def test_sign_ed25519_bare_cryptography(benchmark, keys):
    key = keys["ed"][1]
    assert len(benchmark(key.sign, MESSAGE)) == 64


@pytest.mark.benchmark(group="sign-ed25519")
@pytest.mark.parametrize("impl", IMPLS)
def test_sign_ed25519_signer(benchmark, keys, impl, monkeypatch):
    monkeypatch.setattr(mdkim, "mime", IMPLS[impl])
    signer = _signer(keys, "ed", "ed25519-sha256")
    fields = benchmark(signer.sign, MESSAGE)
    assert fields.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256;")


def _paired(benchmark, bare, full):
    """Time bare() and full() alternately; record per-pair rate ratios in extra_info."""
    bare_ns, full_ns = [], []
    clock = time.perf_counter_ns

    def pair():
        t0 = clock()
        bare()
        t1 = clock()
        full()
        t2 = clock()
        bare_ns.append(t1 - t0)
        full_ns.append(t2 - t1)

    benchmark.pedantic(pair, rounds=PAIRS, iterations=1, warmup_rounds=20)
    ratios = sorted(b / f for b, f in zip(bare_ns, full_ns, strict=True))
    info = {
        "bare_median_us": statistics.median(bare_ns) / 1e3,
        "signer_median_us": statistics.median(full_ns) / 1e3,
        "bare_min_us": min(bare_ns) / 1e3,
        "signer_min_us": min(full_ns) / 1e3,
        "rate_ratio_median_of_pairs": statistics.median(ratios),
        "rate_ratio_of_medians": statistics.median(bare_ns) / statistics.median(full_ns),
        "rate_ratio_of_mins": min(bare_ns) / min(full_ns),
    }
    benchmark.extra_info.update(info)
    print(f"\n{benchmark.group}: " + ", ".join(f"{k}={v:.3f}" for k, v in info.items()))
    return info


@pytest.mark.benchmark(group="sign-rsa2048-paired")
def test_sign_rsa_paired(benchmark, keys):
    key = keys["rsa"][1]
    pad, sha = padding.PKCS1v15(), hashes.SHA256()
    signer = _signer(keys, "rsa", "rsa-sha256")
    info = _paired(benchmark, lambda: key.sign(MESSAGE, pad, sha), lambda: signer.sign(MESSAGE))
    assert info["rate_ratio_median_of_pairs"] > 0


@pytest.mark.benchmark(group="sign-ed25519-paired")
def test_sign_ed25519_paired(benchmark, keys):
    key = keys["ed"][1]
    signer = _signer(keys, "ed", "ed25519-sha256")
    info = _paired(benchmark, lambda: key.sign(MESSAGE), lambda: signer.sign(MESSAGE))
    assert info["rate_ratio_median_of_pairs"] > 0
