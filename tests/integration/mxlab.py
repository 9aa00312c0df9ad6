"""A delivery lab for one test: a real DNS server (unbound, tests/dnsserver.py) serving MX
records that point at 127.0.0.10-15, receiving servers on those addresses (tests/sinks.py),
all on one port, and the daemon delivering to them (``delivery.hold = false``,
``delivery.nameservers`` = that DNS server, ``delivery.mx_port`` = that port).

The fixture ``lab`` (tests/integration/conftest.py) makes one; everything it started is
stopped at the end.  Nothing resolves or connects anywhere but loopback.
"""
from __future__ import annotations

from sinks import AioSink, SmtpSink, common_port

IPS = [f"127.0.0.{n}" for n in range(10, 16)]


def mx(domain, host, ip, pref=10) -> list[str]:
    """Zone lines: *domain* has MX *host* (preference *pref*), which has address *ip*."""
    return [f"{domain}. 300 IN MX {pref} {host}.", f"{host}. 300 IN A {ip}"]


class Lab:
    """One test's DNS server, receivers and daemon; everything stopped at the end."""

    def __init__(self, make_daemon, dns_server, tmp_path):
        self._make_daemon = make_daemon
        self._dns_server = dns_server
        self.tmp = tmp_path
        self.port = common_port(IPS)
        self.sinks: list = []
        self.dns = None

    def aio(self, ip, **kw) -> AioSink:
        s = AioSink(ip, self.port, **kw)
        self.sinks.append(s)
        return s.start()

    def smtp_sink(self, ip, args=()) -> SmtpSink:
        s = SmtpSink(ip, self.port, args)
        self.sinks.append(s)
        return s.start()

    def serve(self, records, **kw):
        self.dns = self._dns_server(records, **kw)
        return self.dns

    def daemon(self, acceptors=1, shards=2, processes=1, sections=None, start=True,
               **delivery):
        """The daemon, delivering through the lab: **delivery adds to (or overrides) its
        [delivery] settings; *sections* are other config sections ({"dkim": {...}});
        start=False: made, not started."""
        cfg = {"hold": False, "processes": processes,
               "nameservers": [f"{self.dns.address}:{self.dns.port}"],
               "mx_port": self.port, "connect_timeout": 5.0, "command_timeout": 10.0,
               "data_timeout": 10.0}
        cfg.update(delivery)
        return self._make_daemon(acceptors=acceptors, shards=shards, delivery=cfg,
                                 start=start, **(sections or {}))

    def close(self):
        for s in self.sinks:
            s.stop()
