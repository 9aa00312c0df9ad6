"""DKIM signatures of generated awkward messages, as the receiver gets them, verify everywhere.

Where ``tests/test_dkim.py`` signs one hand-made message per oddity, this test
draws messages from a seeded generator that combines them (folded fields with
tabs and WSP-only continuation lines, odd-case names, empty and WSP-only
values, 998-octet lines, many Received, a second Subject, UTF-8 fields, bodies
that are absent, empty, all empty lines, WSP-only, dot lines or without a
final CRLF), signs each with one of sixteen signers (RSA-2048 and Ed25519, the
four canonicalisations, with the default h= list or one that also signs and
over-signs fields the message may lack), then does what happens to it on its
way: the acceptor's Received field in front, the delivery client's
dot-stuffing and the receiver's un-stuffing.  Every signature must pass
dkimpy, mailauth and OpenDKIM.  OpenDKIM's strict header checks refuse a
message with two Subject fields before verifying: those go to the other two.
"""
import random
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dkimtools.verifiers import dkimpy_verify, mailauth_verify, opendkim_verify
from mta.delivery.client import dot_stuff
from mta.dkim import CANONICALIZATIONS, DkimConfig, DkimKey, Signer

SEED = 20260
COUNT = 160
DOMAIN = "example.com"
NOW = int(time.time()) - 60
TRACE = (b"Received: from client.test (client.test [127.0.0.1])\r\n"
         b"\tby mta.test with ESMTP id 0A1B2C; Mon, 1 Jan 2024 00:00:00 +0000\r\n")
# every field that may be absent, signed and over-signed: h= names fields not there
OVER_HEADERS = ["from", "subject", "to", "cc", "reply-to", "sender", "date", "message-id",
                "x-empty", "content-type", "references", "in-reply-to"]
OVERSIGN = ["from", "subject", "to", "cc", "reply-to", "sender", "date", "message-id"]
CRLF = "\r\n"


def _words(rng, n):
    out = []
    size = 0
    while size < n:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 12)))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def _subject(rng):
    return rng.choice([
        "Subject:", "Subject:    \t  ", "SUBJECT: hello   world\t\t!",
        "Subject: " + _words(rng, 989),
        "Subject: " + _words(rng, 70) + "\r\n\t" + _words(rng, 60) + "\r\n  \t" + _words(rng, 30),
        "Subject: a\r\n \r\n b", "Subject: x\r\n\t", "Subject:\tleading tab, trailing \t",
        "Subject: caf\u00e9 \u65e5\u672c\u8a9e", "subject: has: colons: inside",
    ])


def _fields(rng):
    fields = [f"Received: from h{i}.example\r\n\tby mx.example; Mon, 1 Jan 2024 00:00:{i:02d} +0000"
              for i in range(rng.choice([0, 0, 1, 30]))]
    trace = len(fields)
    fields.append(rng.choice([
        f"From: a@{DOMAIN}", f"FROM:a@{DOMAIN.upper()}", f"from:   Name   <a@{DOMAIN}>   ",
        f'From: "Long, Name" (comment)\r\n\t<a@{DOMAIN}>', f"From:\r\n a@{DOMAIN}",
        f"From: J\u00fcrgen M\u00fcller <a@{DOMAIN}>"]))
    fields.append(rng.choice(["Date: Mon, 1 Jan 2024 00:00:00 +0000",
                              "DATE:\r\n\tMon, 1 Jan 2024 00:00:00 +0000"]))
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        fields.append(_subject(rng))
    optional = [  # at most one of each name
        ("To: r@dest.example", "to: r@dest.example,\r\n  s@dest.example,\r\n\tt@dest.example"),
        ("CC:   c@dest.example  ",), ("message-id:<x@example>", "Message-Id:\r\n <x@example>"),
        ("Content-Type: text/plain;\r\n\tcharset=\"utf-8\";\r\n\tformat=flowed",),
        ("X-Long: " + "y" * 990,), ("X-Empty:",), ("Reply-To: r@example.com",),
        ("References: " + "\r\n ".join(f"<r{i}@example>" for i in range(20)),),
    ]
    fields += [rng.choice(f) for f in optional if rng.random() < 0.4]
    rest = fields[trace:]
    rng.shuffle(rest)
    return fields[:trace] + rest


def _body(rng):
    return rng.choice([
        None, "", CRLF * 5, " " + CRLF + "\t" + CRLF + "  \t " + CRLF,
        "x" * 998 + CRLF + "y" * 997 + " " + CRLF, "no final line end", "trailing WSP \t ",
        "line" + CRLF + "   ", "." + CRLF + ".." + CRLF + ".leading" + CRLF + "." + CRLF,
        "caf\u00e9 \u65e5\u672c\u8a9e" + CRLF, "a  b\t\tc \t " + CRLF + CRLF + CRLF + " " + CRLF,
        CRLF + "first line empty" + CRLF,
        "".join(_words(rng, rng.randint(0, 996)) + rng.choice(["", " ", "\t"]) + CRLF
                for _ in range(rng.randint(1, 20))),
    ])


def _message(rng):
    head = CRLF.join(_fields(rng))
    body = _body(rng)
    text = head + rng.choice(["", CRLF]) if body is None else head + CRLF + CRLF + body
    return text.encode("utf-8")


def _received(signed):
    """The message as the receiver has it: our Received on top, dot-stuffed and unstuffed."""
    data = dot_stuff(TRACE + signed)[:-3]  # without the final "." CRLF
    return b"\r\n".join(line[1:] if line.startswith(b".") else line
                        for line in data.split(b"\r\n"))


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    files = {}
    for name, key in (("rsa", rsa.generate_private_key(65537, 2048)),
                      ("ed", ed25519.Ed25519PrivateKey.generate())):
        files[name] = str(d / f"{name}.pem")
        with open(files[name], "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    signers = []
    records = {}
    for canon in CANONICALIZATIONS:
        for alg, file in (("rsa-sha256", files["rsa"]), ("ed25519-sha256", files["ed"])):
            for over in (False, True):
                extra = {"headers": OVER_HEADERS, "oversign": OVERSIGN} if over else {}
                sel = f"{alg[:2]}-{canon.replace('/', '-')}-{'over' if over else 'std'}"
                s = Signer.from_config(DkimConfig(
                    keys=[DkimKey(domain=DOMAIN, selector=sel, key_file=file, algorithm=alg)],
                    canonicalization=canon, **extra))
                signers.append(s)
                records.update(s.dns_records())
    rng = random.Random(SEED)
    messages = {}
    for i in range(COUNT):
        msg = _message(rng)
        messages[f"m{i}"] = (msg, _received(signers[i % len(signers)].sign_message(msg, NOW)))
    return records, messages


def test_generated_messages_verify_with_three_verifiers(signed, tmp_path):
    records, messages = signed
    got = {k: v for k, (_orig, v) in messages.items()}
    failed = {k: r for k, r in ((k, dkimpy_verify(v, records)) for k, v in got.items())
              if r != [True]}
    assert not failed, ("dkimpy", failed)
    ma = mailauth_verify(got, records, str(tmp_path), now_ms=(NOW + 60) * 1000)
    failed = {k: r for k, r in ma.items() if [x["result"] for x in r] != ["pass"]}
    assert not failed, ("mailauth", failed)
    one_subject = {k: v for k, v in got.items()
                   if sum(1 for line in v.split(b"\r\n\r\n")[0].split(b"\r\n")
                          if line[:8].lower() == b"subject:") < 2}
    assert len(one_subject) > COUNT // 2
    od = opendkim_verify(one_subject, records, str(tmp_path))
    failed = {k: r for k, r in od.items() if r["rc"] != 0}
    assert not failed, ("opendkim", failed)
