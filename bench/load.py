#!/usr/bin/env python3
"""End-to-end SMTP acceptance load harness: our daemon against Postfix and smtp-sink.

What it measures
    How fast a server *accepts* mail over SMTP from Postfix's ``smtp-source``, and how much
    CPU it spends per accepted message.  Three targets run in the same invocation, on the same
    machine, with the same ``smtp-source`` settings:

    mta      ``mta serve`` (``python -m mta serve -c CONFIG`` by default).  Says 250 only once
             the message is on disk (group-committed fdatasync).
    postfix  a private Postfix instance (own config and queue directory in a temporary
             directory) whose smtpd tags every message HOLD: cleanup writes and fsyncs the
             queue file, moves it to the hold queue, and only then does smtpd answer 250.
             Nothing is ever scheduled for delivery.  After each run the hold queue must hold
             exactly the messages sent, or the run is reported as an error.
    sink     ``smtp-sink`` (keeps nothing, not durable): the ceiling of the generator and the
             loopback path on this machine.

Method
    * Every run starts a fresh instance of the target (empty queue), sends one probe message
      with smtplib, an unmeasured warm-up batch with smtp-source, then the measured batch.
      Rounds interleave the targets (the order rotates each round) so that drift of the
      machine hits all of them alike.  Figures are medians over ``--runs`` rounds.
    * Throughput = measured messages / wall time of the smtp-source process.
    * CPU per message, system-wide (works for every target, including Postfix's short-lived
      processes): busy time from /proc/stat (user+nice+system+irq+softirq) over the run,
      minus smtp-source's own CPU (rusage from os.wait4), minus this harness's CPU, minus the
      machine's background busy rate sampled for ``--idle-sample`` seconds before the target
      was started (after waiting up to ``--wait-idle`` seconds for the machine to be idle)
      times the wall time; divided by the messages.  Robust to short-lived processes, not to
      other work on the machine: use a quiet machine, or read the tree figure.
    * CPU per message, server process tree: sum of utime+stime+cutime+cstime from
      /proc/PID/stat over the server's root process and all its live descendants, after minus
      before.  Children that exit during the run are counted through their parent's
      cutime/cstime once reaped (the Postfix master and the mta supervisor reap promptly).
      Roots: mta supervisor PID, Postfix master PID, smtp-sink PID.
    * Each smtp-source run is bounded by ``--timeout`` seconds; on expiry its process group
      is killed and the run is an error.  Server start-up and shutdown are bounded too.

End-to-end mode (``--e2e``, issue 3)
    smtp-source -> server -> smtp-sink: how fast the server accepts *and delivers* the same
    load.  Targets mta and postfix; the receiver for both is an ``smtp-sink -c`` started by the
    harness for each run on its own 127.0.0.1 port, whose counter ("mesg=N", updated at every
    "." received) says exactly how many messages arrived.

    mta      ``delivery.hold = false``, one static route ``[[delivery.route]] domain = "*"
             hosts = ["127.0.0.1:SINKPORT"]`` (an IP literal: no DNS), connection_limit
             = ``--concurrency``; everything else default.
    postfix  the same private instance, without the HOLD, delivering with its smtp client to
             ``relayhost = [127.0.0.1]:SINKPORT`` (bracketed IP literal, and
             ``smtp_dns_support_level = disabled``: no DNS), destination concurrency limit
             ``--concurrency``, ``delay_logging_resolution_limit = 6`` (microsecond delays).

    Each run: fresh receiver and target, probe + warm-up, wait until they are all delivered,
    then the measured batch.  A run is done when the receiver has counted every message sent
    and the server has recorded every delivery: for the mta, its event log holds a
    "delivery" line for each (the spool writes it after the outcome is on disk); for Postfix,
    its queue directories (maildrop, incoming, active, deferred, hold) are empty.  After
    that, ``mta queue --json`` must report 0 messages (polled, bounded), and the receiver
    must have exactly the messages sent (more would be duplicates).

    * msgs/s = measured messages / (done - start of smtp-source).
    * CPU per message: as above, over the same window, system-wide additionally minus the
      receiver's CPU (/proc/PID/stat of smtp-sink), and the server tree.
    * Latency, acceptance to delivery, p50/p99 over the measured messages: mta from its
      event log, delivery.timestamp - reception.timestamp per (queue_id, recipient)
      (reception = end of DATA in the acceptor, before the fsync; delivery = when the spool
      recorded the outcome, after its fsync; microseconds).  Postfix from its maillog:
      ``delay=`` of the "status=sent" line, which Postfix counts from the message's arrival
      (MAIL FROM in smtpd) to the end of the delivery (the receiver's reply to ".").  Postfix
      prints it with two significant digits (delay_logging_resolution_limit = 6 only lifts
      the default cap of 2 decimals): 1 ms steps from 0.1 to 1 s, 0.1 s steps from 1 to 10 s,
      i.e. within 5 %.  The maillog's own timestamps are whole seconds, so no finer figure
      is available from Postfix.

Network
    All traffic goes to 127.0.0.1.  By default (``--netns auto``) the harness first moves
    itself into a private network namespace holding only a loopback interface (needs
    CAP_SYS_ADMIN), so nothing it starts -- including a daemon that tries to resolve or
    deliver -- can reach anything but loopback.

Usage
    python bench/load.py [--sessions 20] [--messages 20000] [--size 2048] [--runs 3]
        [--targets mta,postfix,sink] [--per-connection] [--mta-config-extra TOML]
        [--mta-cmd CMD | --mta-head] [--mta-base REV] [--record]
    python bench/load.py --e2e [--concurrency 20] [--targets mta,postfix] ... [--record]

``--mta-head`` runs the mta from HEAD's mta/ (git archive) and this checkout's compiled
extensions, so uncommitted work in the tree does not leak into a recorded result.

``--mta-base REV`` adds the target mta-base: the mta exactly as at git revision REV (its tree
from ``git archive REV``, its own ext/ compiled into its mta/_ext; built once per revision in
bench/.cache/), measured in the same interleaved rounds as the other targets, acceptance or
--e2e, so that a change is compared side by side with the commit before it.

``--record`` appends a dated section to bench/RESULTS.md.  Standard library only.

The harness itself is the package bench/loadlib/ (its __init__ lists the modules); this
file is its command line.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/, for loadlib

from loadlib.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
