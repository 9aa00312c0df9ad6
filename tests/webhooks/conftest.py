"""The network rule for the in-process webhook tests: a webhook session made without
nameservers (``W.new_session()``) would ask /etc/resolv.conf's servers -- the machine's
resolver -- for a target name.  Here it has none to ask: such a lookup fails as a
connection failure ("no DNS server to ask"), never leaves loopback.  A test that looks a
name up gives its session a DNS server on loopback (test_target_dns.py)."""
import dns.resolver
import pytest


@pytest.fixture(autouse=True)
def no_system_resolver(monkeypatch):
    def refused(self, f):
        raise dns.resolver.NoResolverConfiguration(
            "tests: the machine's resolver configuration is not read")
    # (BaseResolver: the asyncio resolver mta.dns uses is not a dns.resolver.Resolver)
    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", refused)
