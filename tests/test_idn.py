"""mta.idn: the one check of internationalised domains, and what it costs per address."""
from __future__ import annotations

from mta import idn
from mta.api import build


def test_a_domain_is_encoded_once_however_many_addresses_name_it(monkeypatch):
    # An HTTP transmission checks each recipient (check_email), writes its To field
    # (mailbox) and our Received field (ascii_address): each was an IDNA encoding of
    # the same domain, ~14 us -- 10,000 recipients at one U-label domain held the
    # acceptor's event loop for 0.4 s, where the same list at an ASCII domain costs
    # nothing of the kind.  A domain is encoded once; the answers stay the same.
    calls = []
    real = idn.idna.encode

    def encode(*args, **kw):
        calls.append(args[0])
        return real(*args, **kw)

    monkeypatch.setattr(idn.idna, "encode", encode)
    for i in range(100):
        addr = f"r{i}@bücher-once.example"
        assert build.check_email(addr) is None
        assert build.mailbox(None, addr) == [f"r{i}@xn--bcher-once-9db.example"]
        assert idn.ascii_address(addr) == f"r{i}@xn--bcher-once-9db.example"
        assert build.check_email(f"r{i}@xn--bcher-once-9db.example") is None
        assert build.check_email(f"r{i}@once.xn--zz.example") is not None
    assert len(calls) <= 6, calls
    # (the answers for a name not seen before are computed as they were)
    assert idn.normalize_domain("BÜCHER.example.") == "xn--bcher-kva.example"
    assert idn.normalize_domain("☃.example") is None
    assert idn.ascii_address("jörg@bücher.example") is None
