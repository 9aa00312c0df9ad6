"""Target postfix: a private Postfix instance in the run's directory, as root.

Acceptance: smtpd tags every message HOLD, so cleanup fsyncs it into the hold queue before
smtpd answers 250 and nothing is ever delivered.  --e2e: no HOLD; its smtp client delivers
everything to the harness's receiver (a bracketed IP literal relayhost, DNS off)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from ..common import (CONFIRM_TIMEOUT_S, LOOPBACK, POSTFIX_CMD_TIMEOUT_S, STOP_TIMEOUT_S,
                      free_port, tail, tool, wait_banner)
from ..procs import kill_leftovers, process_tree, start_time, wait_pid_gone
from .base import Target

POSTFIX_CLIENT = re.compile(r"postfix/smtpd\[\d+\]: ([0-9A-Za-z]+): client=")
POSTFIX_SENT = re.compile(r"postfix/smtp\[\d+\]: ([0-9A-Za-z]+): to=<[^>]*>, .*?"
                          r"\bdelay=([0-9.]+), .*\bstatus=sent ")


def postfix_latencies(maillog, offset: int) -> list[float]:
    """delay= (seconds) of every status=sent line for the queue ids whose smtpd client= line
    comes after byte offset of the maillog."""
    with open(maillog, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    ids = set(POSTFIX_CLIENT.findall(text))
    delays = {}
    for qid, delay in POSTFIX_SENT.findall(text):
        if qid in ids:
            delays.setdefault(qid, float(delay))
    return list(delays.values())


class PostfixTarget(Target):
    """A private Postfix instance that holds everything it accepts, or (--e2e) delivers it
    all to the harness's smtp-sink."""

    name = "postfix"
    durable = True
    OTHER_QUEUES = ("maildrop", "incoming", "active", "deferred", "corrupt")
    # --e2e: a message still to be delivered is in one of these.
    PENDING_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, args, rundir):
        super().__init__(args, rundir)
        self.etc = rundir / "etc"
        self.queue = rundir / "queue"
        self.started = False
        self.master_start = None
        self.log_offset = 0     # --e2e: where the measured batch starts in the maillog

    def main_cf(self) -> dict[str, str]:
        """main.cf: every setting that differs from Postfix's defaults."""
        limit = max(100, 2 * self.args.sessions + self.args.concurrency + 20)
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            # Not created by us: post-install must create it owned by the mail owner.
            "data_directory": str(self.rundir / "data"),
            "maillog_file": str(self.rundir / "maillog"),
            "maillog_file_prefixes": str(self.rundir),
            "myhostname": "postfix.bench.invalid",
            "mydomain": "bench.invalid",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "relay_domains": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_peername_lookup": "no",
            # Every message goes to the hold queue and is never scheduled.
            "smtpd_client_restrictions": "check_client_access static:HOLD",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            # Belt and braces: should anything leave hold, it is discarded, not sent; the
            # hold-queue count after the run would then report the error.  (An error: or
            # retry: transport would make smtpd reject the recipient at RCPT.)
            "default_transport": "discard:bench instance never delivers",
            "relay_transport": "discard:bench instance never delivers",
            "default_process_limit": str(limit),
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "smtpd_client_message_rate_limit": "0",
            "smtpd_client_recipient_rate_limit": "0",
            "smtpd_client_new_tls_session_rate_limit": "0",
            "smtpd_client_event_limit_exceptions": "127.0.0.0/8",
            "biff": "no",
        }
        if self.args.e2e:
            del cf["smtpd_client_restrictions"]  # no HOLD: deliver everything
            c = str(self.args.concurrency)
            cf.update({
                "default_transport": "smtp",
                "relay_transport": "smtp",
                # A bracketed IP literal: no MX and no address lookup; DNS off for good measure.
                "relayhost": f"[{LOOPBACK}]:{self.sink_port}",
                "smtp_dns_support_level": "disabled",
                "smtp_host_lookup": "native",
                "smtp_address_preference": "ipv4",
                "default_destination_concurrency_limit": c,
                "smtp_destination_concurrency_limit": c,
                # delay= in the maillog to the microsecond (default: 2 decimals).
                "delay_logging_resolution_limit": "6",
            })
        return cf

    def master_cf(self, port: int) -> str:
        """master.cf: an smtpd on 127.0.0.1:port and the daemons it needs, no chroot; no
        delivery agent that could talk to the network, except (--e2e) the smtp client, which
        only ever talks to the relayhost 127.0.0.1:SINKPORT."""
        e2e = ["smtp       unix  - - n - - smtp"] if self.args.e2e else []
        return "\n".join([
            "# service type  private unpriv  chroot  wakeup  maxproc command",
            f"{LOOPBACK}:{port} inet n - n - - smtpd",
            "pickup     unix  n - n 60 1 pickup",
            "cleanup    unix  n - n - 0 cleanup",
            "qmgr       unix  n - n 300 1 qmgr",
            "rewrite    unix  - - n - - trivial-rewrite",
            "bounce     unix  - - n - 0 bounce",
            "defer      unix  - - n - 0 bounce",
            "trace      unix  - - n - 0 bounce",
            "verify     unix  - - n - 1 verify",
            "flush      unix  n - n 1000? 0 flush",
            "proxymap   unix  - - n - - proxymap",
            "proxywrite unix  - - n - 1 proxymap",
            "showq      unix  n - n - - showq",
            "error      unix  - - n - - error",
            "retry      unix  - - n - - error",
            "discard    unix  - - n - - discard",
            "anvil      unix  - - n - 1 anvil",
            "scache     unix  - - n - 1 scache",
            "postlog    unix-dgram n - n - 1 postlogd",
            *e2e,
            "",
        ])

    def postfix(self, *cmd: str) -> None:
        r = subprocess.run([tool("postfix"), "-c", str(self.etc), *cmd],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=POSTFIX_CMD_TIMEOUT_S)
        if r.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(cmd)} failed ({r.returncode}): "
                               f"{(r.stdout + r.stderr).strip()}\n{tail(self.rundir / 'maillog')}")

    def start(self):
        self.port = free_port()
        self.etc.mkdir()
        self.queue.mkdir()
        (self.etc / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main_cf().items()))
        (self.etc / "master.cf").write_text(self.master_cf(self.port))
        self.started = True
        self.postfix("start")  # runs 'postfix check', which creates the queue directories
        self.root_pid = int((self.queue / "pid" / "master.pid").read_text().split()[0])
        self.master_start = start_time(self.root_pid)
        wait_banner(self.port, self._alive)

    def _alive(self):
        if wait_pid_gone(self.root_pid, self.master_start, 0):
            raise RuntimeError(f"postfix master exited: {tail(self.rundir / 'maillog')}")

    def stop(self):
        if not self.started:
            return
        self.started = False
        snapshot = process_tree(self.root_pid) if self.root_pid else {}
        try:
            self.postfix("stop")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"  postfix stop: {e}", file=sys.stderr)
        if self.root_pid and not wait_pid_gone(self.root_pid, self.master_start, STOP_TIMEOUT_S):
            print("  postfix master still running; killing its processes", file=sys.stderr)
        # The master signals its children on exit; kill whatever of the tree is left.
        time.sleep(0.2)
        killed = kill_leftovers(snapshot)
        if killed:
            print(f"  killed leftover postfix processes {killed}", file=sys.stderr)

    def count_queue(self, name: str) -> int:
        return sum(len(files) for _d, _s, files in os.walk(self.queue / name))

    def pending(self) -> int:
        """--e2e: messages still in the queue (not yet delivered, or stuck)."""
        return sum(self.count_queue(q) for q in self.PENDING_QUEUES)

    def queue_counts(self) -> dict[str, int]:
        return {q: self.count_queue(q) for q in (*self.PENDING_QUEUES, "corrupt")}

    # --e2e: delivered = its queue files are gone; latencies from the maillog's delay=.

    def delivered_all(self, expected):
        return self.pending() == 0

    def delivery_state(self):
        return f"postfix queues {self.queue_counts()}"

    def mark(self):
        maillog = self.rundir / "maillog"
        self.log_offset = maillog.stat().st_size if maillog.exists() else 0

    def confirm(self, run, since):
        errors = []
        if self.pending():
            errors.append(f"postfix queues not empty: {self.queue_counts()}")
        confirm = time.monotonic() + CONFIRM_TIMEOUT_S
        while True:  # postlogd writes asynchronously
            lats = postfix_latencies(self.rundir / "maillog", self.log_offset)
            if len(lats) >= self.args.messages or time.monotonic() >= confirm:
                break
            time.sleep(0.2)
        return errors, lats

    def check(self, expected):
        if self.args.e2e:
            return None  # confirm() checks the queues, measure_e2e() the receiver
        held = self.count_queue("hold")
        if held == expected:
            return None
        others = {q: self.count_queue(q) for q in self.OTHER_QUEUES}
        return (f"postfix hold queue has {held} messages, expected {expected} "
                f"(other queues: {others})")

    def describe(self):
        cf = self.main_cf()
        for key in ("queue_directory", "data_directory", "maillog_file", "maillog_file_prefixes"):
            cf[key] = cf[key].replace(str(self.rundir), "TMP")
        if self.args.e2e:
            cf["relayhost"] = f"[{LOOPBACK}]:SINKPORT"
        agents = ("smtp delivery agent (talks only to the relayhost), no lmtp/local"
                  if self.args.e2e else "no smtp/lmtp/local delivery agents")
        return [
            "postfix -c TMP/etc start   (as root; stopped with postfix -c TMP/etc stop)",
            "main.cf: " + "; ".join(f"{k} = {v}" for k, v in cf.items()),
            f"master.cf: smtpd on 127.0.0.1:PORT, chroot n everywhere, postlogd, {agents}",
        ]

