"""DKIM signing: configuration, key checks, and three independent verifiers.

Every message of ``tests/dkim_corpus/`` is signed with RSA-2048 and with
Ed25519, in each of the four canonicalisations, and must verify with dkimpy,
with OpenDKIM (Debian's ``opendkim-testmsg``, whose resolver reaches only an
unbound started by the test in a private network namespace) and with Node
``mailauth`` 4 (keys handed over by a resolver function).  Each message
altered after signing must fail with all three.
"""
import base64
import json
import glob
import os
import re
import subprocess
import time
import warnings

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning

from mta import dkim as mdkim
from mta import mime
from mta.dkim import DkimConfig, DkimConfigError, DkimFallback, DkimKey, Signer
from dkimtools.verifiers import dkimpy_verify, mailauth_verify, opendkim_verify  # tests/ is on sys.path

CORPUS_DIR = os.path.join(os.path.dirname(__file__), "dkim_corpus")
CORPUS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CORPUS_DIR, "*.eml")))
AUTHOR = "example.com"
ESP = "esp.example.net"
NOW = int(time.time()) - 60  # signing time; verifiers reject a t= in the future


def _corpus(name):
    with open(os.path.join(CORPUS_DIR, name), "rb") as f:
        return f.read()


# -- keys ------------------------------------------------------------------------

def _write_pem(path, key):
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return str(path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    out = {
        "rsa": _write_pem(d / "rsa2048.pem", rsa.generate_private_key(65537, 2048)),
        "rsa1024": _write_pem(d / "rsa1024.pem", rsa.generate_private_key(65537, 1024)),
        "rsa4096": _write_pem(d / "rsa4096.pem", rsa.generate_private_key(65537, 4096)),
        "ed": _write_pem(d / "ed25519.pem", ed25519.Ed25519PrivateKey.generate()),
        "esp": _write_pem(d / "esp.pem", rsa.generate_private_key(65537, 2048)),
        "ec": _write_pem(d / "ec.pem", ec.generate_private_key(ec.SECP256R1())),
    }
    # PKCS#1 ("BEGIN RSA PRIVATE KEY"), as opendkim-genkey writes it
    pk1 = rsa.generate_private_key(65537, 2048)
    (d / "pkcs1.pem").write_bytes(pk1.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    out["pkcs1"] = str(d / "pkcs1.pem")
    # Ed25519 as a base64 32-byte seed, as dkimpy's dknewkey writes it
    seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    (d / "ed.seed").write_bytes(base64.b64encode(seed) + b"\n")
    out["seed"] = str(d / "ed.seed")
    subprocess.run(["openssl", "genrsa", "-out", str(d / "rsa512.pem"), "512"],
                   check=True, capture_output=True)
    out["rsa512"] = str(d / "rsa512.pem")
    (d / "garbage.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    out["garbage"] = str(d / "garbage.pem")
    out["dir"] = str(d)
    return out


def _signer(keys, *specs, **cfg):
    """Signer for AUTHOR from specs like ('rsa', 'rsa-sha256')."""
    key_list = [DkimKey(domain=AUTHOR, selector=f"s-{name}", key_file=keys[name], algorithm=alg)
                for name, alg in specs]
    return Signer.from_config(DkimConfig(keys=key_list, **cfg))


RSA = ("rsa", "rsa-sha256")
ED = ("ed", "ed25519-sha256")


# -- configuration -------------------------------------------------------------

def test_config_from_toml_and_defaults(keys):
    text = f'''
    canonicalization = "relaxed/relaxed"
    expire_seconds = 604800

    [[keys]]
    domain = "{AUTHOR}"
    selector = "rsa2026"
    key_file = "{keys['rsa']}"

    [[keys]]
    domain = "{AUTHOR}"
    selector = "ed2026"
    key_file = "{keys['ed']}"
    algorithm = "ed25519-sha256"

    [[keys]]
    domain = "{ESP}"
    selector = "esp"
    key_file = "{keys['esp']}"

    [fallback]
    domain = "{ESP}"
    '''
    cfg = msgspec.toml.decode(text, type=DkimConfig)
    assert cfg.keys[0].algorithm == "rsa-sha256"
    assert cfg.fallback.mode == "unmatched"
    assert "from" in cfg.headers and cfg.oversign == ["from"]
    assert mdkim.validate(cfg) == []
    signer = Signer.from_config(cfg)
    assert set(signer.dns_records()) == {
        f"rsa2026._domainkey.{AUTHOR}", f"ed2026._domainkey.{AUTHOR}", f"esp._domainkey.{ESP}"}
    assert signer.dns_records()[f"ed2026._domainkey.{AUTHOR}"].startswith("v=DKIM1; k=ed25519; p=")
    with pytest.raises(msgspec.ValidationError, match="unknown field `selectr`"):
        msgspec.toml.decode(b'[[keys]]\ndomain="a.example"\nselectr="s"\nkey_file="/k"\n', type=DkimConfig)
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 'rsa-sha1'"):
        msgspec.toml.decode(b'[[keys]]\ndomain="a.example"\nselector="s"\nkey_file="/k"\n'
                            b'algorithm="rsa-sha1"\n', type=DkimConfig)
    schema = msgspec.json.schema(DkimConfig)
    props = schema["$defs"]["DkimKey"]["properties"]
    assert all(p.get("description") for p in props.values())


def test_a_dsa_key_is_named_without_the_deprecated_dsa_module(tmp_path):
    """A DSA key (made by the openssl command: cryptography 51 deprecates its dsa module,
    which mta.dkim no longer uses) is refused naming what it is; naming it warns of
    nothing (dsa.DSAPrivateKey did, and goes when cryptography removes DSA)."""
    path = tmp_path / "dsa.pem"
    subprocess.run(["openssl", "genpkey", "-genparam", "-algorithm", "DSA", "-pkeyopt",
                    "dsa_paramgen_bits:1024", "-out", str(tmp_path / "p.pem")], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "genpkey", "-paramfile", str(tmp_path / "p.pem"), "-out",
                    str(path)], check=True, capture_output=True)
    cfg = DkimConfig(keys=[DkimKey(domain=AUTHOR, selector="a", key_file=str(path))])
    with warnings.catch_warnings():     # (cryptography itself warns as it loads one)
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        errors = mdkim.validate(cfg)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert errors == [f"dkim.keys[0].key_file: {path} holds a DSA key; rsa-sha256 needs an "
                      "RSA key"], errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mdkim._kind(key) == "a DSA"


def test_validate_names_key_and_file(keys):
    missing = os.path.join(keys["dir"], "nope", "missing.pem")
    cfg = DkimConfig(keys=[
        DkimKey(domain=AUTHOR, selector="a", key_file=missing),
        DkimKey(domain=AUTHOR, selector="b", key_file=keys["dir"]),
        DkimKey(domain=AUTHOR, selector="c", key_file=keys["ed"]),
        DkimKey(domain=AUTHOR, selector="d", key_file=keys["rsa"], algorithm="ed25519-sha256"),
        DkimKey(domain=AUTHOR, selector="e", key_file=keys["rsa512"]),
        DkimKey(domain=AUTHOR, selector="f", key_file=keys["ec"]),
        DkimKey(domain=AUTHOR, selector="g", key_file=keys["garbage"]),
        DkimKey(domain="bad domain", selector="h", key_file=keys["rsa"]),
        DkimKey(domain=AUTHOR, selector="a", key_file=keys["rsa"]),
        DkimKey(domain=AUTHOR, selector="i", key_file=keys["rsa"], headers=["subject"]),
    ], fallback=DkimFallback(domain="other.example"))
    errors = mdkim.validate(cfg)
    assert f"dkim.keys[0].key_file: cannot read {missing}: No such file or directory" in errors
    assert f"dkim.keys[1].key_file: cannot read {keys['dir']}: Is a directory" in errors
    assert f"dkim.keys[2].key_file: {keys['ed']} holds an Ed25519 key; rsa-sha256 needs an RSA key" in errors
    assert f"dkim.keys[3].key_file: {keys['rsa']} holds an RSA key; ed25519-sha256 needs an Ed25519 key" in errors
    assert (f"dkim.keys[4].key_file: {keys['rsa512']} holds a 512-bit RSA key; "
            "rsa-sha256 needs 1024 to 4096 bits") in errors
    assert f"dkim.keys[5].key_file: {keys['ec']} holds an EC key; rsa-sha256 needs an RSA key" in errors
    assert any(e.startswith(f"dkim.keys[6].key_file: {keys['garbage']} is not a usable PEM") for e in errors)
    assert any(e.startswith("dkim.keys[7].domain: ") for e in errors)
    assert "dkim.keys[8]: selector a of example.com is already keys[0]" in errors
    assert "dkim.keys[9].headers: must include From (RFC 6376 5.4)" in errors
    assert "dkim.fallback: no key in dkim.keys for other.example" in errors
    assert len(errors) == 11, errors
    with pytest.raises(DkimConfigError) as exc:
        Signer.from_config(cfg)
    assert exc.value.errors == errors
    # a custom prefix for the section's place in the main config
    assert mdkim.validate(DkimConfig(keys=cfg.keys[:1]), prefix="x.dkim") == [
        f"x.dkim.keys[0].key_file: cannot read {missing}: No such file or directory"]


def test_key_formats_and_sizes(keys):
    for name, alg in (("rsa1024", "rsa-sha256"), ("rsa4096", "rsa-sha256"), ("pkcs1", "rsa-sha256"),
                      ("seed", "ed25519-sha256")):
        cfg = DkimConfig(keys=[DkimKey(domain=AUTHOR, selector="s", key_file=keys[name], algorithm=alg)])
        assert mdkim.validate(cfg) == [], name
        signer = Signer.from_config(cfg)
        signed = signer.sign_message(_corpus("plain.eml"), NOW)
        assert dkimpy_verify(signed, signer.dns_records()) == [True], name


def test_disabled_config_signs_nothing_and_loads_nothing():
    cfg = DkimConfig(enabled=False, keys=[DkimKey(domain=AUTHOR, selector="s", key_file="/nonexistent")])
    assert mdkim.validate(cfg) == []
    assert Signer.from_config(cfg).sign(_corpus("plain.eml")) == b""


def test_keys_parsed_once(keys, monkeypatch):
    calls = []
    real = mdkim.load_key
    monkeypatch.setattr(mdkim, "load_key", lambda *a: calls.append(a) or real(*a))
    signer = _signer(keys, RSA, ED)
    assert len(calls) == 2
    for _ in range(3):
        signer.sign(_corpus("plain.eml"))
    assert len(calls) == 2


# -- signature shape and selection ------------------------------------------------

def _sig_tags(fields):
    out = []
    for _name, raw, _s, _e in mime.parse_headers(fields + b"\r\n"):
        value = mime.field_value(raw).decode()
        tags = dict(t.strip().split("=", 1) for t in value.split(";") if t.strip())
        out.append({k: re.sub(r"\s+", "", v) for k, v in tags.items()})
    return out


def test_signature_tags(keys):
    signer = _signer(keys, RSA, ED, expire_seconds=3600)
    msg = _corpus("plain.eml")
    fields = signer.sign(msg, NOW)
    assert fields.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=s-rsa;")
    assert max(len(line) for line in fields.split(b"\r\n")) <= 80
    rsa_tags, ed_tags = _sig_tags(fields)
    assert rsa_tags["a"] == "rsa-sha256" and ed_tags["a"] == "ed25519-sha256"
    for tags in (rsa_tags, ed_tags):
        assert tags["t"] == str(NOW) and tags["x"] == str(NOW + 3600)
        assert "l" not in tags and "i" not in tags
        assert tags["h"] == "from:to:subject:date:message-id:mime-version:content-type:from"
    assert rsa_tags["bh"] == ed_tags["bh"]  # one body hash for both


def test_signature_lines_stay_within_78_characters(keys, tmp_path):
    # RFC 5322 2.1.1: lines SHOULD be at most 78 characters.  The first line held
    # v=, a=, c=, d= and s= whatever their length: 81 characters for Ed25519 with
    # d=example.com; s=ed2026, 300 with a long domain (still a valid signature).
    long_domain = ".".join(("a" * 60, "b" * 60, "c" * 60, "example"))
    specs = (("example.com", "ed2026", "ed", "ed25519-sha256"),
             ("xn--bcher-kva.example", "rsa2026", "rsa", "rsa-sha256"),
             (long_domain, "sel" + "x" * 20, "ed", "ed25519-sha256"))
    for domain, selector, key, alg in specs:
        signer = Signer.from_config(DkimConfig(
            keys=[DkimKey(domain=domain, selector=selector, key_file=keys[key], algorithm=alg)],
            canonicalization="simple/simple", expire_seconds=86400))
        msg = (b"From: a@" + domain.encode() + b"\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
               b"Subject: x\r\n\r\nbody\r\n")
        for eol in (b"\r\n", b"\n"):
            fields = signer.sign(msg.replace(b"\r\n", eol), NOW)
            assert fields.endswith(eol) and (eol == b"\n") == (b"\r" not in fields)
            for line in fields[:-len(eol)].split(eol):
                # only a d= value too long for a line of its own may make one longer
                assert len(line) <= 78 or line == b"\td=" + domain.encode() + b";", line
        signed = signer.sign_message(msg, NOW)
        assert dkimpy_verify(signed, signer.dns_records()) == [True], domain
        got = mailauth_verify({"m": signed}, signer.dns_records(), str(tmp_path),
                              now_ms=(NOW + 60) * 1000)
        assert [r["result"] for r in got["m"]] == ["pass"], (domain, got)


def test_no_expiry_by_default(keys):
    tags = _sig_tags(_signer(keys, RSA).sign(_corpus("plain.eml")))[0]
    assert "x" not in tags and abs(int(tags["t"]) - time.time()) < 60


def test_signer_counts_signatures_and_their_cpu_time(keys):
    """The counters behind the mta_dkim_* metrics: one signature per key per message, the
    CPU time of signing and, inside it, of the key operations; an unsigned message (no key
    for its From domain) counts nothing."""
    signer = _signer(keys, RSA, ED)
    assert (signer.signatures, signer.cpu_seconds, signer.key_cpu_seconds) == (0, 0.0, 0.0)
    for _ in range(3):
        assert signer.sign(_corpus("plain.eml")).count(b"DKIM-Signature:") == 2
    assert signer.signatures == 6
    assert 0 < signer.key_cpu_seconds < signer.cpu_seconds
    before = (signer.signatures, signer.cpu_seconds, signer.key_cpu_seconds)
    assert signer.sign(b"From: a@elsewhere.test\r\n\r\nx\r\n") == b""
    assert (signer.signatures, signer.cpu_seconds, signer.key_cpu_seconds) == before


def test_signature_line_end_follows_message(keys):
    msg = _corpus("lf_line_endings.eml")
    fields = _signer(keys, RSA).sign(msg)
    assert b"\r" not in fields and fields.endswith(b"\n")


def test_choice_by_from_domain_and_fallback(keys):
    ka = DkimKey(domain=AUTHOR, selector="a", key_file=keys["rsa"])
    ke = DkimKey(domain=ESP, selector="esp", key_file=keys["esp"])
    sub = DkimKey(domain="parent.example", selector="p", key_file=keys["ed"],
                  algorithm="ed25519-sha256", subdomains=True)

    def domains(signer, from_):
        msg = b"From: x@" + from_.encode("utf-8") + b"\r\nSubject: s\r\n\r\nbody\r\n"
        return [(t["d"], t["s"]) for t in _sig_tags(signer.sign(msg))]

    idn = DkimKey(domain="xn--bcher-kva.example", selector="i", key_file=keys["rsa"])
    only = Signer.from_config(DkimConfig(keys=[ka, ke, sub, idn]))
    assert domains(only, "B\u00fccher.example") == [("xn--bcher-kva.example", "i")]
    assert domains(only, "Example.COM") == [(AUTHOR, "a")]
    assert domains(only, "elsewhere.example") == []
    assert domains(only, "news.parent.example") == [("parent.example", "p")]
    assert domains(only, "sub.example.com") == []  # subdomains off for example.com

    unmatched = Signer.from_config(DkimConfig(keys=[ka, ke], fallback=DkimFallback(domain=ESP)))
    assert domains(unmatched, AUTHOR) == [(AUTHOR, "a")]
    assert domains(unmatched, "elsewhere.example") == [(ESP, "esp")]
    assert unmatched.sign(b"Subject: no from\r\n\r\nbody\r\n").count(b"d=" + ESP.encode()) == 1

    always = Signer.from_config(DkimConfig(keys=[ka, ke],
                                           fallback=DkimFallback(domain=ESP, selector="esp", mode="always")))
    assert domains(always, AUTHOR) == [(AUTHOR, "a"), (ESP, "esp")]
    assert domains(always, ESP) == [(ESP, "esp")]
    assert domains(always, "elsewhere.example") == [(ESP, "esp")]


# -- the three verifiers -------------------------------------------------------------

CANONS = mdkim.CANONICALIZATIONS
ALGS = {"rsa": RSA, "ed": ED}


def _tamper_header(signed):
    return re.sub(rb"(?im)^(subject:)", rb"\1X", signed, count=1)


def _tamper_body(signed):
    return signed + b"tampered line\r\n"


@pytest.fixture(scope="module")
def verdicts(keys, tmp_path_factory):
    """Sign the corpus every way, then ask each verifier about every message once."""
    work = str(tmp_path_factory.mktemp("verify"))
    records = {}
    signers = {}
    for canon in CANONS:
        for alg in ALGS:
            signers[(canon, alg)] = _signer(keys, ALGS[alg], canonicalization=canon)
            records.update(signers[(canon, alg)].dns_records())
    both = _signer(keys, RSA, ED)
    esp = Signer.from_config(DkimConfig(
        keys=[DkimKey(domain=AUTHOR, selector="s-rsa", key_file=keys["rsa"]),
              DkimKey(domain=ESP, selector="esp", key_file=keys["esp"])],
        fallback=DkimFallback(domain=ESP, mode="always")))
    records.update(esp.dns_records())

    single = {}  # one signature each: every verifier judges it alone
    for name in CORPUS:
        msg = _corpus(name)
        for (canon, alg), signer in signers.items():
            signed = signer.sign_message(msg, NOW)
            single[f"{name}|{canon}|{alg}|good"] = signed
            if canon == "relaxed/relaxed":
                single[f"{name}|{canon}|{alg}|body"] = _tamper_body(signed)
                single[f"{name}|{canon}|{alg}|header"] = _tamper_header(signed)
    multi = {}
    for name in CORPUS:
        msg = _corpus(name)
        multi[f"{name}|rsa+ed"] = both.sign_message(msg, NOW)
        multi[f"{name}|author+esp"] = esp.sign_message(msg, NOW)
    plain = both.sign_message(_corpus("plain.eml"), NOW)
    multi["added-from"] = b"From: attacker@evil.example\r\n" + plain
    multi["multi-body"] = _tamper_body(plain)
    expiring = _signer(keys, RSA, expire_seconds=3600).sign_message(_corpus("plain.eml"), NOW)
    multi["expiring"] = expiring

    both_sets = {**single, **multi}
    return {
        "records": records,
        "messages": both_sets,
        "single": single,
        "dkimpy": {k: dkimpy_verify(v, records) for k, v in both_sets.items()},
        "mailauth": mailauth_verify(both_sets, records, work, now_ms=(NOW + 60) * 1000),
        "mailauth_late": mailauth_verify({"expiring": expiring}, records, work,
                                         now_ms=(NOW + 7200) * 1000),
        "opendkim": opendkim_verify(single, records, work),
    }


def _keys_of(prefix, verdicts):
    return [k for k in verdicts["single"] if k.startswith(prefix)]


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_verifies_everywhere(verdicts, name):
    goods = [k for k in _keys_of(name + "|", verdicts) if k.endswith("|good")]
    assert len(goods) == len(CANONS) * len(ALGS)
    for k in goods:
        assert verdicts["dkimpy"][k] == [True], k
        assert [r["result"] for r in verdicts["mailauth"][k]] == ["pass"], (k, verdicts["mailauth"][k])
        assert verdicts["opendkim"][k]["rc"] == 0, (k, verdicts["opendkim"][k])


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_altered_fails_everywhere(verdicts, name):
    bads = [k for k in _keys_of(name + "|", verdicts) if k.endswith(("|body", "|header"))]
    assert len(bads) == 2 * len(ALGS)
    for k in bads:
        assert verdicts["dkimpy"][k] == [False], k
        assert [r["result"] for r in verdicts["mailauth"][k]] != ["pass"], k
        assert verdicts["mailauth"][k], k  # the signature was seen, and failed
        # A verification failure, not any failure (a key not found, a DNS error):
        od = verdicts["opendkim"][k]
        assert od["rc"] != 0 and "Bad signature" in od["stderr"], (k, od)


@pytest.mark.parametrize("name", CORPUS)
def test_corpus_several_signatures(verdicts, name):
    for kind, want in (("rsa+ed", [(AUTHOR, "s-rsa"), (AUTHOR, "s-ed")]),
                       ("author+esp", [(AUTHOR, "s-rsa"), (ESP, "esp")])):
        k = f"{name}|{kind}"
        assert verdicts["dkimpy"][k] == [True, True], k
        got = verdicts["mailauth"][k]
        assert [(r["domain"], r["selector"]) for r in got] == want, k
        assert [r["result"] for r in got] == ["pass", "pass"], (k, got)


def test_added_from_breaks_oversigned_signature(verdicts):
    assert verdicts["dkimpy"]["added-from"] == [False, False]
    assert [r["result"] for r in verdicts["mailauth"]["added-from"]] != ["pass", "pass"]
    assert "pass" not in [r["result"] for r in verdicts["mailauth"]["added-from"]]
    assert verdicts["dkimpy"]["multi-body"] == [False, False]
    assert "pass" not in [r["result"] for r in verdicts["mailauth"]["multi-body"]]


def test_expiry_is_honoured(verdicts):
    assert [r["result"] for r in verdicts["mailauth"]["expiring"]] == ["pass"]
    late = verdicts["mailauth_late"]["expiring"]
    assert [r["result"] for r in late] != ["pass"] and "expired" in late[0]["comment"]


def test_headers_only_message_gets_its_empty_line(keys):
    signer = _signer(keys, RSA)
    msg = _corpus("headers_only.eml")
    signed = signer.sign_message(msg, NOW)
    assert signed.endswith(msg + b"\r\n")
    assert signed[:-len(msg) - 2] == signer.sign(msg, NOW)
    assert signer.sign_message(b"From: a@example.com", NOW).endswith(b"From: a@example.com\r\n\r\n")


def test_empty_message_gets_its_empty_line(keys, tmp_path):
    # An empty message (DATA or BDAT LAST with nothing in it) signed by a fallback key:
    # the DKIM-Signature field was the whole message, with no empty line after it, and
    # mailauth saw no signature at all ("none"), OpenDKIM a syntax error.
    signer = Signer.from_config(DkimConfig(
        keys=[DkimKey(domain=ESP, selector="esp", key_file=keys["esp"])],
        fallback=DkimFallback(domain=ESP)))
    fields = signer.sign(b"", NOW)
    signed = signer.sign_message(b"", NOW)
    assert fields and signed == fields + b"\r\n"
    records = signer.dns_records()
    assert dkimpy_verify(signed, records) == [True]
    got = mailauth_verify({"empty": signed}, records, str(tmp_path), now_ms=(NOW + 60) * 1000)
    assert [r["result"] for r in got["empty"]] == ["pass"], got
    assert _signer(keys, RSA).sign_message(b"", NOW) == b""  # unsigned: left as it was


def test_documented_example_config_is_valid(keys):
    doc = mdkim.__doc__
    start = doc.index("    [dkim]\n")
    end = doc.index("\nReload:")
    text = "\n".join(line[4:] for line in doc[start:end].splitlines())
    for path, name in (("/etc/mta/dkim/example.com.rsa2026.pem", "rsa"),
                       ("/etc/mta/dkim/example.com.ed2026.pem", "ed"),
                       ("/etc/mta/dkim/esp.pem", "esp")):
        text = text.replace(path, keys[name])
    cfg = msgspec.convert(msgspec.toml.decode(text)["dkim"], DkimConfig)
    assert mdkim.validate(cfg) == []
    signer = Signer.from_config(cfg)
    signed = signer.sign_message(b"From: a@elsewhere.example\r\nSubject: x\r\n\r\nhi\r\n", NOW)
    assert dkimpy_verify(signed, signer.dns_records()) == [True]
    assert b"d=esp.example.net" in signed


def test_an_oversigned_field_is_signed_whatever_headers_lists(keys):
    # oversign names To, headers does not: the extra h= entry must stand for one more To
    # than there is, so that a To added on the way breaks the signature (it used to
    # sign the lowest To instead, and an added one above it verified)
    msg = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    signer = _signer(keys, RSA, headers=["from", "subject"], oversign=["from", "to"])
    signed = signer.sign_message(msg, NOW)
    records = signer.dns_records()
    assert dkimpy_verify(signed, records) == [True]
    assert dkimpy_verify(b"To: attacker@evil.example\r\n" + signed, records) == [False]
    assert b"h=from:to:subject:from:to;" in signed.replace(b"\r\n\t", b"")


def test_a_message_without_from_has_from_in_h_even_without_oversigning(keys):
    # RFC 6376 5.4: From is always in h=; with oversign = [] a message without From got
    # an empty h= whose missing ";" swallowed bh= (a malformed signature)
    signer = Signer.from_config(DkimConfig(
        keys=[DkimKey(domain=AUTHOR, selector="s-rsa", key_file=keys["rsa"])], oversign=[],
        fallback=DkimFallback(domain=AUTHOR)))
    msg = b"X-Foo: bar\r\nSubject: no from\r\n\r\nbody\r\n"
    signed = signer.sign_message(msg, NOW)
    assert [t["h"] for t in _sig_tags(signer.sign(msg, NOW))] == ["subject:from"]
    records = signer.dns_records()
    assert dkimpy_verify(signed, records) == [True]
    assert dkimpy_verify(b"From: forged@example.com\r\n" + signed, records) == [False]


def test_a_field_with_vt_or_ff_is_left_out_so_that_every_verifier_agrees(keys, tmp_path):
    # RFC 6376's relaxed canonicalisation keeps VT and FF (they are not WSP), and dkimpy
    # agrees; mailauth folds them as white space, and OpenDKIM fails such a field even
    # with simple canonicalisation: a signature over one held for one verifier and not
    # another.  Such fields are left out of h= (From excepted), and the signature holds
    # everywhere.
    signer = _signer(keys, RSA)
    date = "Date: Tue, 24 Nov 2026 09:30:00 +0000\r\n"     # (OpenDKIM wants one)
    odd = (f"From: Sender <s@{AUTHOR}>\r\nTo: r@example.net\r\n{date}"
           "Subject: form\x0cfeed and vertical\x0btab\r\nX-Note: a \x0b b\r\n\r\n"
           "body\r\n").encode()
    plain = odd.replace(b"\x0c", b" ").replace(b"\x0b", b" ")
    records = signer.dns_records()
    signed = {"odd": signer.sign_message(odd, NOW), "plain": signer.sign_message(plain, NOW)}
    h = {k: re.search(rb"h=([^;]*);", v).group(1).replace(b"\r\n\t", b"") for k, v in signed.items()}
    assert b"subject" not in h["odd"] and b"subject" in h["plain"], h
    assert h["odd"].startswith(b"from:to:date") and h["odd"].endswith(b":from"), h
    for name, msg in signed.items():
        assert dkimpy_verify(msg, records) == [True], name
    got = mailauth_verify(signed, records, str(tmp_path), now_ms=(NOW + 60) * 1000)
    verdict = opendkim_verify(signed, records, str(tmp_path))
    for name in signed:
        assert [r["result"] for r in got[name]] == ["pass"], (name, got[name])
        assert verdict[name]["rc"] == 0, (name, verdict[name])


def test_a_message_of_many_signed_fields_leaves_no_memory_behind(keys):
    """Each signed field is in h=, repeats too; the signer remembered each distinct h=
    list (up to _H_CACHE_MAX of them), its names and its folded text, for the next
    message: a message of 1,000,000 To fields (7 MB) left 60 MB behind, each with
    another count as much again (512 of them: tens of GB), from any client that may
    send.  Only short lists are remembered; a long one is still signed and verifies."""
    import gc
    import tracemalloc
    signer = _signer(keys, ED)
    signer.sign_message(b"From: a@example.com\r\nTo: b@example.net\r\n\r\nwarm\r\n")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in (100_000, 100_001, 100_002):
            signer.sign_message(b"From: a@example.com\r\n" + b"To: x\r\n" * n
                                + b"\r\nbody\r\n")
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert left < 1_000_000, f"{left} octets left behind by three signed messages"
    msg = b"From: a@example.com\r\n" + b"To: x\r\n" * 300 + b"\r\nbody\r\n"
    assert dkimpy_verify(signer.sign_message(msg), signer.dns_records()) == [True]


def test_expiry_counts_from_a_scheduled_start(keys, tmp_path):
    """options.start_time holds a message in the queue for up to 3 days; it is signed at
    injection, and x= counted from then: with expire_seconds shorter than the wait, every
    such message left with its signature expired (mailauth: "expired").  x= counts from
    the start; t= stays the signing time."""
    signer = _signer(keys, RSA, expire_seconds=3600)
    start = NOW + 2 * 86400
    msg = _corpus("plain.eml")
    signed = {"scheduled": signer.sign_message(msg, NOW, start),
              "past": signer.sign_message(msg, NOW, NOW - 600)}
    tags = _sig_tags(signer.sign(msg, NOW, start))[0]
    assert (tags["t"], tags["x"]) == (str(NOW), str(start + 3600))
    assert _sig_tags(signer.sign(msg, NOW, NOW - 600))[0]["x"] == str(NOW + 3600)
    got = mailauth_verify(signed, signer.dns_records(), str(tmp_path),
                          now_ms=(start + 60) * 1000)
    assert [r["result"] for r in got["scheduled"]] == ["pass"], got["scheduled"]
    assert "expired" in got["past"][0]["comment"]


def test_mta_dkim_records_prints_what_verifiers_find_in_dns(keys, tmp_path):
    # The operator publishes each key's TXT record before signing with it: the module
    # said `Signer.dns_records()` prints them, but no command did.  `mta dkim-records`
    # prints them in zone-file form (an RSA-2048 record, longer than a TXT string's 255
    # octets, in pieces), and the record a verifier reads from that signs as the daemon's
    # signer signs.
    import sys
    conf = tmp_path / "mta.toml"
    conf.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n\n'
                    f'[[dkim.keys]]\ndomain = "{AUTHOR}"\nselector = "rsa2026"\n'
                    f'key_file = "{keys["rsa"]}"\n\n'
                    f'[[dkim.keys]]\ndomain = "{AUTHOR}"\nselector = "ed2026"\n'
                    f'key_file = "{keys["ed"]}"\nalgorithm = "ed25519-sha256"\n')
    run = subprocess.run([sys.executable, "-m", "mta", "dkim-records", "-c", str(conf)],
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run
    records = {}
    for line in run.stdout.decode().splitlines():
        m = re.fullmatch(r'(\S+)\. IN TXT \( ((?:"[^"]{1,255}" ?)+) \)', line)
        assert m, line
        records[m.group(1)] = "".join(re.findall(r'"([^"]*)"', m.group(2)))
    assert set(records) == {f"rsa2026._domainkey.{AUTHOR}", f"ed2026._domainkey.{AUTHOR}"}
    assert records[f"rsa2026._domainkey.{AUTHOR}"].startswith("v=DKIM1; k=rsa; p=")
    assert '" "' in run.stdout.decode()             # (the RSA one, in pieces)
    signer = Signer.from_config(DkimConfig(keys=[
        DkimKey(domain=AUTHOR, selector="rsa2026", key_file=keys["rsa"]),
        DkimKey(domain=AUTHOR, selector="ed2026", key_file=keys["ed"],
                algorithm="ed25519-sha256")]))
    signed = signer.sign_message(b"From: a@" + AUTHOR.encode() + b"\r\nTo: b@x.test\r\n"
                                 b"Subject: records\r\n\r\nbody\r\n")
    assert dkimpy_verify(signed, records) == [True, True]
    as_json = json.loads(subprocess.run(
        [sys.executable, "-m", "mta", "dkim-records", "-c", str(conf), "--json"],
        capture_output=True, timeout=60, check=True).stdout)
    assert {r["name"]: r["value"] for r in as_json["records"]} == records
    # no keys: said, exit status 1
    bare = tmp_path / "bare.toml"
    bare.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n')
    run = subprocess.run([sys.executable, "-m", "mta", "dkim-records", "-c", str(bare)],
                         capture_output=True, timeout=60)
    assert run.returncode == 1 and b"no [[dkim.keys]] configured" in run.stderr, run
