"""Messages injected over SMTP are DKIM-signed once, in the acceptor, before they are spooled."""
import datetime
import re
import time

import dkim as dkimpy

from daemon import queued_id, wait_until
from dkimtools.verifiers import dkimpy_verify, mailauth_verify
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


def test_many_fields_of_a_signed_name_do_not_stall_the_acceptor(make_daemon, dkim_keys):
    """h= names every occurrence of a signed field (RFC 6376 5.4.2); the compiled
    canon_headers looked for each occurrence from the bottom of the header block again,
    past the ones it had used: quadratic.  A 1.75 MB message of 250,000 To fields from a
    client that may relay held the acceptor's event loop (every session and the HTTP
    API of that process) for about 15 s on the test machine; now it is signed in a
    fraction of a second, every To field in h=, and a client that connects meanwhile is
    greeted at once."""
    d = make_daemon(acceptors=1, shards=1, dkim={"keys": [
        {"domain": "signer.test", "selector": "ed1", "key_file": dkim_keys.files["ed"],
         "algorithm": "ed25519-sha256"}]})
    n = 250_000
    msg = b"From: a@signer.test\r\n" + b"To: y@example.net\r\n" * n + b"\r\nbody\r\n"
    c = d.session()
    assert c.cmd("MAIL FROM:<a@signer.test>")[0] == 250
    assert c.cmd("RCPT TO:<y@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(msg + b".\r\n")
    time.sleep(0.2)     # the end of DATA is in: the message is being signed
    t0 = time.monotonic()
    other = d.connect(timeout=30)
    greeted = time.monotonic() - t0
    other.close()
    code, lines = c.reply()
    c.close()
    assert code == 250, lines
    assert greeted < 2.0, f"a new client waited {greeted:.1f} s for its greeting"
    raw = d.cli("queue", "show", "--raw", queued_id(" ".join(lines))).stdout
    h = raw.split(b"\th=", 1)[1].split(b";", 1)[0]
    assert h.replace(b"\r\n\t ", b"").replace(b" ", b"").split(b":").count(b"to") == n


def test_a_scheduled_message_is_not_signed_to_expire_before_it_leaves(make_daemon, dkim_keys,
                                                                      tmp_path):
    """An HTTP transmission with options.start_time waits in the queue until then; x= is
    counted from that start (it was counted from the injection: with expire_seconds
    shorter than the wait the message left with an expired signature)."""
    d = make_daemon(acceptors=1, shards=1, dkim={"expire_seconds": 600, "keys": [
        {"domain": "signer.test", "selector": "ed1", "key_file": dkim_keys.files["ed"],
         "algorithm": "ed25519-sha256"}]})
    start = int(time.time()) + 7200
    st, _, body = d.post({"recipients": ["later@dest.example"],
                          "content": {"from": "news@signer.test", "subject": "later",
                                      "text": "scheduled"},
                          "options": {"start_time": datetime.datetime.fromtimestamp(
                              start, datetime.timezone.utc).isoformat()}})
    assert st == 200, body
    [q] = d.queue_list()
    raw = d.cli("queue", "show", "--raw", q["queue_id"]).stdout
    records = {"ed1._domainkey.signer.test": public_record(dkim_keys.ed)}
    got = mailauth_verify({"m": raw}, records, str(tmp_path), now_ms=(start + 60) * 1000)
    assert [r["result"] for r in got["m"]] == ["pass"], got["m"]
    x = int(re.search(rb"\bx=(\d+);", raw).group(1))
    assert x >= start + 600


def dsn_of(d, domain: str, seen: set) -> bytes:
    """A message to *domain* bounced by the operator with a DSN: that DSN's bytes as
    queued (its queue id added to *seen*, which holds the DSNs taken before)."""
    d.send("alice@src.test", [f"r@{domain}"],
           b"From: alice@src.test\r\nSubject: s\r\n\r\nbody\r\n")
    d.cli("queue", "bounce", "--domain", domain, "--reason", "gone", "--dsn")
    [q] = wait_until(lambda: [q for q in d.queue_list() if q["sender"] == ""
                              and q["queue_id"] not in seen], 15, "the DSN")
    seen.add(q["queue_id"])
    return d.cli("queue", "show", "--raw", q["queue_id"]).stdout


def test_dsns_are_signed_and_a_reload_changes_their_key(make_daemon, dkim_keys, tmp_path):
    """A DSN is a message the spool writes itself (From MAILER-DAEMON@server.hostname):
    it went unsigned whatever [dkim] said -- a key for that domain, a fallback with mode
    "always" -- while everything the acceptors take in is signed.  It is signed by the
    same rules; a reload that changes [dkim] changes the key of the next one."""
    key = {"domain": "mta.test", "selector": "old", "key_file": dkim_keys.files["ed"],
           "algorithm": "ed25519-sha256"}
    d = make_daemon(acceptors=1, shards=1, dkim={"keys": [key]})
    records = {"old._domainkey.mta.test": public_record(dkim_keys.ed),
               "new._domainkey.mta.test": public_record(dkim_keys.rsa)}

    seen = set()
    first = dsn_of(d, "one.test", seen)
    assert b"From: Mail Delivery System <MAILER-DAEMON@mta.test>" in first
    d.reload(dkim={"keys": [{**key, "selector": "new", "key_file": dkim_keys.files["rsa"],
                             "algorithm": "rsa-sha256"}]})
    second = dsn_of(d, "two.test", seen)
    assert dkimpy_verify(first, records) == [True] and dkimpy_verify(second, records) == [True]
    got = mailauth_verify({"first": first, "second": second}, records, str(tmp_path))
    assert [(r["result"], r.get("selector")) for r in got["first"]] == [("pass", "old")], got
    assert [(r["result"], r.get("selector")) for r in got["second"]] == [("pass", "new")], got


def test_a_key_file_replaced_in_place_signs_the_next_dsn_after_a_reload(
        make_daemon, dkim_keys, tmp_path):
    """A key file replaced by a new key (same path, same selector: a key rolled in
    place): the reload read and checked it and the new acceptors signed with it, but
    the spool shards re-made their signer only when [dkim]'s text changed, so their
    DSNs went on signed with the old key, which the selector's DNS record no longer
    verifies.  The record of the active configuration now carries a digest of the key
    files, and a shard whose keys differ from it reads them again."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = dkim_keys.files["ed"]
    key = {"domain": "mta.test", "selector": "s1", "key_file": path,
           "algorithm": "ed25519-sha256"}
    d = make_daemon(acceptors=1, shards=1, dkim={"keys": [key]})
    seen = set()

    first = dsn_of(d, "one.test", seen)
    assert dkimpy_verify(first, {"s1._domainkey.mta.test": public_record(dkim_keys.ed)}) \
        == [True]
    rolled = ed25519.Ed25519PrivateKey.generate()
    with open(path + ".tmp", "wb") as f:
        f.write(rolled.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    import os
    os.replace(path + ".tmp", path)
    text = d.reload()
    second = dsn_of(d, "two.test", seen)
    assert dkimpy_verify(second, {"s1._domainkey.mta.test": public_record(rolled)}) \
        == [True]
    assert "a [dkim] key file was replaced in place" in text
    assert "DKIM:" not in text      # (no key the shard could not take)


def test_a_signature_lifetime_shorter_than_the_queue_s_is_named_at_start_and_reload(
        make_daemon, dkim_keys):
    # Mail is signed once, at injection: with dkim.expire_seconds (x=) shorter than
    # delivery.max_age, a message deferred past it leaves with an expired signature, and
    # nothing said so.  Kept (the operator's choice), but the log names the keys at the
    # start and at each reload; a lifetime as long as the queue's is not named.
    keys = [{"domain": "signer.test", "selector": "rsa1", "key_file": dkim_keys.files["rsa"]},
            {"domain": "other.test", "selector": "ed1", "key_file": dkim_keys.files["ed"],
             "algorithm": "ed25519-sha256", "expire_seconds": 10 * 86400}]
    d = make_daemon(acceptors=1, shards=1, dkim={"keys": keys, "expire_seconds": 3600})
    said = ("DKIM signatures of signer.test (rsa1) expire (x=) sooner than "
            "delivery.max_age (432000s): mail still queued after that leaves with an "
            "expired signature")
    d.wait_log(re.escape(said))
    assert "other.test (ed1)" not in d.log()
    d.reload(dkim={"keys": keys, "expire_seconds": 3600})
    wait_until(lambda: d.log().count(said) == 2, 20, "the line again at the reload")
    d.reload(dkim={"keys": keys, "expire_seconds": 6 * 86400})
    time.sleep(0.5)
    assert d.log().count(said) == 2


def test_an_acceptor_restarted_after_its_key_file_is_gone_signs_with_the_validated_key(
        make_daemon, dkim_keys):
    """The supervisor validated the key at the start; the file is then deleted without a
    reload, and the acceptor dies (kill -9).  The one the supervisor starts in its place
    read the file at its start: it died there, again and again, and the node took no mail.
    It now parses the key from the bytes the supervisor validated, and signs with it."""
    import os
    import signal

    d = make_daemon(acceptors=1, dkim={"keys": [
        {"domain": "signer.test", "selector": "rsa1", "key_file": dkim_keys.files["rsa"]}]})
    with open(dkim_keys.files["rsa"], "rb") as f:
        pem = f.read()
    os.unlink(dkim_keys.files["rsa"])
    old = d.children()["acceptor[0]"]
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: d.children().get("acceptor[0]") not in (None, old), 30,
               "a new acceptor[0]")
    msg = (b"From: News <news@signer.test>\r\nTo: reader@example.net\r\n"
           b"Subject: signed\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <s9@signer.test>\r\n\r\nBody line\r\n")
    qid = d.send("bounces@signer.test", ["reader@example.net"], msg)
    # (the message is signed and queued; `mta` itself checks the configuration's key
    # files, so it is given the file back to read the queue)
    with open(dkim_keys.files["rsa"], "wb") as f:
        f.write(pem)
    raw = d.cli("queue", "show", "--raw", qid).stdout
    record = public_record(dkim_keys.rsa).encode()
    assert raw.count(b"DKIM-Signature:") == 1
    assert dkimpy.DKIM(raw).verify(dnsfunc=lambda name, timeout=5: record)
    assert "DkimConfigError" not in d.log()
