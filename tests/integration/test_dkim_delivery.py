"""Mail signed by the MTA and delivered to a sink verifies with dkimpy, OpenDKIM and mailauth.

The keys sign two domains (RSA-2048 for rsa.test, Ed25519 for ed.test): the
messages are injected over SMTP, routed by MX through the test's own DNS
server on loopback to an aiosmtpd sink on 127.0.0.10 (the fixture ``lab``,
tests/integration/mxlab.py), and the bytes the sink
received are checked by all three verifiers.  A copy altered after signing
fails all three.
"""
import smtplib

from daemon import HOST, wait_until
from dkimtools.verifiers import dkimpy_verify, mailauth_verify, opendkim_verify
from mta.dkim import public_record
from mxlab import IPS, mx

SINK_IP = IPS[0]


def _message(domain: str, n: int) -> bytes:
    return (f"From: Sender <news@{domain}>\r\nTo: reader@dest.test\r\n"
            f"Subject: signed on delivery {n}\r\nDate: Mon, 23 Nov 2026 10:00:0{n} +0000\r\n"
            f"Message-ID: <d{n}@{domain}>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Hello  with  spaces \r\n\r\n.leading dot line\r\n").encode()


def test_delivered_mail_carries_signatures_three_verifiers_accept(lab, dkim_keys, tmp_path):
    records = {"rsa1._domainkey.rsa.test": public_record(dkim_keys.rsa),
               "ed1._domainkey.ed.test": public_record(dkim_keys.ed)}
    sink = lab.aio(SINK_IP)
    lab.serve(mx("dest.test", "mx.dest.test", SINK_IP))
    d = lab.daemon(acceptors=2, sections={"dkim": {"keys": [
        {"domain": "rsa.test", "selector": "rsa1", "key_file": dkim_keys.files["rsa"]},
        {"domain": "ed.test", "selector": "ed1", "key_file": dkim_keys.files["ed"],
         "algorithm": "ed25519-sha256"},
    ]}})
    sent = {"rsa": _message("rsa.test", 1), "ed": _message("ed.test", 2)}
    with smtplib.SMTP(HOST, d.port, local_hostname="client.test") as s:
        for name, msg in sent.items():
            s.sendmail(f"bounces@{name}.test", ["reader@dest.test"], msg)
    wait_until(lambda: sink.received() >= 2, 30, "both messages at the sink",
               interval=0.05, details=lambda: d.log()[-3000:])
    assert sink.received() == 2, d.log()[-3000:]
    got = {}
    for t in sink.snapshot():
        name, raw = t.mail_from.split("@")[1].split(".")[0], t.data
        assert t.rcpt_tos == ["reader@dest.test"]
        assert raw.count(b"DKIM-Signature:") == 1
        assert raw.endswith(sent[name])  # byte-exact apart from the added header fields
        got[name] = raw
    tampered = {f"{k}-tampered": v.replace(b"Hello", b"Jello") for k, v in got.items()}
    work = str(tmp_path / "verify")

    for name, raw in got.items():
        assert dkimpy_verify(raw, records) == [True], name
    for name, raw in tampered.items():
        assert dkimpy_verify(raw, records) == [False], name

    ma = mailauth_verify({**got, **tampered}, records, work)
    for name in got:
        assert [r["result"] for r in ma[name]] == ["pass"], (name, ma[name])
    for name in tampered:
        assert [r["result"] for r in ma[name]] != ["pass"], (name, ma[name])

    od = opendkim_verify({**got, **tampered}, records, work)
    for name in got:
        assert od[name]["rc"] == 0, (name, od[name])
    for name in tampered:
        # A verification failure, not any failure (a key not found, a DNS error):
        assert od[name]["rc"] != 0 and "Bad signature" in od[name]["stderr"], (name, od[name])
