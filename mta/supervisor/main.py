"""supervisor: the long-lived parent of every mta process.

Reads:   the configuration file (at start and on SIGHUP; validated whole by
         :func:`mta.config.load`); the process table (``services.table``);
         ``spool/SHARDS``, the shard count the spool was created with;
         ``run/mta.pid``, to refuse a second daemon on the same state directory
         (and ``run/mta.lock``, flock(2)ed for the daemon's life, so that two started
         at the same instant do not both pass that check);
         one "ready" byte per child on a pipe.
Writes:  the listening sockets (one SO_REUSEPORT socket per acceptor slot and
         address, SMTP and HTTP, held open here for the daemon's life), ``run/mta.pid``,
         ``spool/SHARDS`` (at first start); sd_notify messages (WATCHDOG=1 at half
         of $WATCHDOG_USEC, from each wait of its loop: readable(), pause(); a live
         STATUS= line at most every STATUS_EVERY seconds, from the children it
         runs, run/drain and the delivery processes' status files); the
         diagnostic log.
Peers:   its children, by fork/wait and signals (SIGTERM to stop, SIGKILL when
         one does not), and systemd through $NOTIFY_SOCKET.  It takes no part in
         the bus: it creates no ZeroMQ context, event loop or spool file, so
         children inherit nothing they could share by accident.  Each child
         runs the entry string of its row of the process table
         (``"mta.spool.main:main"``), imported in the child after fork; the
         supervisor imports no other role's code.
Config:  [server] state_dir, log_level, ready_timeout, restart_backoff_max,
         shutdown_timeout; [smtp] listen, acceptors, spool_timeout (added to the
         stop grace); [http] listen; [spool] shards, directory; [delivery]
         processes; the whole file is handed to each child, which reads its part.

Start: bind the sockets, fork the roles in process-table order (the admin
process, which serves ``/metrics`` on ``[admin] listen``; then the spool
shards: each rebuilds its queue before it reports ready; then delivery;
then the acceptors); READY=1.
A child that dies is started again after a back-off that doubles while it
keeps dying quickly (up to ``server.restart_backoff_max``).
SIGTERM/SIGINT: STOPPING=1; roles stop in reverse table order: acceptors
drain (``server.shutdown_timeout``), delivery finishes transactions in
progress, then the spool shards record the last outcomes and stop; exit 0.
SIGHUP: RELOADING=1; validate the new file (a new server.log_level is this
process's at once, and the spool shards', told as below); if it is bad keep running and log
why; if good, when what the spool shards take changed, record it
(run/active-config.json), SIGHUP them and wait for each one's answer
(run/spool-<n>.applied.json; server.ready_timeout at most) -- their Bounce Rule
entries go to the list the new acceptors read before those start -- then replace
the acceptors one slot at a time — the new process
accepts on the slot's socket before the old one stops, so no connection is
refused (the old one finishes its sessions; one still there after the shutdown
timeout, the spool timeout and STOP_GRACE is killed); then, when their sections changed (``ROLLED``: [server], [delivery], [egress],
[[shaping]], [[response_rule]], [[warmup]], [backoff], [feedback], [cluster]; [events];
[webhooks], [[webhook]], [events] and delivery.nameservers, dns_timeout, ipv6), replace the delivery, events and webhooks processes
in ROLL_ROUNDS rounds at most (one at a time up to that many), each stopped as at
SIGTERM before its successor starts (one that does not start ends its role's roll
and fails the reload, naming it); once the delivery processes are replaced for a
change of LIMIT_SECTIONS, SIGUSR1 to the spool shards (they release the mail the lanes
whose limits rose handed back: mta.spool.release) — then
READY=1.  Spool and admin settings, and what changes the process table
(delivery.processes, turning the events or webhooks process on or off), take
effect at the next restart; the log names them.
Each reload's outcome is recorded in ``run/reload.json`` (:meth:`Supervisor.report_reload`):
``mta reload`` (systemd's ExecReload) sends the SIGHUP and waits for the record of a
reload that read the file after its signal, so that ``systemctl reload`` returns when
the new configuration serves, or fails with the reason.
SIGUSR2 (``mta upgrade``): stop the children as at SIGTERM but keep the
listening sockets open (connections wait in the backlog), start ``mta serve``
-- the installed version -- with them ($MTA_INHERIT_FDS), wait for its ready
byte ($MTA_UPGRADE_READY_FD), send MAINPID= to systemd, pass on a stop or a
reload asked for meanwhile, and exit 0; if it does not come up, start the children
again (once the spool shards' writer locks are free: a new supervisor that died left
its children, :meth:`Supervisor._await_shard_writers`) and carry on, or, should they
not start, stop and exit 1 (:meth:`Supervisor.upgrade`).
At start ``run/drain`` (``mta drain``) is removed: a fresh start accepts mail
(an upgrade keeps it).
SIGUSR1: passed to the events process, which reopens the event log by name
(for logrotate).
"""
from __future__ import annotations

import dataclasses
import errno
import importlib
import ipaddress
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import traceback

import msgspec
import setproctitle

from mta import config as mconfig
from mta import proc, store
from mta.config import hostport
from mta.feedback import suppression as suppression_list
from mta.obs import queue as queue_view
from mta.shaping import share_note
from mta.supervisor import notify
from mta.supervisor.services import table

log = logging.getLogger("mta.supervisor")

TICK = 0.25                 # seconds between checks of children and restarts
QUICK_DEATH = 10.0          # a child that dies younger than this doubles its back-off
FIRST_BACKOFF = 0.2         # seconds
# SIGHUP: the roles whose processes are replaced when these config sections (or, written
# "section.key", keys) change ([dkim] is the acceptors', which every reload replaces).
# The webhooks process reads the store of [events] and looks target names up with
# [delivery]'s DNS settings (mta.api.webhook_dns), not the rest of [delivery] (a hold
# toggled must not abandon its POSTs in flight).
ROLLED = {"delivery": ("delivery", "egress", "shaping", "response_rule", "warmup", "backoff",
                       "feedback", "server", "cluster"),
          "events": ("events", "server"),
          "webhooks": ("webhooks", "webhook", "events", "delivery.nameservers",
                       "delivery.dns_timeout", "delivery.ipv6")}
# what a delivery lane may send: a reload that changes one of these tells the spool shards
# (SIGUSR1) once the new delivery processes run, to release what the lanes it raised handed
# back (mta.spool.release)
LIMIT_SECTIONS = ("delivery", "egress", "shaping", "warmup", "cluster")
STOP_GRACE = 10.0           # seconds after the drain for a child to exit before SIGKILL
SHARD_ANSWER_POLL = 0.01    # a reload looks this often for the spool shards' answers (s)
ROLL_ROUNDS = 4             # a reload replaces a role's processes in this many rounds at most
LISTEN_BACKLOG = 4096
DRAIN_FLAG = "drain"        # run/drain: the node is drained (written by the admin process)
INHERIT_ENV = "MTA_INHERIT_FDS"          # upgrade: the listening sockets' fds, as JSON
LOCK_ENV = "MTA_LOCK_FD"                 # upgrade: the fd holding run/mta.lock
UPGRADE_READY_ENV = "MTA_UPGRADE_READY_FD"   # upgrade: the new supervisor writes b"R" here
STATUS_EVERY = 5.0          # seconds: the live STATUS= line is sent at most this often
REBUILD_NOTE_EVERY = 5.0    # seconds: more start time asked for while a suppression list is rebuilt


class StartupError(Exception):
    pass


def readable(fds, timeout: float) -> list[int]:
    """The descriptors of *fds* that can be read (data, or the writer gone) within
    *timeout* seconds.  poll(), not select(): select() takes no descriptor from
    FD_SETSIZE (1024) on, and the supervisor's pipes are numbered after whatever it
    holds -- a listening socket per acceptor slot and address, descriptors inherited
    from whoever started it (ValueError at the first wait, the node down).
    Every wait of the supervisor goes through this or :func:`pause`, which feed
    systemd's watchdog (:func:`notify.watchdog`)."""
    notify.watchdog()
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    try:
        return [fd for fd, _ in p.poll(max(0, int(timeout * 1000)))]
    except InterruptedError:
        return []


def pause(seconds: float) -> None:
    """Sleep *seconds* (a fraction of a TICK), the watchdog fed first."""
    notify.watchdog()
    time.sleep(seconds)


@dataclasses.dataclass
class Child:
    role: str
    index: int
    pid: int
    started: float
    ready_fd: int | None
    ready: bool = False
    retired: bool = False      # replaced or stopping: do not restart
    kill_at: float | None = None   # retired by a reload: SIGKILL if still here then (monotonic)


@dataclasses.dataclass
class Slot:
    """A role's numbered place: it outlives the processes that fill it."""

    role: str
    index: int
    socks: list                  # SMTP listening sockets
    child: Child | None = None
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    http_socks: list = dataclasses.field(default_factory=list)   # HTTP API listening sockets

    def all_socks(self) -> list:
        return self.socks + self.http_socks


# Listening sockets handed over by the supervisor being upgraded (``mta upgrade``):
# (address, port) -> sockets, taken by bind_listener before it binds anew.
_inherited: dict[tuple[str, int], list[socket.socket]] = {}


def _addr_key(host: str, port: int) -> tuple[str, int]:
    try:
        return ipaddress.ip_address(host).compressed, int(port)
    except ValueError:
        return host, int(port)


def take_inherited(environ=os.environ) -> int:
    """Adopt the sockets named in $MTA_INHERIT_FDS (JSON list of fds); how many."""
    raw = environ.pop(INHERIT_ENV, None)
    if not raw:
        return 0
    n = 0
    for fd in json.loads(raw):
        try:
            sk = socket.socket(fileno=int(fd))
            host, port = sk.getsockname()[:2]
        except OSError as exc:
            log.error("inherited fd %s is not a listening socket (%s); ignored", fd, exc)
            continue
        sk.setblocking(False)
        _inherited.setdefault(_addr_key(host, port), []).append(sk)
        n += 1
    return n


def close_unused_inherited() -> None:
    for key, socks in _inherited.items():
        for sk in socks:
            log.warning("inherited socket for %s not used by this configuration; closed",
                        hostport(*key))
            sk.close()
    _inherited.clear()


def check_unclaimed(host: str, port: int) -> None:
    """OSError (EADDRINUSE) if a socket of another process listens on *host*:*port*.

    SO_REUSEPORT lets any process of the same user bind an address that already
    listens and join its group: the kernel would split new connections between two
    daemons (a second ``mta serve`` started by mistake, two configurations given one
    port), and the connections waiting on the other one's queue are reset when it
    stops.  A bind without SO_REUSEPORT is refused while anything listens there (or on
    the wildcard address of that port), so one is tried before the real sockets bind.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT is no claim
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))


def bind_listener(host: str, port: int, exclusive: bool = False,
                  listening: bool = True) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, so several slots share the address;
    *exclusive*: refused (EADDRINUSE) if another process listens there already.
    *listening* False: bound only -- the acceptor that serves on it listens
    (create_server); until then the kernel queues no connection on it."""
    left = _inherited.get(_addr_key(host, port))
    if left:
        return left.pop(0)      # handed over by the previous supervisor: already listening
    if exclusive and port:
        check_unclaimed(host, port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        if listening:
            s.listen(LISTEN_BACKLOG)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def _setting(config, name: str):
    """A section of *config* (``"delivery"``), or one key of it (``"delivery.ipv6"``)."""
    sec, _, key = name.partition(".")
    value = getattr(config, sec)
    return getattr(value, key) if key else value


def _ca_edited(old, new) -> bool:
    """Whether *new* read other bytes than *old* from the same delivery.tls_ca_file (a CA
    bundle replaced in place; a changed path changes [delivery] itself)."""
    path = new.config.delivery.tls_ca_file
    return bool(path) and path == old.config.delivery.tls_ca_file and \
        new.tls_ca_data is not None and new.tls_ca_data != old.tls_ca_data


class Supervisor:
    def __init__(self, settings, config_path: str | None):
        self.settings = settings
        self.config_path = config_path
        self.children: dict[int, Child] = {}
        self.slots: dict[tuple[str, int], Slot] = {}
        self.signals: list[int] = []
        self.stopping = False
        self.outgoing: list[Slot] = []   # during a reload: slots being replaced or not yet used
        # roles a reload's roll left part-done (a new process did not start): the next
        # reload replaces them whether their sections changed or not
        self.unrolled: set[str] = set()
        # Upgrade: the pipe on which this supervisor tells the one it replaces it is ready.
        fd = os.environ.pop(UPGRADE_READY_ENV, None)
        self.upgrade_ready_fd = int(fd) if fd and fd.isdigit() else None
        fd = os.environ.pop(LOCK_ENV, None)
        self.lock_fd = int(fd) if fd and fd.isdigit() else None
        self.status_at = time.monotonic() + STATUS_EVERY    # the next live STATUS= line
        self.status_sent = ""
        self.status_note = ""       # the last reload or upgrade failed: said in each line
        self.restarts: dict[str, int] = {}      # "role[index]" -> unasked deaths

    # --------------------------------------------------------------- set-up

    def prepare(self) -> None:
        s = self.settings
        # durable: a power cut must not take the spool away, nor the state directory
        # with the spool and every other store in it
        store.make_dirs(s.state_dir)
        os.makedirs(s.run_dir, exist_ok=True)
        # first, before this start writes anything: a second daemon on this state
        # directory must leave the first one's files (and its ports) alone
        self._lock_run_dir()
        pidfile = os.path.join(s.run_dir, "mta.pid")
        self._check_not_running(pidfile)
        self._write_restarts()      # (a count is this supervisor's: the last run's goes)
        store.make_dirs(s.spool_dir)
        self._check_suppression_list(s)
        self.settings = s = self._fix_shard_count(s)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        with open(pidfile, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        self.pidfile = pidfile
        # A reload record of an earlier run is no answer to a reload of this one: it
        # is stamped with CLOCK_MONOTONIC, which starts again at a boot (mta reload
        # would take a record of the last boot's daemon for one later than its signal).
        try:
            os.unlink(os.path.join(s.run_dir, mconfig.RELOAD_RECORD))
        except FileNotFoundError:
            pass

    def _check_suppression_list(self, settings, old=None) -> None:
        """A damaged suppression list (truncated: a process that reads it dies of SIGBUS;
        not an LMDB file: none can open it) would stop every acceptor and spool shard at
        its start, and so the node: it is moved aside and rebuilt from what its pages
        still hold, here, before the children that open it are forked
        (suppression.check_at_start: only when no process has it open).  At a start; at
        a reload (*old*: the running settings) only when the new acceptors open another
        list than the running ones.  Not at an upgrade: the children of the supervisor
        it replaces had it open; a restarted child opens the list as it is (the children
        never check it: a list being written looks short for a moment).  A list that
        cannot be read or moved aside (OSError: no permission, say) stops the start, or
        fails the reload (StartupError), naming it."""
        cfg = settings.config.suppression
        if not cfg.enabled or self.upgrade_ready_fd is not None:
            return
        path = os.path.join(settings.state_dir, cfg.path)
        if old is not None and old.config.suppression.enabled and \
                os.path.join(old.state_dir, old.config.suppression.path) == path:
            return
        try:
            done = suppression_list.check_at_start(path, cfg.max_size, _rebuilding())
        except OSError as exc:
            if old is None:
                raise
            raise StartupError(f"suppression list {path}: {exc}") from None
        if done:
            log.error("%s", done)

    def _end_drain(self) -> None:
        """A drain (mta drain) lasts until cancelled or the next start; an upgrade is not
        a new start: the supervisor it replaces was draining, so is this one.  Called once
        the listening sockets are bound: a start that fails (its ports taken, say by a
        killed supervisor's children still serving) must leave the drain as it was."""
        if self.upgrade_ready_fd is None:
            try:
                os.unlink(os.path.join(self.settings.run_dir, DRAIN_FLAG))
                log.warning("a drain was in effect; this start accepts mail again")
            except FileNotFoundError:
                pass

    def remove_pidfile(self) -> None:
        """After a failed start: the pid file, when it still names this process."""
        path = getattr(self, "pidfile", None)
        if not path:
            return
        try:
            with open(path) as fh:
                if fh.read().strip() == str(os.getpid()):
                    os.unlink(path)
        except OSError:
            pass

    def _lock_run_dir(self) -> None:
        """Take run/mta.lock (flock) for this supervisor's life, or StartupError naming
        the daemon that holds it.

        The pid file alone is checked, then written: two starts at the same instant
        both passed the check, and the one that failed later (the ports, the spool
        shards' locks) had written its pid and record files over the other's, and
        removed the pid file as it went.  flock(2): the kernel lets go when the process
        ends, however it ends.  The children do not keep it (spawn closes it there), so
        a supervisor killed with SIGKILL leaves no lock; an upgrade hands the
        descriptor to the new supervisor ($MTA_LOCK_FD), which holds it with this one
        and alone once it exits.
        """
        path = os.path.join(self.settings.run_dir, mconfig.SUPERVISOR_LOCK)
        fd = self.lock_fd
        if fd is not None and not self._is_lock_file(fd, path):
            log.warning("$%s names no descriptor of %s; ignored", LOCK_ENV, path)
            try:
                # the lock of the state directory the upgraded daemon had (a config
                # that moves server.state_dir): let go, or this process and its
                # children would keep that directory locked
                if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == \
                        mconfig.SUPERVISOR_LOCK:
                    os.close(fd)
            except OSError:
                pass
            fd = None
        if fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            holder = store.flock_pid(fd)
        except OSError:
            os.close(fd)
            self.lock_fd = None
            raise
        if holder is not None:
            os.close(fd)
            self.lock_fd = None
            raise StartupError(f"another mta (pid {holder}) uses {self.settings.state_dir}")
        os.set_inheritable(fd, False)
        self.lock_fd = fd

    @staticmethod
    def _is_lock_file(fd: int, path: str) -> bool:
        """Whether *fd* (inherited) is open on the file at *path*."""
        try:
            a, b = os.fstat(fd), os.stat(path)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def _check_not_running(self, pidfile: str) -> None:
        try:
            with open(pidfile) as fh:
                pid = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return
        if pid and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if b"mta" not in fh.read():
                        return
            except OSError:
                return
            raise StartupError(f"another mta (pid {pid}) uses {self.settings.state_dir}")

    def _fix_shard_count(self, s):
        """The spool keeps the shard count it was created with (queue ids map to shards)."""
        path = os.path.join(s.spool_dir, "SHARDS")
        try:
            with open(path) as fh:
                existing = int(fh.read().strip())
        except FileNotFoundError:
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(f"{s.shards}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, path)
            store.sync_dir(s.spool_dir)
            return s
        except ValueError:
            raise StartupError(
                f"{path}: not a number; it records the spool's shard count") from None
        if existing != s.shards:
            log.warning("spool at %s was created with %d shards; using %d "
                        "(spool.shards = %d is ignored)", s.spool_dir, existing, existing,
                        s.shards)
            s = dataclasses.replace(s, shards=existing)
        return s

    def bind_all(self, listen, first: bool, listening: bool = True) -> list:
        """One listening socket per address; StartupError (nothing left open) if one fails.
        *first*: the first of the slots that share these addresses, so an address this
        supervisor does not listen on yet must not be another process's.  *listening*:
        bind_listener's."""
        held = {_addr_key(*sk.getsockname()[:2]) for sl in self.slots.values()
                for sk in sl.all_socks()} if first else ()
        socks = []
        for host, port in listen:
            try:
                socks.append(bind_listener(host, port,
                                           exclusive=first and _addr_key(host, port) not in held,
                                           listening=listening))
            except OSError as exc:
                for x in socks:
                    x.close()
                why = "another process listens there (another mta serve?)" \
                    if exc.errno == errno.EADDRINUSE else exc.strerror
                raise StartupError(f"cannot listen on {hostport(host, port)}: {why}") from None
        return socks

    def bind_slots(self, settings, role: str, count: int, listen, http_listen=()) -> dict:
        slots = {}
        try:
            for i in range(count):
                socks = self.bind_all(listen, first=i == 0)
                try:
                    http_socks = self.bind_all(http_listen, first=i == 0)
                except StartupError:
                    for x in socks:
                        x.close()
                    raise
                slots[(role, i)] = Slot(role, i, socks, http_socks=http_socks)
        except StartupError:
            for sl in slots.values():
                for x in sl.all_socks():
                    x.close()
            raise
        return slots

    # -------------------------------------------------------------- children

    def spawn(self, slot: Slot, settings) -> Child:
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        entry = next(s.entry for s in table(settings) if s.role == slot.role)
        me = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            # (EAGAIN at the unit's TasksMax, ENOMEM): a StartupError, which every caller
            # takes -- a restart tries again later, a reload or an upgrade's fallback
            # keeps what runs, a first start ends with the reason; no pipe left open
            os.close(rfd)
            os.close(wfd)
            raise StartupError(f"cannot start {slot.role}[{slot.index}]: "
                               f"{exc.strerror or exc}") from None
        if pid == 0:  # child
            code = 0
            try:
                # Not the supervisor's handler, which only notes it: a stop (or the
                # supervisor's death) before start_role, while the role's modules are
                # imported, must end this process, not be lost.  (The other signals the
                # handler takes are ignored until then, as start_role does.)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                proc.die_with_parent(me)
                os.close(rfd)
                # Listening sockets of other slots (and, during a reload, of the
                # slots being replaced) must not stay open here: the kernel would
                # queue connections on them that this process never accepts.
                for other in list(self.slots.values()) + self.outgoing:
                    if other is not slot:
                        for sk in other.all_socks():
                            if sk not in slot.all_socks():
                                sk.close()
                for c in self.children.values():
                    if c.ready_fd is not None:
                        os.close(c.ready_fd)
                if self.upgrade_ready_fd is not None:
                    os.close(self.upgrade_ready_fd)
                if self.lock_fd is not None:
                    os.close(self.lock_fd)      # (the supervisor's lock stays: not LOCK_UN)
                mod_name, func = entry.split(":")
                fn = getattr(importlib.import_module(mod_name), func)
                if slot.socks or slot.http_socks:
                    fds = [sk.detach() for sk in slot.socks]
                    http_fds = [sk.detach() for sk in slot.http_socks]
                    fn(settings, slot.index, wfd, fds, http_fds)
                else:
                    fn(settings, slot.index, wfd)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                code = 1
                proc.flush_logging()
                traceback.print_exc()
            finally:
                try:
                    proc.flush_logging()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        os.close(wfd)
        child = Child(slot.role, slot.index, pid, time.monotonic(), rfd)
        self.children[pid] = child
        slot.child = child
        log.info("started %s[%d] pid=%d", slot.role, slot.index, pid)
        return child

    def wait_ready(self, children: list[Child], timeout: float) -> bool:
        """Wait until every child in *children* has reported ready; False if one failed."""
        deadline = time.monotonic() + timeout
        waiting = {c.ready_fd: c for c in children if not c.ready}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for fd in readable(waiting, min(left, TICK)):
                c = waiting.pop(fd)
                data = os.read(fd, 1)
                if data != b"R" or c.role != "acceptor":
                    # (an acceptor's pipe stays open: it says "S" when it stops
                    # accepting, _await_stopped_accepting)
                    os.close(fd)
                    c.ready_fd = None
                if data != b"R":
                    return False
                c.ready = True
            self.reap()
            if any(c.pid not in self.children for c in waiting.values()):
                return False
        return True

    def reap(self) -> list[Child]:
        """Collect exited children; schedule restarts for the ones still wanted."""
        dead = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.ready_fd is not None:
                os.close(child.ready_fd)
                child.ready_fd = None
            dead.append(child)
            how = (f"exit status {os.waitstatus_to_exitcode(status)}"
                   if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}")
            slot = self.slots.get((child.role, child.index))
            if child.retired or self.stopping or slot is None or slot.child is not child:
                log.info("%s[%d] pid=%d exited (%s)", child.role, child.index, pid, how)
                continue
            now = time.monotonic()
            if now - child.started > QUICK_DEATH:
                slot.backoff = FIRST_BACKOFF
            slot.restart_at = now + slot.backoff
            log.error("%s[%d] pid=%d died (%s); restarting in %.1fs", child.role, child.index,
                      pid, how, slot.backoff)
            slot.backoff = min(slot.backoff * 2, self.settings.config.server.restart_backoff_max)
            slot.child = None
            key = f"{child.role}[{child.index}]"
            self.restarts[key] = self.restarts.get(key, 0) + 1
            self._write_restarts()
        return dead

    def _write_restarts(self) -> None:
        """Record the unasked deaths for the admin process (replaced whole; a lost
        write only delays the figure to the next death)."""
        path = os.path.join(self.settings.run_dir, mconfig.RESTARTS_NAME)
        try:
            with open(path + ".tmp", "wb") as fh:
                fh.write(msgspec.json.encode(self.restarts))
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc.strerror or exc)

    def restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.child is None and slot.restart_at is not None and now >= slot.restart_at:
                slot.restart_at = None
                self._respawn(slot, self.settings)

    def _respawn(self, slot: Slot, settings) -> Child | None:
        """Start *slot*'s process again; when it cannot be forked (the unit's TasksMax,
        memory), try again after the slot's back-off instead of ending the supervisor --
        and with it every other process of the node."""
        try:
            return self.spawn(slot, settings)
        except StartupError as exc:
            slot.restart_at = time.monotonic() + slot.backoff
            log.error("%s; trying again in %.1fs", exc, slot.backoff)
            slot.backoff = min(slot.backoff * 2, settings.config.server.restart_backoff_max)
            return None

    # --------------------------------------------------------------- running

    def start(self) -> None:
        s = self.settings
        services = table(s)
        for svc in services:
            if svc.listen or svc.http_listen:
                self.slots.update(self.bind_slots(s, svc.role, svc.count, svc.listen,
                                                  svc.http_listen))
            else:
                self.slots.update({(svc.role, i): Slot(svc.role, i, []) for i in range(svc.count)})
        close_unused_inherited()
        self._end_drain()
        self._write_active()
        self.start_children()
        status = self.status_line()
        log.info("ready: %s", status)
        notify.ready(status)
        if self.upgrade_ready_fd is not None:     # tell the supervisor we replace
            try:
                os.write(self.upgrade_ready_fd, b"R")
            except OSError:
                pass
            os.close(self.upgrade_ready_fd)
            self.upgrade_ready_fd = None

    def start_children(self) -> None:
        s = self.settings
        for role in (svc.role for svc in table(s)):
            started = [self.spawn(sl, s) for sl in self.slots.values() if sl.role == role]
            if not self.wait_ready(started, s.config.server.ready_timeout):
                raise StartupError(f"a {role} process failed to start; see the log above")

    def status_line(self) -> str:
        s = self.settings
        listen = ", ".join(hostport(h, p) for h, p in s.listen)
        http = ", ".join(hostport(h, p) for h, p in s.http_listen)
        http = f", HTTP on {http}" if http else ""
        admin = ", ".join(hostport(h, p) for h, p in s.admin_listen)
        http += f", admin on {admin}" if admin else ""
        agent = ", ".join(hostport(h, p) for h, p in s.agent_listen)
        http += f", HAProxy agent on {agent}" if agent else ""
        return (f"accepting SMTP on {listen}{http}; {s.acceptors} acceptor(s), {s.shards} "
                f"spool shard(s), {s.deliveries} delivery process(es)")

    def send_live_status(self) -> None:
        """STATUS= for ``systemctl status``: :meth:`live_status`, sent when it changed,
        at most every STATUS_EVERY seconds, and only under systemd."""
        now = time.monotonic()
        if now < self.status_at or not notify.enabled():
            return
        self.status_at = now + STATUS_EVERY
        text = self.live_status()
        if text != self.status_sent:
            self.status_sent = text
            notify.status(text)

    def live_status(self) -> str:
        """One line on what the node does now: accepting or draining, the processes up
        (the slots waiting for a restart named), and what the delivery processes send --
        from their status files (rewritten each second for ``mta queue``; read here
        every STATUS_EVERY seconds at most, nothing added to a child's work); and
        whether the last reload or upgrade failed (READY=1 said why)."""
        s = self.settings
        state = "draining (mta drain): no new mail" \
            if os.path.exists(os.path.join(s.run_dir, DRAIN_FLAG)) else "accepting"
        down = [f"{sl.role}[{sl.index}]" for sl in self.slots.values() if sl.child is None]
        up = f"{len(self.slots) - len(down)}/{len(self.slots)} processes up"
        if down:
            up += f" ({', '.join(down[:3])}{', ...' if len(down) > 3 else ''} restarting)"
        rate = 0.0
        flight = waiting = reports = 0
        now = time.time()
        for i in range(s.deliveries):
            st = queue_view.read_status(queue_view.delivery_status_path(s.run_dir, i))
            if st is None or now - st.get("time", 0) > queue_view.STATUS_FRESH:
                continue
            reports += 1
            flight += st.get("in_flight", 0)
            for lane in st.get("lanes", ()):
                rate += lane.get("rate", 0)
                waiting += lane.get("queued", 0)
        out = f"; out {rate:,.0f} msg/s, {flight:,} in flight ({waiting:,} waiting)" \
            if reports else ""
        note = f"; {self.status_note}" if self.status_note else ""
        return f"{state}; {up}{out}{note}"

    def on_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def run(self) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                    signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self.on_signal)
        self.start()
        while True:
            readable([rfd], TICK)
            try:
                while os.read(rfd, 512):
                    pass
            except BlockingIOError:
                pass
            sigs, self.signals = self.signals, []
            if signal.SIGTERM in sigs or signal.SIGINT in sigs:
                return self.shutdown()
            self.reap()
            self.kill_overdue()
            if signal.SIGUSR2 in sigs:
                status = self.upgrade(reload_asked=signal.SIGHUP in sigs)
                if status is not None:
                    return status
            if signal.SIGHUP in sigs:
                self.reload()
            if signal.SIGUSR1 in sigs:
                # logrotate: the events process reopens the event log by name
                self._signal_role("events", signal.SIGUSR1)
            self.restart_due()
            self.send_live_status()

    def shutdown(self) -> int:
        log.info("stopping")
        notify.stopping()
        self.stopping = True
        # Close our copies of the listening sockets first: once the acceptors
        # close theirs, new connections are refused at once instead of
        # waiting in a backlog that nobody will accept from.
        for sl in self.slots.values():
            for sk in sl.all_socks():
                sk.close()
        self._stop_children()
        try:
            os.unlink(self.pidfile)
        except OSError:
            pass
        log.info("stopped")
        return 0

    @staticmethod
    def _stop_grace(settings) -> float:
        """How long a child SIGTERMed (at a stop, or replaced by a reload) is given before
        SIGKILL: its drain (an acceptor waits for the spool's answers besides; a delivery
        process gives its transactions under way 10 s more), then STOP_GRACE."""
        cfg = settings.config
        return cfg.server.shutdown_timeout + cfg.smtp.spool_timeout + STOP_GRACE

    def _stop_asked(self) -> bool:
        return any(sig in (signal.SIGTERM, signal.SIGINT) for sig in self.signals)

    def _stop_children(self, what: str = "stopping") -> None:
        """Stop every child, role by role in reverse table order (acceptors first); the
        STATUS= line says, prefixed with *what*, which role it waits for."""
        grace = self._stop_grace(self.settings)
        for svc in reversed(table(self.settings)):
            victims = [c for c in self.children.values() if c.role == svc.role]
            for c in victims:
                c.retired = True
                self._kill(c.pid, signal.SIGTERM)
            if victims:
                rest = sum(1 for c in self.children.values() if c.role != svc.role)
                # EXTEND_TIMEOUT_USEC: past the unit's TimeoutStopSec (300 s in
                # contrib/mta.service) systemd waits while each role's stop is under way
                # -- a shutdown_timeout of up to an hour is the operator's to choose --
                # and kills the node only when a role takes longer than its grace
                notify.notify(f"EXTEND_TIMEOUT_USEC={int((grace + STOP_GRACE) * 1e6)}",
                              f"STATUS={what}: {len(victims)} {svc.role} process(es) "
                              f"finishing; {rest} more to stop")
            self._wait_gone(victims, grace)

    # --------------------------------------------------------------- upgrade

    def upgrade(self, reload_asked: bool = False) -> int | None:
        """SIGUSR2 (``mta upgrade``): hand the listening sockets to a new supervisor.

        The children stop as at SIGTERM (acceptors finish their sessions, delivery
        its transactions, the spool records the last outcomes) while this process
        keeps the listening sockets open, so new connections wait in their
        backlogs instead of being refused.  Then ``mta serve`` -- the installed
        version -- starts with the sockets (their fds in $MTA_INHERIT_FDS) and
        says on a pipe when it is ready; this supervisor then exits 0.  If the
        new one fails or is not ready in time, this one starts its children
        again on the same sockets and keeps running.  Returns the exit status when this
        process is to exit now (1: its children could not be started again, so that a
        service manager restarts the node), else None.

        A reload asked for with the upgrade or during it (*reload_asked*: a SIGHUP
        taken with the SIGUSR2; or one that came while this waited) is the new
        supervisor's: passed on once it is ready, as a stop is.  It may have read the
        file before the change, and ``mta reload`` waits for a reload that read it
        after its signal.  (After a failed upgrade this one reloads: the SIGHUP stays
        in its queue.)
        """
        cfg = self.settings.config
        log.info("upgrade: stopping the children; the listening sockets stay open")
        notify.reloading()
        self.stopping = True
        self._stop_children("upgrading")
        socks = [sk for sl in self.slots.values() for sk in sl.all_socks()]
        fds = [sk.fileno() for sk in socks]
        rfd, wfd = os.pipe()
        argv = [sys.executable, "-m", "mta", "serve"]
        if self.config_path:
            argv += ["-c", self.config_path]
        env = {**os.environ, INHERIT_ENV: json.dumps(fds), UPGRADE_READY_ENV: str(wfd),
               LOCK_ENV: str(self.lock_fd)}
        if notify.watchdog_usec():
            # the new supervisor pings from its start (this one until it exits): without
            # $WATCHDOG_PID, since systemd's names this process
            env["WATCHDOG_USEC"] = str(notify.watchdog_usec())
        try:
            os.unlink(self.pidfile)     # the new supervisor writes its own
        except OSError:
            pass
        new = None
        try:
            new = subprocess.Popen(argv, env=env, pass_fds=[*fds, wfd, self.lock_fd],
                                   close_fds=True)
        except OSError as exc:
            log.error("upgrade: cannot start %s: %s", argv[0], exc)
        os.close(wfd)
        ok = False
        if new is not None:
            # Every role may take its ready_timeout; the spool rebuilds its queue.
            timeout = (len(table(self.settings)) + 1) * cfg.server.ready_timeout
            ok = self._await_byte(rfd, timeout) == b"R"
        os.close(rfd)
        if ok:
            log.info("upgrade: supervisor pid %d took over; exiting", new.pid)
            notify.notify(f"MAINPID={new.pid}", f"STATUS=upgraded: supervisor pid {new.pid}")
            for sk in socks:
                sk.close()
            # A stop asked for meanwhile (SIGTERM, SIGINT) is the new supervisor's now:
            # passed on, not dropped with this process (the node would keep running).
            stops = [sig for sig in self.signals if sig in (signal.SIGTERM, signal.SIGINT)]
            if stops:
                log.info("upgrade: passing the stop asked for meanwhile to pid %d", new.pid)
                os.kill(new.pid, stops[0])
            elif reload_asked or signal.SIGHUP in self.signals:
                log.info("upgrade: passing the reload asked for meanwhile to pid %d",
                         new.pid)
                os.kill(new.pid, signal.SIGHUP)
            return 0
        log.error("upgrade failed: the new supervisor did not become ready; starting this "
                  "one's children again")
        if new is not None and new.poll() is None:
            new.terminate()
            deadline = time.monotonic() + cfg.server.shutdown_timeout + STOP_GRACE
            while new.poll() is None and time.monotonic() < deadline:
                pause(0.05)
            if new.poll() is None:
                new.kill()
                new.wait()
        with open(self.pidfile, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        self.stopping = False
        self._await_shard_writers()
        # The new supervisor may have recorded its configuration before it died: the
        # record is this one's again, or the spool shards started now take the other's
        # [delivery] at their first turn (Shard.start) -- a hold lifted, say.
        self._write_active()
        # and it reset the count of unasked deaths at its start: this one's again (else
        # mta_child_restarts_total fell to 0, and jumped back at the next death)
        self._write_restarts()
        try:
            self.start_children()
        except StartupError as exc:
            log.error("cannot start the children again: %s; stopping (exit status 1)",
                      exc)
            self.shutdown()
            return 1
        self.status_note = "last upgrade failed"
        notify.ready(f"upgrade failed; {self.status_line()}")
        return None

    def _await_shard_writers(self) -> None:
        """After a failed upgrade, before this supervisor's spool shards start again:
        wait until no process holds a shard's writer lock.

        A new supervisor that died (killed, say) leaves its children behind; each is
        sent SIGTERM as it dies (proc.die_with_parent) and stops as at a stop, but a
        spool shard may take its stop's grace to record its last outcomes -- or never
        stop (stopped, wedged in a system call).  A shard of ours started meanwhile
        finds the lock held and does not start, and this supervisor, its children not
        started again, would stop the node.  So: wait up to a stop's grace
        (_stop_grace) for the locks; then SIGKILL each holder the lock file names that
        is an mta spool process (its title) -- the orphans; another process is named
        in the log and left alone (the shard then reports it, and the start fails as
        before); then wait STOP_GRACE more for the kernel to let go of the locks."""
        s = self.settings
        dirs = {i: store.shard_dir(s.spool_dir, i) for i in range(s.shards)}

        def held() -> dict[int, int]:
            out = {}
            for i, d in dirs.items():
                pid = store.lock_holder(d)
                if pid is not None:
                    out[i] = pid
            return out

        busy = held()
        if not busy:
            return
        grace = self._stop_grace(s)
        log.warning("upgrade: spool shard(s) %s still written by the processes the new "
                    "supervisor left; waiting up to %.0fs for pid(s) %s to stop",
                    ", ".join(map(str, busy)), grace, ", ".join(map(str, busy.values())))
        for wait, kill in ((grace, True), (STOP_GRACE, False)):
            deadline = time.monotonic() + wait
            while busy and time.monotonic() < deadline:
                pause(0.1)
                busy = held()
            if not busy:
                log.info("upgrade: the spool shards' writer locks are free")
                return
            if not kill:
                break
            for i, pid in busy.items():
                if pid and pid != os.getpid() and pid not in self.children and \
                        proc.title(pid).startswith("mta: spool"):
                    log.error("upgrade: spool shard %d is still written by pid %d, left by "
                              "the new supervisor; killing it", i, pid)
                    self._kill(pid, signal.SIGKILL)
                else:
                    log.error("upgrade: spool shard %d is written by pid %s, not a spool "
                              "process this supervisor can tell was left by the new one; "
                              "not killed", i, pid or "?")
        log.error("upgrade: spool shard(s) %s still written by another process; their "
                  "start fails", ", ".join(map(str, busy)))

    def _await_byte(self, fd: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return b""
            if readable([fd], min(left, TICK)):
                return os.read(fd, 1)

    def _kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _signal_role(self, role: str, sig: int) -> None:
        for c in list(self.children.values()):
            if c.role == role:
                self._kill(c.pid, sig)

    def _retire(self, child: Child, settings) -> None:
        """SIGTERM *child*, replaced by a reload, without waiting for it: it finishes
        its sessions within the shutdown timeout (the spool's answer may add
        spool_timeout).  Should it still be here STOP_GRACE after that -- stopped, or
        wedged in a system call -- kill_overdue() ends it, so that a reload never
        leaves an old process behind for good."""
        cfg = settings.config
        child.retired = True
        child.kill_at = time.monotonic() + cfg.server.shutdown_timeout + \
            cfg.smtp.spool_timeout + STOP_GRACE
        self._kill(child.pid, signal.SIGTERM)

    def kill_overdue(self) -> None:
        now = time.monotonic()
        for c in list(self.children.values()):
            if c.kill_at is not None and now >= c.kill_at:
                log.error("%s[%d] pid=%d, replaced by a reload, did not stop in time; "
                          "killing it", c.role, c.index, c.pid)
                c.kill_at = None
                self._kill(c.pid, signal.SIGKILL)

    def _wait_gone(self, victims: list[Child], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(c.pid in self.children for c in victims):
            if time.monotonic() >= deadline:
                for c in victims:
                    if c.pid in self.children:
                        log.error("%s[%d] pid=%d did not stop in time; killing it",
                                  c.role, c.index, c.pid)
                        self._kill(c.pid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_GRACE
            pause(0.05)
            self.reap()
            if not self.stopping:
                # a reload's roll waits here, a drain per process: a child of another
                # role that died meanwhile is started again as at any other time
                self.restart_due()

    # ---------------------------------------------------------------- reload

    def report_reload(self, read_at: float, state: str, error: str = "",
                      later: list[str] = ()) -> None:
        """Record the outcome of the reload that read the file at *read_at* (seconds of
        CLOCK_MONOTONIC, one clock for every process of the host) in run/reload.json:
        *state* "reloading", "done" (the new acceptors accept and each replaced process
        has been told to stop; the old acceptors stop accepting at once) or "failed"
        (*error*: why; what ran before runs on).  ``mta reload`` takes the first record
        whose *read_at* is later than its own signal: that reload read the file as the
        operator left it.  A file, not the admin API, so that it works with the admin
        listener off and while the admin process is replaced or down."""
        doc = {"pid": os.getpid(), "read_at": read_at, "state": state, "error": error,
               "later": list(later), "status": self.status_line()}
        path = os.path.join(self.settings.run_dir, mconfig.RELOAD_RECORD)
        try:
            with open(path + ".tmp", "wb") as fh:
                fh.write(msgspec.json.encode(doc))
            os.replace(path + ".tmp", path)
        except OSError as exc:
            log.warning("cannot record the reload's outcome in %s: %s", path, exc)

    def reload(self) -> None:
        notify.reloading()
        log.info("reloading %s", self.config_path or "built-in defaults")
        read_at = time.clock_gettime(time.CLOCK_MONOTONIC)
        self.report_reload(read_at, "reloading")
        try:
            new = mconfig.load(self.config_path)
            new = dataclasses.replace(new, shards=self.settings.shards)
        except mconfig.ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.report_reload(read_at, "failed", f"reload refused: {exc}")
            self.status_note = f"last reload failed: {exc}"
            notify.ready(f"reload failed: {exc}; {self.status_line()}")
            return
        except Exception as exc:
            # A checker's unforeseen error must not end the supervisor (and orphan
            # its children): refuse this reload as for an invalid file.
            log.exception("reload refused, keeping the running configuration: %r", exc)
            self.report_reload(read_at, "failed", f"reload refused: {exc!r}")
            self.status_note = f"last reload failed: {exc!r}"
            notify.ready(f"reload failed: {exc!r}; {self.status_line()}")
            return
        old = self.settings
        _note_config(new)
        _note_unsent_webhooks(new)
        _note_short_dkim_expiry(new)
        _note_node_share(new, old)
        later = mconfig.restart_keys(old, new)
        if later:
            log.warning("reload: %s changed; %s at the next restart (mta check-config "
                        "names them too)", ", ".join(later),
                        "it takes effect" if len(later) == 1 else "they take effect")
        new = self._keep_restart_only(old, new)
        level = new.config.server.log_level
        # the spool shards are not replaced: they take from the record of the active
        # configuration what of [delivery] they can change while they run (hold,
        # retries, timeouts), the log level, [dkim] (the keys that sign their DSNs; a
        # key file replaced in place: the digest of the files), the
        # suppression list the new acceptors use (their Bounce Rule entries go to it)
        # and the bounce rules and domains (a rules file edited in place: its digest),
        # events.max_backlog_bytes;
        # each shard compares what it takes of them (Shard._set_suppression,
        # _set_feedback).  They take it before the new acceptors start, and say so: a
        # Bounce Rule entry of theirs never goes to a list the acceptors no longer read.
        tell = new.config.delivery != old.config.delivery or \
            level != old.config.server.log_level or new.config.dkim != old.config.dkim \
            or new.config.suppression != old.config.suppression \
            or new.config.feedback != old.config.feedback \
            or new.bounce_rules_digest != old.bounce_rules_digest \
            or new.dkim_keys_digest != old.dkim_keys_digest \
            or new.config.events.max_backlog_bytes != old.config.events.max_backlog_bytes \
            or bool(self._stale_rules()) \
            or self._stale_keys()
        # (_stale_rules: a rules file they could not read, _stale_keys: key files changed
        # again on disk before they read them; told again, they read them again)
        moved = False
        try:
            self._check_suppression_list(new, old)
            fresh = self._fresh_slots(old, new)     # (an address taken: nothing moved)
            if tell:
                try:
                    moved = self._move_shards(new, read_at)
                except BaseException:
                    self._close_unshared(fresh)
                    raise
            self._replace_acceptors(old, new, fresh)
        except StartupError as exc:
            if moved:       # back to what the acceptors that run use
                self._move_shards(old, time.clock_gettime(time.CLOCK_MONOTONIC))
            log.error("reload failed, keeping what runs: %s", exc)
            self.report_reload(read_at, "failed", f"reload failed, keeping what runs: {exc}",
                               later)
            self.status_note = f"last reload failed: {exc}"
            notify.ready(f"reload failed: {exc}; {self.status_line()}")
            return
        self.settings = new
        if level != old.config.server.log_level:
            proc.set_log_level(level)
        recorded = moved if tell else self._write_active(new, read_at)
        rules = new.config.feedback.bounce_rules
        if rules and rules == old.config.feedback.bounce_rules and \
                new.bounce_rules_digest != old.bounce_rules_digest:
            log.info("reload: feedback.bounce_rules %s edited in place; the new acceptors "
                     "and the spool shards take its rules", rules)
        if new.config.dkim == old.config.dkim and \
                new.dkim_keys_digest != old.dkim_keys_digest:
            log.info("reload: a [dkim] key file was replaced in place; the new acceptors "
                     "and the spool shards sign with what it holds now")
        failed = []
        for role, sections in ROLLED.items():
            changed = [k if "." in k else f"[{k}]" for k in sections
                       if _setting(new.config, k) != _setting(old.config, k)]
            if role == "delivery" and _ca_edited(old, new):
                # a CA bundle updated at the same path: the delivery processes verify
                # with the bytes they were forked with (Settings.tls_ca_data)
                changed.append("delivery.tls_ca_file (its content)")
            if role in self.unrolled:
                changed.append("a roll left part-done")
            count = sum(1 for key in self.slots if key[0] == role)
            if changed and count:
                size = self._roll_size(count)
                log.info("reload: %s changed; replacing the %s process(es) %s at a time",
                         ", ".join(changed), role, "one" if size == 1 else size)
                rolled = self._roll(role, new)
                failed += rolled
                if role == "delivery" and not rolled and recorded and \
                        any(f"[{k}]" in changed for k in LIMIT_SECTIONS):
                    # the new delivery processes apply the new limits: what the lanes
                    # they raised handed back is due again now (spool.release), not
                    # at the end of the wait the old limits gave it
                    self._signal_role("spool", signal.SIGUSR1)
        status = self.status_line()
        if failed:
            why = "; ".join(failed)
            self.report_reload(read_at, "failed", f"reload failed: {why}", later)
            self.status_note = f"last reload failed: {why}"
            notify.ready(f"reload failed: {why}; {status}")
            return
        log.info("reloaded: %s", status)
        self.report_reload(read_at, "done", later=later)
        self.status_note = ""
        stale = self._stale_rules() if recorded else {}
        if stale:
            for i, why in sorted(stale.items()):
                log.error("reload: spool[%d] classifies bounces by the rules it had: %s "
                          "(mta_spool_bounce_rules_stale; a reload after the file is "
                          "repaired reads it)", i, why)
            self.status_note = f"spool shard(s) {', '.join(map(str, sorted(stale)))} " \
                "run the bounce rules they had (feedback.bounce_rules unreadable)"
        notify.ready(status)

    def _move_shards(self, settings, serial: float) -> bool:
        """Record *settings* as the active configuration (*serial*: this reload's), SIGHUP
        the spool shards and wait until each says it took it (run/spool-<n>.applied.json,
        Shard._say_applied), server.ready_timeout at most: a shard that does not (wedged
        on its disk) is named in the log, and the reload goes on.  False if the record
        could not be written (the shards are not told)."""
        if not self._write_active(settings, serial):
            log.error("reload: the spool shards keep [delivery] as it was (hold, "
                      "retries, timeouts), server.log_level, [dkim], the suppression "
                      "list and the bounce rules until a restart: the record they read "
                      "could not be written")
            return False
        self._signal_role("spool", signal.SIGHUP)
        deadline = time.monotonic() + settings.config.server.ready_timeout
        waiting = {c.index: c.pid for c in self.children.values()
                   if c.role == "spool" and not c.retired}
        while True:
            for i, pid in list(waiting.items()):
                doc = mconfig.read_applied(settings.run_dir, i)
                # (one that died meanwhile: its successor takes the record at its start)
                if doc is not None and doc.get("serial") == serial or \
                        pid not in self.children:
                    del waiting[i]
            if not waiting or time.monotonic() >= deadline:
                break
            pause(SHARD_ANSWER_POLL)
            self.reap()
        if waiting:
            log.warning("reload: spool shard(s) %s did not say in %.0fs that they took "
                        "the new configuration; going on without them",
                        ", ".join(map(str, sorted(waiting))),
                        settings.config.server.ready_timeout)
        return True

    def _shard_answers(self) -> dict[int, dict]:
        """{shard: its answer} of the running spool shards that said (Shard._say_applied)
        which configuration they took, this process's own answer (not a predecessor's)."""
        out = {}
        for c in self.children.values():
            if c.role == "spool" and not c.retired:
                doc = mconfig.read_applied(self.settings.run_dir, c.index) or {}
                if doc.get("pid") == c.pid:
                    out[c.index] = doc
        return out

    def _stale_rules(self) -> dict[int, str]:
        """{shard: why} of the running spool shards that classify bounces by the rules
        they had: the feedback.bounce_rules file could not be read when they took the
        configuration."""
        return {i: str(doc.get("bounce_rules_error") or "")
                for i, doc in self._shard_answers().items() if doc.get("bounce_rules_stale")}

    def _stale_keys(self) -> bool:
        """Whether a running spool shard signs with other [dkim] key files than those this
        supervisor checked: they had changed on disk again when it read them."""
        want = self.settings.dkim_keys_digest
        return any(isinstance(got, str) and got != want for got in (
            doc.get("dkim_keys_digest") for doc in self._shard_answers().values()))

    def _write_active(self, settings=None, serial: float = 0.0) -> bool:
        """Record this supervisor's configuration (run/active-config.json; *settings*, by
        default its own), which the spool shards take [delivery] from.  A record that
        cannot be written is removed: another's (an earlier run's, a new supervisor's
        that died in an upgrade) would be taken for this one's; without one a shard keeps
        what it was started with."""
        try:
            mconfig.write_active(settings or self.settings, self.config_path, serial)
        except OSError as exc:
            log.warning("cannot record the active configuration in %s: %s",
                        self.settings.run_dir, exc)
            try:
                os.unlink(os.path.join(self.settings.run_dir, mconfig.ACTIVE_NAME))
            except FileNotFoundError:
                pass
            except OSError as exc2:
                log.error("cannot remove the record of another configuration in %s: %s",
                          self.settings.run_dir, exc2)
            return False
        return True

    def _keep_restart_only(self, old, new):
        """*new*, with what only a restart changes put back to *old*'s (restart_keys
        names it in the log): [admin] (its listener), and what changes the process
        table -- the spool shards hold one link per delivery process, and the table's
        rows are fixed at start."""
        replace = msgspec.structs.replace
        if new.config.admin != old.config.admin:
            new = dataclasses.replace(new, config=replace(new.config, admin=old.config.admin),
                                      admin_listen=old.admin_listen,
                                      agent_listen=old.agent_listen)
        if new.deliveries != old.deliveries:
            new = dataclasses.replace(new, deliveries=old.deliveries, config=replace(
                new.config, delivery=replace(new.config.delivery,
                                             processes=old.config.delivery.processes)))
        if new.events_enabled != old.events_enabled:
            new = dataclasses.replace(new, events_enabled=old.events_enabled,
                                      event_log=old.event_log,
                                      config=replace(new.config, events=old.config.events))
        if new.config.webhooks.enabled != old.config.webhooks.enabled:
            new = dataclasses.replace(new, config=replace(
                new.config, webhooks=old.config.webhooks, webhook=old.config.webhook))
        if new.spool_dir != old.spool_dir:
            # the spool stays where its shards write until a restart: the new acceptors
            # would look at another directory's free space (spool.min_free_* do apply at
            # a reload, to the acceptors' 452)
            new = dataclasses.replace(new, spool_dir=old.spool_dir, config=replace(
                new.config, spool=replace(new.config.spool,
                                          directory=old.config.spool.directory)))
        if new.state_dir != old.state_dir:
            # every process finds the others (the bus, the run files) under it: a new
            # acceptor looking in another directory never reported ready
            new = dataclasses.replace(
                new, state_dir=old.state_dir, spool_dir=old.spool_dir, run_dir=old.run_dir,
                event_log=old.event_log, config=replace(new.config, server=replace(
                    new.config.server, state_dir=old.config.server.state_dir)))
        return new

    @staticmethod
    def _roll_size(count: int) -> int:
        """How many of a role's *count* processes a reload replaces at a time."""
        return max(1, -(-count // ROLL_ROUNDS))

    def _roll(self, role: str, settings) -> list[str]:
        """Replace the processes of *role* with ones that read *settings*, in ROLL_ROUNDS
        rounds at most (one at a time up to that many processes); returns what went
        wrong ([] if nothing did).

        The old processes of a round are stopped together as at SIGTERM -- a delivery
        process finishes the transactions it has started and hands back its outcomes
        -- and their successors are started when they have exited: the spool shards
        park the due jobs of a delivery process that is away and give them to its
        successor, and send again at once the jobs the old one took with it unstarted
        (at least once; nothing is lost).  The rest serve meanwhile.  One at a time, a
        reload of many busy processes took their count times a stop (up to
        shutdown_timeout + 10 s each), past what ``mta reload`` waits (the unit's
        --timeout); in rounds it takes ROLL_ROUNDS of them at most, whatever the count.
        A stop (SIGTERM) asked for meanwhile ends the roll: the processes not replaced
        yet stay, and are stopped with the others at once.
        A new process that does not start ends it too: it is started again as after a
        crash, and the old processes not replaced yet keep serving (replaced alike,
        their successors might not start either) until the next reload replaces them
        (``unrolled``); the reload is reported failed, naming it.
        """
        grace = self._stop_grace(settings)
        self.unrolled.discard(role)
        keys = sorted(k for k in self.slots if k[0] == role)
        size = self._roll_size(len(keys))
        for n in range(0, len(keys), size):
            if self._stop_asked():
                log.info("reload: a stop was asked for; %s[%d] and the rest are left as "
                         "they are", role, keys[n][1])
                return []
            batch = keys[n:n + size]
            for key in batch:       # (a restart due meanwhile is this roll's to make)
                self.slots[key].restart_at = None
            olds = [self.slots[key].child for key in batch]
            olds = [c for c in olds if c is not None and c.pid in self.children]
            for old in olds:
                old.retired = True
                self._kill(old.pid, signal.SIGTERM)
            self._wait_gone(olds, grace)
            started = []
            for key in batch:
                slot = self.slots[key]
                slot.child = None
                started.append((key, self._respawn(slot, settings)))
            # (one at a time, to tell which did not start; one that died while another
            # was waited for is reaped already, its pipe closed)
            deadline = time.monotonic() + settings.config.server.ready_timeout
            failed = [key for key, child in started
                      if child is None or child.pid not in self.children or not
                      self.wait_ready([child], max(deadline - time.monotonic(), TICK))]
            if not failed:
                continue
            for key, child in started:
                # alive but not ready in time: killed (as a new acceptor is), so the
                # slot is started again as after a crash, not kept by it for ever
                if key in failed and child is not None and child.pid in self.children:
                    self._kill(child.pid, signal.SIGKILL)
            names = ", ".join(f"{role}[{key[1]}]" for key in failed)
            rest = ", ".join(f"{role}[{k[1]}]" for k in keys[n + size:])
            why = f"{names} did not start with the new configuration; " + (
                "it is" if len(failed) == 1 else "they are") + \
                " started again as after a crash" + (
                    f"; {rest} not replaced (the next reload replaces them)"
                    if rest else "")
            log.error("reload failed: %s", why)
            if rest:
                self.unrolled.add(role)
            return [why]
        return []

    def _fresh_slots(self, old, new) -> dict:
        """New slots for the acceptors whose addresses changed (or that are new).

        Sockets for addresses that did not change (SMTP or HTTP, each address of a
        list that changed too) are taken over from the slot's previous holder, so
        connections waiting in their accept queues are served by the new process --
        and none is queued on a new socket of an address that already listens, whose
        queue a failed reload's close would reset.
        """
        same_smtp = tuple(old.listen) == tuple(new.listen)
        same_http = tuple(old.http_listen) == tuple(new.http_listen)
        fresh = {}
        try:
            for i in range(new.acceptors):
                prev = self.slots.get(("acceptor", i))
                if prev is not None and same_smtp and same_http:
                    continue
                first = not fresh       # the later fresh slots share its addresses
                socks = self._sockets_for(new.listen, old.listen,
                                          prev.socks if prev is not None else [], first)
                try:
                    http = self._sockets_for(new.http_listen, old.http_listen,
                                             prev.http_socks if prev is not None else [],
                                             first)
                except StartupError:
                    for x in socks:
                        if prev is None or x not in prev.socks:
                            x.close()
                    raise
                fresh[("acceptor", i)] = Slot("acceptor", i, socks, http_socks=http)
        except StartupError:
            self._close_unshared(fresh)
            raise
        return fresh

    def _sockets_for(self, listen, old_listen, held: list, first: bool) -> list:
        """Listening sockets for *listen*: of *held* (bound for *old_listen*, in its
        order) the ones of the addresses in both, the others bound (bind_all) but not
        listening: a reload's new acceptor listens on them when it serves.  One listening
        from its bind joined the SO_REUSEPORT group of its address (an acceptor slot
        added) and took a share of the new connections that no process accepted before
        that acceptor ran -- reset when a failed reload closed it."""
        have = {}
        if len(held) == len(old_listen):
            have = {_addr_key(*a): sk for a, sk in zip(old_listen, held)}
        bound = iter(self.bind_all([a for a in listen if _addr_key(*a) not in have], first,
                                   listening=False))
        return [have[_addr_key(*a)] if _addr_key(*a) in have else next(bound)
                for a in listen]

    def _close_unshared(self, fresh: dict) -> None:
        """Close the sockets of unused fresh slots that no current slot holds too."""
        for key, sl in fresh.items():
            keep = self.slots[key].all_socks() if key in self.slots else []
            for x in sl.all_socks():
                if x not in keep:
                    x.close()

    def _replace_acceptors(self, old, new, fresh: dict) -> None:
        """Start every new acceptor, each on its slot's sockets (*fresh*: _fresh_slots),
        while the old ones serve on; only once all of them are ready stop the old ones.
        One that does not start ends the others started: the old acceptors serve on,
        every one of them with the configuration they had (StartupError)."""
        try:
            started = self._start_new_acceptors(new, fresh)
        finally:
            self.outgoing = []
        retired = []
        for i, child in enumerate(started):
            key = ("acceptor", i)
            previous = self.slots.get(key)
            old_child = previous.child if previous is not None else None
            slot = fresh.pop(key, None) or previous
            self.slots[key] = slot
            slot.child = child
            slot.restart_at = None          # (an old one that died meanwhile: filled now)
            if child.pid not in self.children:
                # it reported ready and died while another was still starting: reaped
                # then as no slot's child, so it is restarted as a death after the switch
                log.error("%s[%d] pid=%d died after it was ready; restarting in %.1fs",
                          child.role, child.index, child.pid, slot.backoff)
                slot.child = None
                slot.restart_at = time.monotonic() + slot.backoff
                name = f"{child.role}[{child.index}]"
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._write_restarts()
            if old_child is not None and old_child.pid in self.children:
                self._retire(old_child, new)
                retired.append(old_child)
            if previous is not slot:
                kept = slot.all_socks()
                for sk in previous.all_socks() if previous is not None else ():
                    if sk not in kept:
                        sk.close()
        if new.acceptors < old.acceptors:
            _note_queued_connections_reset(old.acceptors, new.acceptors)
        for i in range(new.acceptors, old.acceptors):
            slot = self.slots.pop(("acceptor", i))
            if slot.child is not None:
                self._retire(slot.child, new)
                retired.append(slot.child)
            for sk in slot.all_socks():
                sk.close()
        self._await_stopped_accepting(retired, new)

    def _start_new_acceptors(self, new, fresh: dict) -> list[Child]:
        """Start new.acceptors acceptors with *new*, the old ones left in their slots
        (and serving), and wait until each is ready; returns them by index.  One that
        cannot be started or does not get ready: the others are stopped (the ones that
        accept, as a reload stops an old one), the sockets of *fresh* closed unless a
        slot holds them, StartupError naming it."""
        # a new acceptor must not keep the sockets of the other slots, new or old
        self.outgoing = list(fresh.values())
        started: list[Child] = []
        why = ""
        for i in range(new.acceptors):
            key = ("acceptor", i)
            slot = fresh.get(key) or self.slots[key]
            was = slot.child
            try:
                child = self.spawn(slot, new)
            except StartupError as exc:     # (fork: the unit's TasksMax, memory)
                why = str(exc)
                break
            # until all are ready the slot is the old one's: a new one that dies is no
            # crash to restart, an old one that dies is restarted as at any time
            slot.child = was
            started.append(child)
        if not why and self.wait_ready(started, new.config.server.ready_timeout):
            return started
        failed = [] if why else [c for c in started if not c.ready and (
            c.pid not in self.children or c.ready_fd is None)]
        if not why:
            # none died or said otherwise: ready_timeout passed for the ones not ready
            failed = failed or [c for c in started if not c.ready]
            why = f"new acceptor[{failed[0].index}] did not start"
        for c in started:
            if c in failed:
                c.retired = True
                self._kill(c.pid, signal.SIGKILL)
            elif c.pid in self.children:
                self._retire(c, new)    # (it may accept already: it closes its listeners)
        self._await_stopped_accepting([c for c in started if c.pid in self.children], new)
        self._close_unshared(fresh)
        raise StartupError(why)

    def _await_stopped_accepting(self, children: list[Child], settings) -> None:
        """Wait (server.reload_handover_timeout at most, for all of them together; 0: not
        at all) until each retired acceptor of *children* says it closed its listeners
        ("S" on its ready pipe, or the pipe's end at its exit).  It shares them with its
        successor: until then a client may still be greeted with the configuration the
        reload replaced, and "reloaded" (mta reload's answer) would say otherwise.  One
        that does not answer (stopped, wedged) is named and the reload goes on;
        kill_overdue() ends it later."""
        wait = settings.config.server.reload_handover_timeout
        waiting = {c.ready_fd: c for c in children if c.ready_fd is not None}
        if not waiting or not wait:
            return
        deadline = time.monotonic() + wait
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd in readable(list(waiting), min(TICK, left)):
                # (an acceptor restarted after a crash: its "R" was not read)
                if os.read(fd, 2) == b"R":
                    continue
                os.close(fd)
                waiting.pop(fd).ready_fd = None
        for child in waiting.values():
            log.warning("reload: the replaced %s[%d] pid=%d did not say in %.0fs that "
                        "it stopped accepting; going on (it may still take a "
                        "connection with the configuration it had)", child.role,
                        child.index, child.pid, wait)


def _rebuilding():
    """What the supervisor does now and then while it rebuilds a damaged suppression
    list (seconds for a large one): WATCHDOG=1 (a reload), and, at most every 5 s, more
    time for the start or reload (TimeoutStartSec=, 90 s by default) and a STATUS=."""
    last = [-REBUILD_NOTE_EVERY]

    def tick() -> None:
        notify.watchdog()
        now = time.monotonic()
        if now - last[0] >= REBUILD_NOTE_EVERY:
            last[0] = now
            notify.notify(f"EXTEND_TIMEOUT_USEC={int(REBUILD_NOTE_EVERY * 4e6)}",
                          "STATUS=rebuilding the damaged suppression list (see the log)")
    return tick


def _note_config(settings) -> None:
    """Say what the file says that is valid but should be changed (a key renamed since)."""
    for note in settings.notes:
        log.warning("config: %s", note)


def _note_watchdog(usec: int) -> None:
    """systemd's WatchdogSec= (*usec*, from $WATCHDOG_USEC) below 1 s: the supervisor
    pings at half of it from waits of up to a TICK, and a loop a little late misses it
    and the unit is killed.  Not refused (the node keeps running as before), but said."""
    if 0 < usec < notify.MIN_WATCHDOG_USEC:
        log.warning("systemd's watchdog interval is %g s (WatchdogSec=, WATCHDOG_USEC=%d): "
                    "below %g s the supervisor, which pings at half of it from a loop that "
                    "waits up to %g s, may be late and the unit be killed; set WatchdogSec= "
                    "to a few seconds", usec / 1e6, usec, notify.MIN_WATCHDOG_USEC / 1e6, TICK)


def _note_unsent_webhooks(settings) -> None:
    """[[webhook]] tables are kept while no batch can go -- an operator may turn the
    webhooks off for a while -- but not in silence (at the start and at each reload)."""
    cfg = settings.config
    why = "[webhooks] enabled = false" if not cfg.webhooks.enabled else \
        "[events] store = false" if not cfg.events.store else None
    if cfg.webhook and why:
        log.warning("%d [[webhook]] table(s) are not sent: %s", len(cfg.webhook), why)


def _note_node_share(settings, old=None) -> None:
    """Say that the shaping limits are this node's share ([cluster] nodes), at the start
    and when a reload changes it: what `mta queue` shows is then not what the rules say."""
    nodes = settings.config.cluster.nodes
    if old is not None and old.config.cluster.nodes == nodes:
        return
    if nodes > 1:
        log.info("%s: connection limits, rates, throttles and warm-up caps divided",
                 share_note(nodes))
    elif old is not None:
        log.info("shaping limits are this node's alone ([cluster] nodes = 1)")


# Linux 5.14+, per network namespace: 1 hands the connections queued on a listening
# socket that closes to another of its SO_REUSEPORT group; 0 (the default) resets them.
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def _migrate_req_off() -> str | None:
    """Why the kernel resets the connections queued on a listening socket that closes
    while others of its SO_REUSEPORT group listen on (None: it hands them to those)."""
    try:
        with open(MIGRATE_REQ) as f:
            if f.read().strip() != "0":
                return None
        return "net.ipv4.tcp_migrate_req is 0"
    except FileNotFoundError:
        return "this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14 and later)"
    except OSError as exc:
        return f"net.ipv4.tcp_migrate_req could not be read: {exc}"


def _note_queued_connections_reset(before: int, after: int) -> None:
    """A reload that lowers smtp.acceptors closes the removed slots' listening sockets:
    what waits in their accept queues then (SMTP and HTTP clients that connected and were
    not accepted yet) is reset, unless the kernel hands it to the sockets that stay."""
    why = _migrate_req_off()
    if why:
        log.warning("reload: smtp.acceptors lowered from %d to %d: connections waiting in "
                    "the accept queues of the acceptors removed are reset by the kernel "
                    "(%s; 1 hands them to the acceptors that stay: contrib/60-mta.conf)",
                    before, after, why)


def _note_short_dkim_expiry(settings) -> None:
    """A DKIM signature made at injection with an x= sooner than the message may stay
    queued: mail retried after it leaves with an expired signature (receivers ignore
    it).  Kept -- a short lifetime is the operator's choice -- but not in silence."""
    cfg = settings.config
    if not cfg.dkim.enabled:
        return
    queued = cfg.delivery.max_age * cfg.delivery.time_scale
    short = sorted({f"{k.domain} ({k.selector})" for k in cfg.dkim.keys
                    if (k.expire_seconds or cfg.dkim.expire_seconds or queued) < queued})
    if short:
        log.warning("DKIM signatures of %s expire (x=) sooner than delivery.max_age (%gs): "
                    "mail still queued after that leaves with an expired signature",
                    ", ".join(short[:5]) + (", ..." if len(short) > 5 else ""), queued)


def serve(config_path: str | None) -> int:
    """Run the daemon in the foreground until SIGTERM; return the exit status."""
    try:
        settings = mconfig.load(config_path)
    except mconfig.ConfigError as exc:
        print(f"mta: configuration error: {exc}", file=sys.stderr)
        return 78  # EX_CONFIG
    proc.setup_logging(settings.config.server.log_level, "supervisor")
    setproctitle.setproctitle("mta: supervisor")
    # Nothing the daemon and its children make is for other users: the stores hold
    # recipients and message data, run/active-config.json the API keys and admin
    # tokens, webhooks.sqlite webhook credentials (the spool and the event log set
    # their own modes).  A stricter umask of the operator's stays.
    os.umask(os.umask(0o027) | 0o027)
    inherited = take_inherited()
    _note_watchdog(notify.take_watchdog())
    if inherited:
        log.info("upgrade: took over %d listening socket(s)", inherited)
    sup = Supervisor(settings, config_path)
    prepared = False
    try:
        sup.prepare()
        prepared = True
        log.info("mta starting: state_dir=%s config=%s", settings.state_dir,
                 config_path or "built-in defaults")
        _note_config(settings)
        _note_unsent_webhooks(settings)
        _note_short_dkim_expiry(settings)
        _note_node_share(settings)
        return sup.run()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        sup.stopping = True
        for c in list(sup.children.values()):
            sup._kill(c.pid, signal.SIGTERM)
        sup._wait_gone(list(sup.children.values()), STOP_GRACE)
        sup.remove_pidfile()
        return 1
    except OSError as exc:
        # before the children: the state directory and its files as the host has them
        # (a state_dir naming a file or a path through one, no permission, no space)
        if not prepared or exc.errno in (errno.EACCES, errno.EROFS, errno.ENOSPC):
            log.error("cannot start: %s", exc)
            sup.remove_pidfile()
            return 1
        raise
