"""Mail signed by the MTA and delivered to a sink verifies with dkimpy, OpenDKIM and mailauth.

The keys sign two domains (RSA-2048 for rsa.test, Ed25519 for ed.test): the
messages are injected over SMTP, routed by MX through the test's own DNS
server on loopback to an aiosmtpd sink on 127.0.0.10, and the bytes the sink
received are checked by all three verifiers.  A copy altered after signing
fails all three.
"""
import smtplib
import time

from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from daemon import HOST, free_port
from dkimtools.verifiers import dkimpy_verify, mailauth_verify, opendkim_verify
from mta.dkim import public_record

SINK_IP = "127.0.0.10"


class Recorder:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 Ok"


def _key_file(tmp_path, name, key):
    p = tmp_path / f"{name}.pem"
    p.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(p)


def _message(domain: str, n: int) -> bytes:
    return (f"From: Sender <news@{domain}>\r\nTo: reader@dest.test\r\n"
            f"Subject: signed on delivery {n}\r\nDate: Mon, 23 Nov 2026 10:00:0{n} +0000\r\n"
            f"Message-ID: <d{n}@{domain}>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Hello  with  spaces \r\n\r\n.leading dot line\r\n").encode()


def test_delivered_mail_carries_signatures_three_verifiers_accept(make_daemon, dns_server,
                                                                   tmp_path):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    records = {"rsa1._domainkey.rsa.test": public_record(rsa_key),
               "ed1._domainkey.ed.test": public_record(ed_key)}
    port = free_port(SINK_IP)
    rec = Recorder()
    sink = Controller(rec, hostname=SINK_IP, port=port)
    sink.start()
    try:
        dns = dns_server(["dest.test. 300 IN MX 10 mx.dest.test.",
                          f"mx.dest.test. 300 IN A {SINK_IP}"])
        d = make_daemon(
            delivery={"hold": False, "nameservers": [f"{dns.address}:{dns.port}"],
                      "mx_port": port},
            dkim={"keys": [
                {"domain": "rsa.test", "selector": "rsa1",
                 "key_file": _key_file(tmp_path, "rsa", rsa_key)},
                {"domain": "ed.test", "selector": "ed1",
                 "key_file": _key_file(tmp_path, "ed", ed_key), "algorithm": "ed25519-sha256"},
            ]})
        sent = {"rsa": _message("rsa.test", 1), "ed": _message("ed.test", 2)}
        with smtplib.SMTP(HOST, d.port) as s:
            for name, msg in sent.items():
                s.sendmail(f"bounces@{name}.test", ["reader@dest.test"], msg)
        deadline = time.monotonic() + 30
        while len(rec.messages) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(rec.messages) == 2, d.log()[-3000:]
    finally:
        sink.stop()
    got = {}
    for sender, rcpts, raw in rec.messages:
        name = sender.split("@")[1].split(".")[0]
        assert rcpts == ["reader@dest.test"]
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
        assert od[name]["rc"] != 0, (name, od[name])
