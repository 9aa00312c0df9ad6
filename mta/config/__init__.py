"""Configuration: load a TOML file into the schema, check it, and describe it.

``load(path)`` returns a :class:`Settings` — the validated :class:`Config` plus
values derived once (absolute paths, process counts sized to the machine,
parsed listen addresses and networks).  Every problem raises
:class:`ConfigError` whose message starts with the offending key, e.g.
``smtp.max_recipients: Expected `int` >= 100``.  Roles receive a Settings and
read only their own section.
"""
from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace

import msgspec
import msgspec.inspect as mi

from mta.passwords import parse_password_file

from .schema import SECTIONS, TOP_LEVEL_TABLES, Config

__all__ = ["Config", "ConfigError", "Settings", "load", "example_toml", "hostport",
           "parse_hostport"]


class ConfigError(Exception):
    """A configuration problem; str() names the key (or the file) first."""


@dataclass(frozen=True)
class Settings:
    """A validated configuration plus the values derived from it once."""

    config: Config
    path: str | None
    state_dir: str
    spool_dir: str
    run_dir: str
    hostname: str
    acceptors: int
    shards: int
    listen: tuple[tuple[str, int], ...]
    relay_networks: tuple = field(default_factory=tuple)
    proxy_networks: tuple = field(default_factory=tuple)   # server.proxy_protocol_from
    auth_users: dict = field(default_factory=dict)
    deliveries: int = 1
    event_log: str | None = None
    events_enabled: bool = False      # the spool writes events and an events process reads them
    nameservers: tuple = ()
    helo_name: str = ""
    http_listen: tuple[tuple[str, int], ...] = ()
    admin_listen: tuple[tuple[str, int], ...] = ()   # () when admin.enabled is false
    agent_listen: tuple[tuple[str, int], ...] = ()   # admin.agent_listen, served by admin[0]
    # [egress], resolved: every source by name (the built-in "default" one
    # included), and every pool by name as ((source name, weight), ...).
    sources: dict = field(default_factory=dict)
    pools: dict = field(default_factory=dict)
    # what the operator should know of the file though it is valid (a key renamed since:
    # RENAMED); said by check-config and logged by the supervisor at start and at reload
    notes: tuple[str, ...] = ()
    # SHA-256 of the feedback.bounce_rules file as read ("" without one): a reload tells
    # a file edited in place by it (the spool shards read it again)
    bounce_rules_digest: str = ""
    # the bytes of that file as validated (None: none, or not read): the supervisor keeps
    # a copy in run_dir that its children read (feedback.keep_copy, validated_file)
    bounce_rules_data: bytes | None = field(default=None, repr=False, compare=False)
    # the [dkim] key files' bytes as validated, by path ({}: not read here): a child
    # forked with these Settings parses its keys from them, not from the files, so a key
    # file deleted or broken without a reload does not stop an acceptor restarted after
    # a crash (it would fail at its start, again and again)
    dkim_key_files: dict = field(default_factory=dict, repr=False, compare=False)
    # SHA-256 of those bytes (mta.dkim.files_digest; "" without key files read): a
    # reload tells a key file replaced in place by it (the spool shards, which sign
    # their notices, read the files again)
    dkim_keys_digest: str = ""
    # the smtp.tls_certificate and tls_key files' bytes as validated, (chain, key) (None:
    # no TLS, or not read here): an acceptor forked with these Settings loads them
    # (load_tls), not the files, for the same reason
    tls_files: tuple[bytes, bytes] | None = field(default=None, repr=False, compare=False)
    # the delivery.tls_ca_file's bytes as validated (None: none, or not read here): a
    # delivery process loads them (load_ca), not the file, for the same reason
    tls_ca_data: bytes | None = field(default=None, repr=False, compare=False)
    # the supervisor's record of the active configuration (read_active): the reload
    # that wrote it (its CLOCK_MONOTONIC read_at; 0 at a start), which each spool shard
    # names when it says it took the record (write_applied)
    serial: float = 0.0

    def pool_for(self, requested: str | None, sender: str) -> str | None:
        """The pool of a message: *requested* (options.ip_pool), else the sending
        domain's (egress.domain_pool), else egress.default_pool.  None when the
        requested pool does not exist (the injection is refused)."""
        if requested:
            return requested if requested in self.pools else None
        eg = self.config.egress
        if eg.domain_pool and "@" in sender:
            pool = eg.domain_pool.get(sender.rpartition("@")[2].lower())
            if pool:
                return pool
        return eg.default_pool

    def endpoint(self, name: str) -> str:
        """The ZeroMQ ipc endpoint for a named socket in the run directory."""
        return "ipc://" + os.path.join(self.run_dir, name)

    def spool_endpoint(self, shard: int) -> str:
        """Spool shard *shard*'s requests: the commands, the admin process, the events."""
        return self.endpoint(SPOOL_SOCKET.format(shard))

    def delivery_endpoint(self, index: int) -> str:
        """Delivery process *index*'s jobs from the spool shards."""
        return self.endpoint(DELIVERY_SOCKET.format(index))

    def stats_endpoint(self) -> str:
        """The admin process's statistics from every child."""
        return self.endpoint(STATS_SOCKET)

    def stream_path(self, shard: int) -> str:
        """The path of spool shard *shard*'s stream socket for the acceptors' commits."""
        return os.path.join(self.run_dir, STREAM_NAME.format(shard))

    def socket_paths(self) -> list[str]:
        """The paths of every bus socket in the run directory (_check_socket_paths)."""
        names = [STATS_SOCKET]
        names += [DELIVERY_SOCKET.format(d) for d in range(self.deliveries)]
        for n in range(self.shards):
            names += [SPOOL_SOCKET.format(n), STREAM_NAME.format(n)]
        return [os.path.join(os.path.abspath(self.run_dir), name) for name in names]


def hostport(host: str, port: int) -> str:
    """*host* and *port* as ``host:port`` is written (parse_hostport's inverse): an IPv6
    host in brackets, for "::1:25" would be an address of its own."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str, brackets: bool = False) -> tuple[str, int]:
    """Split 'host:port' or '[v6]:port' into (host, port).  A bare IPv6 host
    ('::1:2525': the last ':' starts the port) is taken as such unless *brackets*,
    where it is a ValueError (what parses it later needs them)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if brackets and ":" in host:
            raise ValueError(f"expected host:port with an IPv6 host in brackets "
                             f"([2001:db8::1]:25), got {text!r}")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


# Keys renamed since (section, old name) -> new name.  A file written before the rename is
# read with the new name (checked as it is), and a note says so: refusing it would stop at
# the upgrade a node whose file still has the old one.
RENAMED = {
    # 556bb7e (2026-12-02): limits per egress source x receiving site across the node,
    # no longer per recipient domain in each delivery process
    ("delivery", "connections_per_domain"): (
        "connection_limit", "now counted per egress source and receiving site across the "
        "node, not per recipient domain in each delivery process"),
    ("delivery", "messages_per_connection"): ("max_deliveries_per_connection", ""),
}


def _renamed(raw: dict) -> tuple[str, ...]:
    """Move the keys of *raw* named as before a rename (RENAMED) to their new names; a
    note for each.  With the new name there too, it is kept and the old one dropped."""
    notes = []
    for (section, old), (new, how) in RENAMED.items():
        table = raw.get(section)
        if not isinstance(table, dict) or old not in table:
            continue
        value = table.pop(old)
        said = f"{section}.{old} is now {section}.{new}"
        if new in table:
            notes.append(f"{said}, which is set too: {old} = {value!r} is ignored")
        else:
            table[new] = value
            notes.append(f"{said} (read as {new} = {value!r}{'; ' + how if how else ''}); "
                         "rename it in the file")
    return tuple(notes)


def _decode(raw: dict) -> Config:
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        # msgspec says "... - at `$.smtp.max_recipients`"; put the key first.
        text, sep, where = msg.rpartition(" - at `$.")
        if sep:
            key = where.rstrip("`")
            raise ConfigError(f"{key}: {text}") from None
        # Unknown keys: "Object contains unknown field `x` - at `$.smtp`"
        raise ConfigError(msg) from None


def _read_auth_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_password_file(fh.read())
    except OSError as exc:
        raise ConfigError(f"smtp.auth_file: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"smtp.auth_file: {path}: {exc}") from None


MAX_PROBLEMS = 10       # DKIM key problems named in one error (then a count)
# SparkPost's API key grants that http.key_grants may list (webhooks:modify includes view).
API_GRANTS = ("transmissions:modify", "message_events:view", "suppression_lists:manage",
              "webhooks:view", "webhooks:modify")
# The bus's sockets in run_dir (Settings.socket_paths lists them all): spool shard n's
# requests, delivery process d's jobs, the admin process's statistics (ZeroMQ ipc), and
# spool shard n's stream socket, the acceptors' commits (shorter than admin-stats: a run
# directory that one fits in fits it too).
SPOOL_SOCKET = "spool-{}"
DELIVERY_SOCKET = "delivery-{}"
STATS_SOCKET = "admin-stats"
STREAM_NAME = "commit-{}"
ACTIVE_NAME = "active-config.json"   # in run_dir: what the running supervisor applied
# in run_dir: {"role[index]": n} of the running supervisor's children that died unasked
# and were started again (written by it, read by the admin process)
RESTARTS_NAME = "restarts.json"
RELOAD_RECORD = "reload.json"        # in run_dir: the last reload's outcome (mta reload)
# in run_dir: what spool shard n took of the active configuration (write_applied)
SPOOL_APPLIED = "spool-{}.applied.json"
SUPERVISOR_LOCK = "mta.lock"         # in run_dir: flocked by the running supervisor
# [delivery] keys the spool shards read at their start only (a reload of the others,
# hold, retry_schedule, retry_jitter, delay_warning_time and the timeouts, reaches them
# too: the supervisor SIGHUPs them): deadlines filed and the dispatch window's size
SPOOL_START_KEYS = ("max_age", "time_scale", "max_in_flight", "max_in_flight_per_domain",
                    "spread_threshold")
# What else the spool shards read only at start (they are not replaced at a reload):
# nothing now ([suppression] enabled, path, max_size, bounce_rule and [feedback]
# bounce_rules, bounce_domains they take at a reload, before the new acceptors start;
# events.max_backlog_bytes too, a lower one not below the backlog then held)
SPOOL_READ_AT_START: tuple[tuple[str, str], ...] = ()


# [spool] keys a reload applies: read only by the acceptors (replaced) and the admin
# process (from the active configuration's record), never by the spool shards
RELOADED_SPOOL_KEYS = (("spool", "min_free_bytes"), ("spool", "min_free_percent"))
# spool.queue_high_water: each process sets it on its own end of the bus when it opens it
# (the acceptors towards the shards, a delivery process towards them, a shard on both):
# a reload's new processes take it, the spool shards (not replaced) keep theirs
PART_RELOADED_SPOOL_KEYS = {
    "queue_high_water": "the spool shards', and the delivery processes' unless this "
                        "reload replaces them; the new acceptors take it now"}


def restart_keys(old: Settings, new: Settings) -> list[str]:
    """The settings of *new* that a reload (SIGHUP) of a daemon running *old* does not
    apply -- they wait for the next restart: [spool] (but spool.min_free_*, which the
    acceptors and the admin process take at once; spool.queue_high_water, named with
    who takes it now: PART_RELOADED_SPOOL_KEYS) and [admin] keys, the shard
    count, delivery.processes, the [delivery] keys the spool shards read at start
    (SPOOL_START_KEYS: the delivery processes take them now) and of the other sections
    (SPOOL_READ_AT_START: none now), turning the events or
    webhooks process on or off, the state directory, the host name the spool
    shards put in their DSNs, and the log level of the admin and webhooks processes
    (the others take it: replaced, or the supervisor and the spool shards, told)."""
    out = []
    for section in ("spool", "admin"):
        a = msgspec.to_builtins(getattr(old.config, section))
        b = msgspec.to_builtins(getattr(new.config, section))
        out += [f"{section}.{k}" + (f" ({PART_RELOADED_SPOOL_KEYS[k]})"
                                    if section == "spool" and k in PART_RELOADED_SPOOL_KEYS
                                    else "")
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
                and (section, k) not in RELOADED_SPOOL_KEYS]
    if old.shards != new.shards and "spool.shards" not in out:
        out.append("spool.shards")
    out += [f"delivery.{k} (the spool shards')" for k in SPOOL_START_KEYS
            if getattr(old.config.delivery, k) != getattr(new.config.delivery, k)]
    out += [f"{sec}.{k} (the spool shards')" for sec, k in SPOOL_READ_AT_START
            if getattr(getattr(old.config, sec), k) != getattr(getattr(new.config, sec), k)]
    if old.deliveries != new.deliveries:
        out.append("delivery.processes")
    if old.events_enabled != new.events_enabled:
        out.append("server.event_log / events.store (the events process on or off)")
    if old.config.webhooks.enabled != new.config.webhooks.enabled:
        out.append("webhooks.enabled")
    if old.state_dir != new.state_dir:
        out.append("server.state_dir")
    elif old.hostname != new.hostname:
        out.append("server.hostname (in the spool shards' DSNs; the other processes take "
                   "it now)")
    if old.config.server.log_level != new.config.server.log_level:
        kept = [role for role, on in (("admin", new.admin_listen),
                                      ("webhooks", new.config.webhooks.enabled)) if on]
        if kept:
            out.append(f"server.log_level (the {' and '.join(kept)} process"
                       f"{'es' if len(kept) > 1 else ''}')")
    return out


def write_active(settings: Settings, config_path: str | None, serial: float = 0.0) -> None:
    """Record in run_dir the configuration the supervisor has applied (for ``mta
    check-config``, which names what a reload would leave for a restart; the spool
    shards take their part of it at a reload).  *serial*: which reload wrote it (the
    shards name it in their answer, write_applied).  The operator's bounce rules file,
    as validated, is kept in run_dir first (feedback.keep_copy: what the children read);
    the previous record's copy is kept too (a reload that fails goes back to it)."""
    from mta import feedback

    if settings.bounce_rules_data is not None or not settings.bounce_rules_digest:
        try:
            with open(os.path.join(settings.run_dir, ACTIVE_NAME), "rb") as fh:
                prev = msgspec.json.decode(fh.read()).get("bounce_rules_digest")
        except (OSError, ValueError, AttributeError):
            prev = None
        feedback.keep_copy(settings.run_dir, settings.bounce_rules_digest,
                           settings.bounce_rules_data,
                           keep=(prev,) if isinstance(prev, str) else ())
    doc = {"config_path": config_path, "config": msgspec.to_builtins(settings.config),
           "shards": settings.shards, "bounce_rules_digest": settings.bounce_rules_digest,
           "dkim_keys_digest": settings.dkim_keys_digest, "serial": serial}
    tmp = os.path.join(settings.run_dir, ACTIVE_NAME + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(msgspec.json.encode(doc))
    os.replace(tmp, os.path.join(settings.run_dir, ACTIVE_NAME))


def read_active(run_dir: str) -> Settings | None:
    """The configuration the running (or last) supervisor applied; None if unknown."""
    try:
        with open(os.path.join(run_dir, ACTIVE_NAME), "rb") as fh:
            doc = msgspec.json.decode(fh.read())
        s = resolve(msgspec.convert(doc["config"], Config), doc.get("config_path"),
                    recorded=True)
    except (OSError, ValueError, KeyError, TypeError, msgspec.ValidationError, ConfigError):
        return None
    if doc.get("shards"):
        s = replace(s, shards=int(doc["shards"]))
    if isinstance(doc.get("bounce_rules_digest"), str):
        # the rules the supervisor applied (the file may have changed since)
        s = replace(s, bounce_rules_digest=doc["bounce_rules_digest"])
    if isinstance(doc.get("dkim_keys_digest"), str):
        # the key files the supervisor checked (a shard reading them compares)
        s = replace(s, dkim_keys_digest=doc["dkim_keys_digest"])
    if isinstance(doc.get("serial"), (int, float)):
        s = replace(s, serial=float(doc["serial"]))
    return s


def write_applied(run_dir: str, shard: int, doc: dict) -> None:
    """Spool shard *shard*'s answer to a reload: *doc* names the record it took
    (``serial``, Settings.serial) and what it runs of it.  The supervisor waits for it
    before it starts the new acceptors (Supervisor._move_shards)."""
    path = os.path.join(run_dir, SPOOL_APPLIED.format(shard))
    with open(path + ".tmp", "wb") as fh:
        fh.write(msgspec.json.encode(doc))
    os.replace(path + ".tmp", path)


def read_applied(run_dir: str, shard: int) -> dict | None:
    """What spool shard *shard* last said it took (write_applied); None if unknown."""
    try:
        with open(os.path.join(run_dir, SPOOL_APPLIED.format(shard)), "rb") as fh:
            doc = msgspec.json.decode(fh.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def load(path: str | None = None, *, cpu_count: int | None = None,
         read_files: bool = True) -> Settings:
    """Read, validate and resolve the configuration (built-in defaults when *path* is None).
    *read_files* False: the files it names (TLS, auth_file, DKIM keys, the CA file, the
    bounce rules) are not read nor checked (:func:`resolve`'s *recorded*): for the
    operator's commands that use only its addresses and paths, which must work while one
    of those files is broken -- the daemon runs on with what it checked."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except UnicodeDecodeError as exc:
            # tomllib decodes the whole file first; TOML is UTF-8 only
            raise ConfigError(f"{path}: not UTF-8 (byte {exc.start}): {exc.reason}") from None
    notes = _renamed(raw)
    try:
        cfg = _decode(raw)
    except ConfigError as exc:
        for (section, was), (new, _) in RENAMED.items():
            if str(exc).startswith(f"{section}.{new}:") and \
                    any(n.startswith(f"{section}.{was} ") for n in notes):
                raise ConfigError(f"{exc} (given as {section}.{was})") from None
        raise
    s = resolve(cfg, path, cpu_count=cpu_count, recorded=not read_files)
    return replace(s, notes=notes + s.notes) if notes else s


def _networks(items: list[str], key: str) -> list:
    """*items* as ip_network objects; ConfigError naming the item that is not one."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{key}[{i}]: {exc}") from None
    return out


def resolve(cfg: Config, path: str | None, *, cpu_count: int | None = None,
            recorded: bool = False) -> Settings:
    """Check cross-field rules and derive paths and counts.  *recorded*: *cfg* is the
    supervisor's record of what it checked and applies (read_active): the files it
    names (TLS, auth_file, DKIM keys, feedback.bounce_rules, delivery.tls_ca_file) are
    not read again -- one
    changed since is its reader's to handle (a spool shard keeps the rules it has),
    not a reason to throw the whole record away -- and auth_users is left empty."""
    ncpu = cpu_count or len(os.sched_getaffinity(0)) or 1
    state_dir = os.path.abspath(cfg.server.state_dir)
    spool_dir = os.path.join(state_dir, cfg.spool.directory)
    if cfg.server.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"server.log_level: expected debug, info, warning or error, got "
            f"{cfg.server.log_level!r}")
    if not cfg.smtp.listen:
        raise ConfigError("smtp.listen: at least one address is needed")
    listen = _addresses("smtp.listen", cfg.smtp.listen, [])
    http_listen = _check_http(cfg.http, listen)
    admin_listen, agent_listen = _check_admin(cfg.admin, listen + list(http_listen))
    nets = _networks(cfg.smtp.relay_networks, "smtp.relay_networks")
    proxies = _networks(cfg.server.proxy_protocol_from, "server.proxy_protocol_from")
    if bool(cfg.smtp.tls_certificate) != bool(cfg.smtp.tls_key):
        raise ConfigError("smtp.tls_key: tls_certificate and tls_key go together")
    tls_files = None
    if cfg.smtp.tls_certificate and not recorded:
        tls_files = _check_tls(cfg.smtp.tls_certificate, cfg.smtp.tls_key)
    users = {}
    if cfg.smtp.auth_file and not recorded:
        if not cfg.smtp.tls_certificate:
            raise ConfigError("smtp.auth_file: AUTH is offered only over TLS; "
                              "set smtp.tls_certificate too")
        users = _read_auth_file(cfg.smtp.auth_file)
    name_notes = _check_names(cfg)
    hostname = cfg.server.hostname or socket.gethostname()
    nameservers = _check_delivery(cfg.delivery)
    ca_data = _check_ca_file(cfg.delivery.tls_ca_file) \
        if cfg.delivery.tls_ca_file and not recorded else None
    key_files: dict = {}
    if cfg.dkim.enabled and (cfg.dkim.keys or cfg.dkim.fallback is not None) and \
            not recorded:
        from mta import dkim

        problems = dkim.validate(cfg.dkim, keep=key_files)
        if problems:
            raise ConfigError("; ".join(problems[:MAX_PROBLEMS]) + (
                f" (and {len(problems) - MAX_PROBLEMS} more problem(s))"
                if len(problems) > MAX_PROBLEMS else ""))
        keys_digest = dkim.files_digest(key_files)
    else:
        keys_digest = ""
    event_log = os.path.join(state_dir, cfg.server.event_log) if cfg.server.event_log else None
    sources, pools = _check_egress(cfg.egress, cfg.delivery)
    _check_shaping(cfg, sources)
    rules_digest, rules_data = _check_feedback(cfg, read=not recorded)
    _check_webhooks(cfg)
    if not cfg.events.store_path.strip():
        # The events process and the store's readers would each pick another directory.
        raise ConfigError("events.store_path: must not be empty (a directory, relative "
                          "to state_dir)")
    settings = Settings(
        config=cfg,
        path=os.path.abspath(path) if path else None,
        state_dir=state_dir,
        spool_dir=spool_dir,
        run_dir=os.path.join(state_dir, "run"),
        hostname=hostname,
        # One acceptor per two CPUs: the acceptors share the CPUs with the spool
        # writers and the delivery processes, and an acceptor per CPU only adds
        # context switches (measured on 2 cores, smtp-source 20 sessions, held
        # deliveries: 1 acceptor 7.8-8.4k msgs/s at 0.14-0.15 ms CPU/msg,
        # 2 acceptors 6.5-7.9k at 0.17-0.20 ms).
        acceptors=cfg.smtp.acceptors or max(1, ncpu // 2),
        # One shard per four CPUs: a shard spends most of its time waiting on
        # fdatasync, and fewer shards mean bigger group commits (measured on
        # 2 cores: 1 shard accepts 5.8k msgs/s, 2 shards 4.0k).
        shards=cfg.spool.shards or max(1, ncpu // 4),
        listen=tuple(listen),
        relay_networks=tuple(nets),
        proxy_networks=tuple(proxies),
        auth_users=users,
        deliveries=cfg.delivery.processes or ncpu,
        event_log=event_log,
        events_enabled=bool(event_log) or bool(getattr(cfg.events, "store", False)),
        nameservers=nameservers,
        helo_name=cfg.delivery.helo_name or hostname,
        http_listen=http_listen,
        admin_listen=admin_listen,
        agent_listen=agent_listen,
        sources=sources,
        pools=pools,
        notes=name_notes,
        bounce_rules_digest=rules_digest,
        bounce_rules_data=rules_data,
        dkim_key_files=key_files,
        dkim_keys_digest=keys_digest,
        tls_files=tls_files,
        tls_ca_data=ca_data,
    )
    _check_socket_paths(settings)
    return settings


# The longest path a Unix socket can have: sockaddr_un's sun_path (108 octets) less its NUL.
MAX_SOCKET_PATH = 107


def _check_socket_paths(settings: Settings) -> None:
    """The bus's sockets live in the run directory: a state_dir so deep that their paths
    do not fit a Unix socket address is refused here, naming it, rather than by the
    first process that binds one (a spool shard or delivery process dying at start)."""
    longest = max(settings.socket_paths(), key=len)
    if len(longest.encode()) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"server.state_dir: {settings.state_dir!r} is too deep for the bus's Unix "
            f"sockets in its run/ directory ({longest!r} is {len(longest.encode())} octets, "
            f"at most {MAX_SOCKET_PATH}); choose a shorter path")


DEFAULT = "default"


# the greeting's text: RFC 5321's textstring (1*(%d09 / %d32-126)) allows HT
_BANNER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _name_problem(name: str, literal_ok: bool) -> str | None:
    """Why *name* cannot be sent as a host name (in the greeting, EHLO, Received), or None.

    The SMTP client refuses anything but an ASCII name (or an address literal) in EHLO,
    so every delivery would fail; CR or LF would end the reply or command early.
    """
    from mta.shaping import _check_hostname

    if literal_ok and name.startswith("[") and name.endswith("]"):
        from mta.literal import address_literal

        if address_literal(name) is None:
            return "is not an address literal ([192.0.2.1] or [IPv6:2001:db8::1])"
        return None
    problem = _check_hostname(name.lower())
    return problem and f"{problem} (a host name such as mail.example.com is needed)"


def _sendable(name: str) -> str:
    """*name* as it is sent: without a final dot (the absolute form, 'mx.example.com.'),
    which every version before d55edbb took and sent as written."""
    return name[:-1] if name.endswith(".") and not name.endswith("..") else name


def _check_names(cfg: Config) -> tuple[str, ...]:
    """Validate the names the daemon sends: server.hostname, the EHLO names, the banner;
    a name written with a final dot is set to the name without it (a note for each)."""
    def put(struct, attr):
        return lambda v: setattr(struct, attr, v)
    names = [("server.hostname", cfg.server.hostname, False, put(cfg.server, "hostname")),
             ("delivery.helo_name", cfg.delivery.helo_name, True,
              put(cfg.delivery, "helo_name"))]
    names += [(f"egress.source[{i}].ehlo_name", src.ehlo_name, True, put(src, "ehlo_name"))
              for i, src in enumerate(cfg.egress.source)]
    notes = []
    for key, name, literal_ok, set_name in names:
        problem = name and _name_problem(name, literal_ok)
        if problem:
            sent = _sendable(name)
            if sent == name or _name_problem(sent, literal_ok):
                raise ConfigError(f"{key}: {name!r} {problem}")
            set_name(sent)
            notes.append(f"{key} {name!r} is sent as {sent!r}")
    if _BANNER_CONTROL.search(cfg.smtp.banner):
        raise ConfigError("smtp.banner: contains a control character (CR, LF ...); "
                          "the greeting is one line (a tab may be in it)")
    return tuple(notes)


def _check_egress(eg, d) -> tuple[dict, dict]:
    """Validate [egress]; return (sources by name, pools by name).

    Without a source or pool called "default", the built-in one stands in:
    the system's choice of address (or delivery.source_address), today's
    behaviour for a configuration that names no pools.
    """
    from .schema import EgressSource

    sources: dict = {}
    for i, src in enumerate(eg.source):
        key = f"egress.source[{i}]"
        if src.name in sources:
            raise ConfigError(f"{key}.name: {src.name!r} is defined twice")
        if src.source_address:
            try:
                ipaddress.ip_address(src.source_address)
            except ValueError:
                raise ConfigError(f"{key}.source_address: not an IP address: "
                                  f"{src.source_address!r}") from None
            if not src.socks5_proxy:    # (with one, the proxy connects: its address)
                _ipv6_off(f"{key}.source_address", src.source_address, d)
        if src.socks5_proxy:
            try:
                # (brackets: the delivery processes' proxy parser needs them, and
                # stopped at their start on a bare IPv6 host)
                parse_hostport(src.socks5_proxy, brackets=True)
            except ValueError as exc:
                raise ConfigError(f"{key}.socks5_proxy: {exc}") from None
        elif src.socks5_username or src.socks5_password:
            raise ConfigError(f"{key}.socks5_username: needs socks5_proxy")
        sources[src.name] = src
    if DEFAULT not in sources:
        sources[DEFAULT] = EgressSource(name=DEFAULT, source_address=d.source_address)
    pools: dict = {}
    for i, pool in enumerate(eg.pool):
        key = f"egress.pool[{i}]"
        if pool.name in pools:
            raise ConfigError(f"{key}.name: {pool.name!r} is defined twice")
        seen = set()
        for j, m in enumerate(pool.sources):
            if m.source not in sources:
                raise ConfigError(f"{key}.sources[{j}].source: no [[egress.source]] is "
                                  f"called {m.source!r}")
            if m.source in seen:
                raise ConfigError(f"{key}.sources[{j}].source: {m.source!r} is listed twice")
            seen.add(m.source)
        pools[pool.name] = tuple((m.source, m.weight) for m in pool.sources)
    if DEFAULT not in pools:
        pools[DEFAULT] = ((DEFAULT, 1),)
    for i, pool in enumerate(eg.pool):
        if pool.overflow_pool and (pool.overflow_pool not in pools
                                   or pool.overflow_pool == pool.name):
            raise ConfigError(f"egress.pool[{i}].overflow_pool: "
                              + (f"no pool is called {pool.overflow_pool!r}"
                                 if pool.overflow_pool != pool.name else "the pool itself"))
    if eg.default_pool not in pools:
        raise ConfigError(f"egress.default_pool: no pool is called {eg.default_pool!r}")
    by_domain: dict = {}
    for dom, pool in eg.domain_pool.items():
        # (pool_for looks the sender's domain up as it is after the "@", in lower case: a
        # key in capitals or with a final dot is taken so, as DNS names compare)
        key = dom.strip().lower().rstrip(".")
        if not key or "@" in key:
            raise ConfigError(f"egress.domain_pool.{dom}: a sending domain (e.g. "
                              "mybrand.example), without '@': as written no sender's "
                              "domain matches it")
        if key in by_domain:
            raise ConfigError(f"egress.domain_pool.{dom}: {key} is listed twice")
        if pool not in pools:
            raise ConfigError(f"egress.domain_pool.{dom}: no pool is called {pool!r}")
        by_domain[key] = pool
    eg.domain_pool = by_domain
    if eg.suspend_time_max < eg.suspend_time:
        raise ConfigError("egress.suspend_time_max: less than egress.suspend_time")
    return sources, pools


def _check_feedback(cfg: Config, read: bool = True) -> tuple[str, bytes | None]:
    """Validate the bounce classification rules (the operator's file and the shipped one;
    not *read*: neither), and that a VERP return path has a bounce domain.  Returns the
    digest of the operator's file ("" for none or not read) and the bytes validated
    (None: the same)."""
    if cfg.feedback.verp and not cfg.feedback.bounce_domains:
        raise ConfigError("feedback.verp: needs feedback.bounce_domains (the return "
                          "path's domain)")
    if not read:
        return "", None
    from mta import feedback

    try:
        return feedback.check_raw(cfg.feedback.bounce_rules)
    except feedback.RuleError as exc:
        raise ConfigError(f"feedback.bounce_rules: {exc}") from None


def _check_webhooks(cfg: Config) -> None:
    """Validate the [[webhook]] tables (as the API validates a webhook) and [webhooks]."""
    from mta.api import replies, webhooks

    if len(cfg.webhooks.retry_schedule) > 100:
        raise ConfigError("webhooks.retry_schedule: at most 100 retries")
    if not all(math.isfinite(x) for x in cfg.webhooks.retry_schedule):
        raise ConfigError("webhooks.retry_schedule: each delay must be a finite number "
                          "(inf would never retry)")
    names = set()
    for i, e in enumerate(cfg.webhook):
        if e.name in names:
            raise ConfigError(f"webhook[{i}].name: {e.name!r} is used by another [[webhook]]")
        names.add(e.name)
        doc = {"name": e.name, "target": e.target, "events": e.events, "active": e.active,
               "auth_type": e.auth_type, "auth_credentials": e.auth_credentials,
               "auth_request_details": e.auth_request_details,
               "custom_headers": e.custom_headers}
        try:
            webhooks.check_doc(doc, where=f"webhook[{i}].")
        except replies.ApiError as exc:
            raise ConfigError(exc.description) from None


def _check_shaping(cfg: Config, sources: dict) -> None:
    """Validate the [[shaping]] rules (and the shipped presets when they apply)."""
    from mta import shaping

    try:
        shaping.check(cfg.shaping, set(sources))
        shaping.check_response_rules(cfg.response_rule)
        if cfg.delivery.shaping_presets:
            shaping.load_presets()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        shaping.parse_rate(cfg.backoff.min_rate)
    except ValueError as exc:
        raise ConfigError(f"backoff.min_rate: {exc}") from None
    seen = set()
    for i, w in enumerate(cfg.warmup):
        key = f"warmup[{i}]"
        if w.source not in sources and w.source != "default":
            raise ConfigError(f"{key}.source: no [[egress.source]] is called {w.source!r}")
        if w.source in seen:
            raise ConfigError(f"{key}.source: {w.source!r} has an earlier [[warmup]] table")
        seen.add(w.source)
        if w.mx:
            # (as a shaping or response rule's: a glob no host name matches would leave
            # the source unwarmed, at full volume from its first day)
            why = shaping._mx_problem(w.mx)
            if why:
                raise ConfigError(f"{key}.mx: {w.mx!r} {why}")
        if not w.schedule:
            raise ConfigError(f"{key}.schedule: at least one stage ({{day = 1, hourly = N}})")
        days = [st.day for st in w.schedule]
        if days != sorted(set(days)) or days[0] != 1:
            raise ConfigError(f"{key}.schedule: days must start at 1 and increase, got {days}")
        if w.overflow not in ("other_sources", "wait"):
            raise ConfigError(f"{key}.overflow: expected other_sources or wait, "
                              f"got {w.overflow!r}")


def _check_http(h, smtp_listen: list) -> tuple:
    """Validate the [http] section; return its listen addresses as (host, port) pairs."""
    out = _addresses("http.listen", h.listen, smtp_listen)
    for what, key in [*((f"api_keys[{i}]", k) for i, k in enumerate(h.api_keys)),
                      *(("key_grants: a key", k) for k in h.key_grants)]:
        if not key or not key.isascii() or not key.isprintable() or " " in key or ":" in key:
            raise ConfigError(f"http.{what}: expected printable ASCII without spaces "
                              "or colons")
    for key, grants in h.key_grants.items():
        if key in h.api_keys:
            raise ConfigError("http.key_grants: a key that is also in http.api_keys (which "
                              "has every grant)")
        for g in grants:
            if g not in API_GRANTS:
                raise ConfigError(f"http.key_grants: unknown grant {g[:60]!r} (known: "
                                  f"{', '.join(API_GRANTS)})")
    return tuple(out)


def _check_admin(a, used: list) -> tuple[tuple, tuple]:
    """Validate [admin]; return its listen and agent_listen addresses (none when it is
    disabled)."""
    for key in ("tokens", "read_tokens"):
        for i, tok in enumerate(getattr(a, key)):
            if not tok or not tok.isascii() or not tok.isprintable() or " " in tok:
                raise ConfigError(f"admin.{key}[{i}]: expected printable ASCII without spaces")
    for i, tok in enumerate(a.read_tokens):
        if tok in a.tokens:
            raise ConfigError(f"admin.read_tokens[{i}]: also in admin.tokens (a token there "
                              "may act; one that may only read belongs in read_tokens alone)")
    if not a.enabled:
        if a.agent_listen:
            raise ConfigError("admin.agent_listen: served by the admin process, which "
                              "admin.enabled = false turns off")
        return (), ()
    if not a.listen:
        raise ConfigError("admin.listen: at least one address is needed (or set "
                          "admin.enabled = false)")
    out = _addresses("admin.listen", a.listen, used)
    for i, (host, _) in enumerate(out):
        if not ipaddress.ip_address(host).is_loopback and not a.tokens and not a.read_tokens:
            raise ConfigError(f"admin.tokens: required when admin.listen[{i}] "
                              f"({a.listen[i]}) is not a loopback address (or "
                              "admin.read_tokens)")
    agent = _addresses("admin.agent_listen", a.agent_listen, used + out)
    return tuple(out), tuple(agent)


def is_ip(text: str) -> bool:
    """Whether *text* is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _addresses(key: str, items: list, used: list) -> list[tuple[str, int]]:
    """The (host, port) of each listen address of setting *key* (``host:port``, the host
    an IP address); ConfigError naming the entry when one is bad, listed twice, or
    among *used* (another listener's)."""
    out: list[tuple[str, int]] = []
    # compared as addresses: [::1]:25 and [0:0::1]:25 are one socket (a reload bound
    # both, SO_REUSEPORT letting it, and split the connections between two acceptors)
    others = {(ipaddress.ip_address(h), p) for h, p in used}
    mine = set()
    for i, item in enumerate(items):
        try:
            host, port = parse_hostport(item)
            addr = ipaddress.ip_address(host)
        except ValueError as exc:
            raise ConfigError(f"{key}[{i}]: {exc}") from None
        if (addr, port) in mine:
            raise ConfigError(f"{key}[{i}]: {item} is listed twice")
        if (addr, port) in others:
            raise ConfigError(f"{key}[{i}]: {item} is already used by another listener")
        mine.add((addr, port))
        out.append((host, port))
    return out


_STARTTLS = ("none", "opportunistic", "required")


def _check_delivery(d) -> tuple:
    """Validate the [delivery] section; return the nameservers as (ip, port) pairs."""
    ns = []
    for i, item in enumerate(d.nameservers):
        try:
            # a bare address (an IPv6 one too: "2001:db8::a:1" is not 2001:db8::a port 1)
            # is on port 53; a port follows an IPv4 address or an IPv6 one in brackets
            host, port = item.strip("[]") if item.startswith("[") and item.endswith("]") \
                else item, 53
            if not is_ip(host):
                host, port = parse_hostport(item)
                ipaddress.ip_address(host)
            elif not item.startswith("[") and is_ip(item.rpartition(":")[0]) and \
                    item.rpartition(":")[2].isdigit():
                # "::1:53": the address ::1:53, or ::1 on port 53 (as read before bare
                # IPv6 addresses were taken)? Silently the one, it was meant as the other.
                raise ConfigError(f"delivery.nameservers[{i}]: {item!r} is an IPv6 address "
                                  f"or one with a port: write [{item.rpartition(':')[0]}]:"
                                  f"{item.rpartition(':')[2]} for that port, or [{item}] "
                                  "for the address (port 53)")
        except ValueError:
            raise ConfigError(f"delivery.nameservers[{i}]: expected an IP address or ip:port, "
                              f"got {item!r}") from None
        ns.append((host, port))
    if d.starttls not in _STARTTLS:
        raise ConfigError(f"delivery.starttls: expected one of {', '.join(_STARTTLS)}")
    # nan <= 0 is False: ask for finite, positive numbers (nan or inf never retries)
    if not d.retry_schedule or not all(math.isfinite(x) and x > 0 for x in d.retry_schedule):
        raise ConfigError("delivery.retry_schedule: needs at least one number, each finite "
                          "and positive")
    if d.source_address:
        try:
            ipaddress.ip_address(d.source_address)
        except ValueError:
            raise ConfigError("delivery.source_address: not an IP address") from None
        _ipv6_off("delivery.source_address", d.source_address, d)
    if d.route:     # (mta.dns loads dnspython: only for a config that has routes)
        from mta.dns import normalize_domain
    seen: dict[str, int] = {}
    for i, r in enumerate(d.route):
        key = f"delivery.route[{i}]"
        dom = r.domain.lower().rstrip(".")
        if not dom or (dom != "*" and " " in dom):
            raise ConfigError(f"{key}.domain: expected a domain name or \"*\"")
        # as delivery keys the routes: by the A-label form (bücher.de = xn--bcher-kva.de)
        ascii_dom = normalize_domain(dom) or dom
        if ascii_dom in seen:
            raise ConfigError(f"{key}.domain: {dom} has two routes: delivery.route"
                              f"[{seen[ascii_dom]}] is the same domain ({ascii_dom})")
        seen[ascii_dom] = i
        if not r.hosts:
            raise ConfigError(f"{key}.hosts: at least one host is needed")
        for j, h in enumerate(r.hosts):
            try:
                if h.startswith("[") or h.count(":") == 1:
                    parse_hostport(h)
            except ValueError as exc:
                raise ConfigError(f"{key}.hosts[{j}]: {exc}") from None
        if r.starttls is not None and r.starttls not in _STARTTLS:
            raise ConfigError(f"{key}.starttls: expected one of {', '.join(_STARTTLS)}")
        if r.source_address:
            try:
                ipaddress.ip_address(r.source_address)
            except ValueError:
                raise ConfigError(f"{key}.source_address: not an IP address") from None
            _ipv6_off(f"{key}.source_address", r.source_address, d)
    return tuple(ns)


def _ipv6_off(key: str, address: str, d) -> None:
    """ConfigError when *address*, a source address connected from, is an IPv6 one and
    delivery.ipv6 is off: it would reach nothing (no IPv6 address is connected to)."""
    if not d.ipv6 and ":" in address:
        raise ConfigError(f"{key}: {address} is an IPv6 address, and delivery.ipv6 = false "
                          "connects to no IPv6 address (it would reach nothing)")


def _read_checked(key: str, path: str) -> bytes:
    """The bytes of the file at *path*, named by the setting *key*; ConfigError naming
    both if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def _check_tls(cert: str, key: str) -> tuple[bytes, bytes]:
    """Read smtp.tls_certificate and tls_key and load them (ConfigError naming the file
    that cannot be read, or the two when they do not load); their bytes, as loaded
    (Settings.tls_files)."""
    import ssl

    files = (_read_checked("smtp.tls_certificate", cert), _read_checked("smtp.tls_key", key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        load_tls(ctx, cert, key, files)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"smtp.tls_certificate: cannot load {cert} with {key}: {exc}") from None
    return files


def load_tls(ctx, cert: str, key: str, files: tuple[bytes, bytes] | None) -> None:
    """*ctx*.load_cert_chain of the certificate chain *cert* and the private key *key*
    (smtp.tls_certificate, tls_key): from *files*, their bytes as read (Settings.tls_files),
    when given (_in_memory: a private key is never written to disk), else from the paths."""
    with _in_memory(files, (cert, key)) as paths:
        ctx.load_cert_chain(*paths)


def _check_ca_file(path: str) -> bytes:
    """Read delivery.tls_ca_file and load it (ConfigError naming it); its bytes, as loaded
    (Settings.tls_ca_data)."""
    import ssl

    data = _read_checked("delivery.tls_ca_file", path)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        load_ca(ctx, path, data)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"delivery.tls_ca_file: cannot load {path}: {exc}") from None
    return data


def load_ca(ctx, path: str, data: bytes | None) -> None:
    """*ctx*.load_verify_locations of the CA bundle *path* (delivery.tls_ca_file): from
    *data*, its bytes as read (Settings.tls_ca_data), when given, else from the path."""
    with _in_memory(None if data is None else (data,), (path,)) as paths:
        ctx.load_verify_locations(cafile=paths[0])


@contextlib.contextmanager
def _in_memory(files, paths):
    """The paths (/proc/self/fd/N) of anonymous in-memory files (memfd, close-on-exec)
    holding each of *files* (bytes), closed at the end: for what takes only a path
    (ssl's loaders).  *paths*, the files' own, when *files* is None, or without
    memfd_create or /proc."""
    fds: list[int] = []
    try:
        if files is not None:
            try:
                for data in files:
                    fds.append(os.memfd_create("mta-tls", os.MFD_CLOEXEC))
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fds[-1], view):]
                if os.path.exists(f"/proc/self/fd/{fds[0]}"):
                    paths = [f"/proc/self/fd/{fd}" for fd in fds]
            except (AttributeError, OSError):     # (no memfd_create: not Linux)
                pass
        yield paths
    finally:
        for fd in fds:
            os.close(fd)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


# Values shown for the keys that have no default, in the example tables of the
# arrays of tables (and optional tables); every such key needs one here.
EXAMPLE_VALUES = {
    "delivery.route.domain": "example.com",
    "delivery.route.hosts": ["10.0.0.5:25"],
    "dkim.keys.domain": "example.com",
    "dkim.keys.selector": "s2026",
    "dkim.keys.key_file": "/etc/mta/dkim/example.com.pem",
    "dkim.fallback.domain": "esp.example.net",
    "egress.source.name": "ip-1",
    "egress.pool.name": "marketing",
    "egress.pool.sources": [{"source": "ip-1", "weight": 3}, {"source": "ip-2", "weight": 1}],
    "webhook.name": "crm",
    "webhook.target": "https://hooks.example.com/sparkpost",
    "webhook.events": ["delivery", "bounce"],
}


def _describe(f) -> tuple[str, str]:
    """A field's one-line doc and its bounds, as written in the example."""
    meta = f.type if isinstance(f.type, mi.Metadata) else None
    doc = (meta.extra_json_schema or {}).get("description", "") if meta else ""
    bounds = []
    if meta is not None:
        t = meta.type
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(t, attr, None)
            if v is not None:
                bounds.append(f"{sym} {v}")
    return doc, ", ".join(bounds)


def _field_lines(struct, key: str) -> list[str]:
    """Every field of *struct* (the table called *key*) with its default and doc."""
    out = []
    for f in mi.type_info(struct).fields:
        doc, bounds = _describe(f)
        if f.required:
            default, doc = EXAMPLE_VALUES[f"{key}.{f.name}"], doc + " (required)"
        else:
            default = f.default if f.default is not mi.NODEFAULT else f.default_factory()
        if default is None:
            out.append(f"# {doc}")
            out.append(f"# {f.name} = (not set)")
            continue
        if bounds:
            doc += f" ({bounds})"
        out.append(f"# {doc}")
        out.append(f"{f.name} = {_toml_value(default)}")
    return out


def nested_tables(section: str, struct) -> list[tuple[str, str, type]]:
    """The arrays of tables and optional tables in a section, as (header, key, Struct).

    A ``list[SomeStruct]`` field is ``[[section.field]]``; a ``SomeStruct | None``
    field is ``[section.field]``.
    """
    out = []
    for f in mi.type_info(struct).fields:
        t = f.type.type if isinstance(f.type, mi.Metadata) else f.type
        key = f"{section}.{f.name}"
        if isinstance(t, mi.ListType) and isinstance(t.item_type, mi.StructType):
            out.append((f"[[{key}]]", key, t.item_type.cls))
        elif isinstance(t, mi.UnionType):
            structs = [x for x in t.types if isinstance(x, mi.StructType)]
            if len(structs) == 1:
                out.append((f"[{key}]", key, structs[0].cls))
    return out


def example_toml() -> str:
    """Render every key with its default and one-line doc, as TOML.

    The keys of arrays of tables and optional tables follow their section as a
    commented-out example table: uncommented, it is a valid table of that kind.
    """
    out = [
        "# mta configuration: every key with its built-in default.",
        "# Generated by 'mta print-config --example'; 'mta check-config -c FILE' validates.",
        "",
    ]
    for section, struct in SECTIONS:
        out.append(f"[{section}]")
        out += _field_lines(struct, section)
        out.append("")
        for header, key, table in nested_tables(section, struct):
            name = key.rpartition(".")[2]
            if header.startswith("[["):
                out.append(f"# Each {header} table takes these keys (there are none by")
                out.append(f"# default; the tables replace '{name} = []' above):")
            else:
                out.append(f"# The {header} table takes these keys (not set by default):")
            out.append("#")
            out.append(f"# {header}")
            out += [f"# {line}" for line in _field_lines(table, key)]
            out.append("")
    for key, table in TOP_LEVEL_TABLES:
        out.append(f"# Each [[{key}]] table takes these keys (there are none by default):")
        out.append("#")
        out.append(f"# [[{key}]]")
        out += [f"# {line}" for line in _field_lines(table, key)]
        out.append("")
    return "\n".join(out)
