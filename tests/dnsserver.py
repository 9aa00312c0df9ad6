"""A real DNS server for tests: Debian's unbound, serving test zones on loopback only.

``DnsServer(tmpdir, records)`` writes an unbound configuration and zone files in
``tmpdir``; ``start()`` runs ``unbound -d`` (not daemonized: our own child,
stopped by its PID in ``stop()``) on ``address:port`` (a free port; the address
is a loopback address, 127.0.0.153 by default -- not 127.0.0.53, where
systemd-resolved may listen, so a query that forgot the port can never reach
the machine's resolver) and returns once the server answers.

unbound runs as a recursive resolver (module "iterator") whose only sources
are local, so it behaves as the resolver an MTA really talks to: it chases
CNAMEs across zones, puts the SOA in negative answers, caches.

- ``records``: resource records in zone-file syntax with absolute names
  (``"example.test. 300 IN MX 10 mx1.example.test."``).  Each owner name belongs
  to the zone named by its last two labels (``mx1.example.test.`` ->
  ``example.test.``) unless ``zones=`` names the zones.  Each zone is an unbound
  ``auth-zone`` (``for-upstream``, no fallback) loaded from a zone file, with an
  SOA (minimum ``soa_minimum`` seconds) added unless the records bring one: a
  missing name is NXDOMAIN and a missing type is NODATA, both with the SOA.
- ``nxdomain_zones``: zones with only an SOA (every other name in them is NXDOMAIN).
- ``servfail_zones``: zones delegated (``stub-zone``) to a loopback address that
  unbound may not query (``do-not-query-localhost: yes``): the iterator has no
  server to ask and answers SERVFAIL at once.
- Every other name is REFUSED (``local-zone: "." refuse``).  unbound never
  sends a query anywhere: the only delegations it knows, the root's included,
  name that forbidden loopback address, and its outgoing interface is loopback.

``add(records)`` and ``remove(name)`` change the zones of the running server
(zone files rewritten, then ``unbound-control auth_zone_reload`` and
``flush_zone`` over a Unix socket in ``tmpdir``; a new zone restarts unbound on
the same port); ``query_count()`` reads unbound's counter of
queries received from clients.

In pytest: the ``dns_server`` factory fixture below, or ``with DnsServer(...) as s:``.
"""
from __future__ import annotations

import os
import subprocess
import time

import daemon
import dns.message
import pytest
import dns.rcode
import dns.query
import dns.rdatatype

UNBOUND = "/usr/sbin/unbound"
UNBOUND_CONTROL = "/usr/sbin/unbound-control"
UNBOUND_CHECKCONF = "/usr/sbin/unbound-checkconf"
DEFAULT_ADDRESS = "127.0.0.153"
START_TIMEOUT = 10.0  # seconds for unbound to start answering
STOP_TIMEOUT = 5.0  # seconds for unbound to exit after SIGTERM
PROBE_TIMEOUT = 0.2  # seconds per readiness probe
CONTROL_TIMEOUT = 10.0  # seconds per unbound-control command


def free_port(address: str) -> int:
    """A port that is free for both UDP and TCP on ``address`` right now (daemon.free_port:
    from this pytest-xdist worker's own range)."""
    return daemon.free_port(address, udp=True)


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def zone_of(owner: str) -> str:
    """Default zone of an owner name: its last two labels (``a.b.example.test.`` -> ``example.test.``)."""
    labels = _absolute(owner).rstrip(".").split(".")
    return ".".join(labels[-2:]).lower() + "."


def _owner(record: str) -> str:
    return _absolute(record.split(None, 1)[0]).lower()


def _is_soa(record: str) -> bool:
    return " SOA " in f" {record.upper()} "


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class DnsServer:
    """unbound on a loopback address, serving ``records`` (see the module doc)."""

    def __init__(self, tmpdir, records: list[str] = (), address: str = DEFAULT_ADDRESS, *,
                 zones: list[str] | None = None, nxdomain_zones: list[str] = (),
                 servfail_zones: list[str] = (), soa_minimum: int = 60):
        if not address.startswith("127."):
            raise ValueError("the test DNS server listens on loopback only")
        self.dir = str(tmpdir)
        os.makedirs(self.dir, exist_ok=True)
        self.address = address
        self.port: int | None = None
        self.records: list[str] = []
        self.zones: list[str] = [_absolute(z).lower() for z in zones or ()]
        self._fixed_zones = zones is not None
        self.servfail_zones = [_absolute(z).lower() for z in servfail_zones]
        self.soa_minimum = soa_minimum
        self.conf = os.path.join(self.dir, "unbound.conf")
        self.log = os.path.join(self.dir, "unbound.log")
        self.control = os.path.join(self.dir, "control.sock")
        self.proc: subprocess.Popen | None = None
        for z in nxdomain_zones:
            self._zone_for(_absolute(z).lower(), create=True)
        self._take(records)

    # -- zones ---------------------------------------------------------------------

    def _zone_for(self, owner: str, create: bool) -> str:
        """The zone an owner name belongs to (the longest matching zone, else its default)."""
        best = None
        for z in self.zones:
            if (owner == z or owner.endswith("." + z)) and (best is None or len(z) > len(best)):
                best = z
        if best is None:
            if self._fixed_zones:
                raise ValueError(f"{owner} is in none of the zones {self.zones}")
            best = zone_of(owner)
            if create:
                self.zones.append(best)
        return best

    def _take(self, records) -> set[str]:
        """Record ``records``; return the zones they touch."""
        touched = set()
        for rec in records:
            touched.add(self._zone_for(_owner(rec), create=True))
            self.records.append(rec.strip())
        return touched

    def _zone_file(self, zone: str) -> str:
        return os.path.join(self.dir, zone.rstrip(".") + ".zone")

    def _write_zone(self, zone: str) -> None:
        mine = [r for r in self.records if self._zone_for(_owner(r), create=False) == zone]
        lines = [f"$ORIGIN {zone}", "$TTL 300"]
        if not any(_is_soa(r) and _owner(r) == zone for r in mine):
            lines.append(f"{zone} 3600 IN SOA ns.{zone} hostmaster.{zone} "
                         f"1 3600 600 86400 {self.soa_minimum}")
        lines += mine
        tmp = self._zone_file(zone) + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self._zone_file(zone))

    def _write_config(self) -> None:
        lines = [
            "server:",
            f"    interface: {self.address}",
            f"    port: {self.port}",
            f"    outgoing-interface: {self.address}",
            "    do-daemonize: no",
            '    username: ""',
            '    chroot: ""',
            f"    directory: {_quote(self.dir)}",
            '    pidfile: ""',
            "    use-syslog: no",
            f"    logfile: {_quote(self.log)}",
            "    verbosity: 1",
            "    num-threads: 1",
            "    do-ip4: yes",
            "    do-ip6: no",
            "    do-udp: yes",
            "    do-tcp: yes",
            '    module-config: "iterator"',
            # the stub address below is loopback: unbound must never use it
            "    do-not-query-localhost: yes",
            "    access-control: 127.0.0.0/8 allow",
            "    statistics-cumulative: yes",
            '    root-hints: ""',
            # nothing outside the test zones is looked up anywhere
            '    local-zone: "." refuse',
        ]
        for z in self.zones + self.servfail_zones:
            # let these names past the refusal, to the auth zones and stubs
            lines.append(f"    local-zone: {_quote(z)} transparent")
        for z in self.zones:
            self._write_zone(z)
            lines += ["auth-zone:", f"    name: {_quote(z)}",
                      f"    zonefile: {_quote(self._zone_file(z))}",
                      "    for-downstream: no", "    for-upstream: yes",
                      "    fallback-enabled: no"]
        for z in ["."] + self.servfail_zones:
            lines += ["stub-zone:", f"    name: {_quote(z)}",
                      f"    stub-addr: {self.address}@{self.port}"]
        lines += [
            "remote-control:",
            "    control-enable: yes",
            f"    control-interface: {_quote(self.control)}",
            "    control-use-cert: no",
            "",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines))

    # -- process -------------------------------------------------------------------

    def start(self) -> "DnsServer":
        """Start unbound and return once it answers on ``address:port``."""
        if self.proc is not None:
            raise RuntimeError("already started")
        if self.port is None:
            self.port = free_port(self.address)
        self._write_config()
        check = subprocess.run([UNBOUND_CHECKCONF, self.conf], capture_output=True,
                               text=True, timeout=CONTROL_TIMEOUT)
        if check.returncode != 0:
            raise RuntimeError(f"bad unbound config: {check.stdout}{check.stderr}")
        with open(os.path.join(self.dir, "unbound.stderr"), "wb") as err:
            self.proc = subprocess.Popen([UNBOUND, "-d", "-c", self.conf],
                                         stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not (os.path.exists(self.control) and self._answers()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"unbound did not start:\n{self.read_log()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the unbound this object started (by its PID); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        try:
            os.unlink(self.control)
        except FileNotFoundError:
            pass

    def restart(self) -> "DnsServer":
        """Stop and start again on the same port with the current records."""
        self.stop()
        return self.start()

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def nameserver(self) -> tuple[str, int]:
        """(address, port) to give a resolver."""
        return self.address, self.port

    def read_log(self) -> str:
        out = []
        for path in (os.path.join(self.dir, "unbound.stderr"), self.log):
            try:
                with open(path, errors="replace") as f:
                    out.append(f.read())
            except FileNotFoundError:
                pass
        return "\n".join(out)

    def _answers(self) -> bool:
        probe = self.zones[0] if self.zones else "."
        q = dns.message.make_query(probe, dns.rdatatype.SOA)
        try:
            r = dns.query.udp(q, self.address, port=self.port, timeout=PROBE_TIMEOUT)
        except Exception:
            return False
        # REFUSED until the auth zones are loaded
        return r.rcode() == dns.rcode.NOERROR or not self.zones

    # -- live changes (unbound-control) ----------------------------------------------

    def _control(self, *args: str) -> str:
        r = subprocess.run([UNBOUND_CONTROL, "-c", self.conf, *args], capture_output=True,
                           text=True, timeout=CONTROL_TIMEOUT)
        if r.returncode != 0 or r.stdout.startswith("error"):
            raise RuntimeError(f"unbound-control {' '.join(args)}: {r.stdout}{r.stderr}")
        return r.stdout

    def _reload(self, zones) -> None:
        for z in sorted(zones):
            self._write_zone(z)
            self._control("auth_zone_reload", z)
            self._control("flush_zone", z)
        self._control("flush_requestlist")

    def flush(self, zone: str) -> None:
        """Drop what unbound has cached of *zone* (its answers are fetched anew)."""
        self._control("flush_zone", _absolute(zone).lower())

    def add(self, records: list[str]) -> None:
        """Add records to the running server (a new zone restarts it on the same port)."""
        known = set(self.zones)
        touched = self._take(records)
        if touched - known:
            self.restart()
        else:
            self._reload(touched)

    def remove(self, name: str) -> None:
        """Remove every record of owner ``name`` from the running server."""
        name = _absolute(name).lower()
        zone = self._zone_for(name, create=False)
        self.records = [r for r in self.records if _owner(r) != name]
        self._reload({zone})

    def query_count(self) -> int:
        """Queries unbound has received from clients since it started (``total.num.queries``)."""
        out = self._control("stats_noreset")
        for line in out.splitlines():
            key, _, value = line.partition("=")
            if key == "total.num.queries":
                return int(value)
        raise RuntimeError(f"no total.num.queries in unbound stats:\n{out}")


@pytest.fixture
def dns_server(tmp_path):
    """Factory fixture: ``dns_server(records, **kw)`` -> a started DnsServer, stopped at teardown.

    Use it from a test module with ``from dnsserver import dns_server  # noqa: F401``.
    """
    started: list[DnsServer] = []

    def start(records=(), **kw) -> DnsServer:
        server = DnsServer(tmp_path / f"dns{len(started)}", records, **kw)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
