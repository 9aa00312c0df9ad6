"""Messages injected over SMTP are DKIM-signed once, in the acceptor, before they are spooled."""
import dkim as dkimpy

from daemon import wait_until
from mta.dkim import public_record


def test_smtp_injected_mail_is_signed_and_verifies(make_daemon, dkim_keys):
    paths = dkim_keys.files
    records = {b"rsa1._domainkey.signer.test.": public_record(dkim_keys.rsa).encode(),
               b"ed1._domainkey.signer.test.": public_record(dkim_keys.ed).encode()}
    d = make_daemon(dkim={"keys": [
        {"domain": "signer.test", "selector": "rsa1", "key_file": paths["rsa"]},
        {"domain": "signer.test", "selector": "ed1", "key_file": paths["ed"],
         "algorithm": "ed25519-sha256"},
    ]})
    msg = (b"From: News <news@signer.test>\r\nTo: reader@example.net\r\n"
           b"Subject: signed\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <s1@signer.test>\r\n\r\nBody line\r\n")
    qid = d.send("bounces@signer.test", ["reader@example.net"], msg)
    [q] = d.queue_list()
    assert q["queue_id"] == qid
    raw = d.cli("queue", "show", "--raw", q["queue_id"]).stdout
    assert raw.count(b"DKIM-Signature:") == 2
    assert raw.endswith(msg)  # signing only prepends header fields

    def dnsfunc(name, timeout=5):
        return records.get(name if name.endswith(b".") else name + b".")

    # dkimpy verifies the first signature it finds; check each one on its own.
    verified = 0
    for sig_index in range(2):
        assert dkimpy.DKIM(raw).verify(idx=sig_index, dnsfunc=dnsfunc)
        verified += 1
    assert verified == 2
    tampered = raw.replace(b"Body line", b"Body lime")
    for sig_index in range(2):
        try:
            ok = dkimpy.DKIM(tampered).verify(idx=sig_index, dnsfunc=dnsfunc)
        except dkimpy.ValidationError as exc:  # dkimpy raises on a body hash mismatch
            assert "body hash mismatch" in str(exc)
            ok = False
        assert not ok

    # The signing's metrics: two signatures (one per key), no failure, CPU time spent
    # and, inside it, the key operations' share (the acceptor reports once a second).
    wait_until(lambda: d.metrics().get("mta_dkim_signatures_total") == 2, timeout=15)
    m = d.metrics()
    assert m["mta_dkim_signing_failures_total"] == 0
    assert 0 < m["mta_dkim_key_cpu_seconds_total"] < m["mta_dkim_signing_cpu_seconds_total"] < 1


def test_unsigned_when_no_key_matches(make_daemon, dkim_keys):
    d = make_daemon(dkim={"keys": [
        {"domain": "signer.test", "selector": "rsa1", "key_file": dkim_keys.files["rsa"]}]})
    qid = d.send("a@other.test", ["b@example.net"],
                 b"From: a@other.test\r\nSubject: x\r\n\r\nx\r\n")
    [q] = d.queue_list()
    assert q["queue_id"] == qid
    raw = d.cli("queue", "show", "--raw", q["queue_id"]).stdout
    assert b"DKIM-Signature:" not in raw
