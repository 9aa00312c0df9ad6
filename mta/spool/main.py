"""spool[n]: the writer process of one spool shard, and the owner of its messages' state.

Owns every message whose queue id maps to shard n.  It alone writes the
shard's segment files (:mod:`mta.store`) and decides what happens to
each recipient next (:mod:`mta.spool.outcomes`, :mod:`mta.spool.schedule`).
The loop -- group commit, dispatch, housekeeping -- is :mod:`mta.spool.shard`;
the operator's queries are :mod:`mta.spool.queries`.

Reads:   SPOOL_MESSAGE_COMMIT from acceptors; the CLI's requests
         (SPOOL_QUEUE_SUMMARY / _LIST / _FLUSH, SPOOL_MESSAGE_SHOW / _DELETE) on
         the bus endpoint ``spool-<n>``; DELIVERY_OUTCOME from delivery processes;
         at start, the shard's segment files (the queue is rebuilt from them).
Writes:  segment files under ``<spool>/shard-<n>/`` (each batch's events as a REC_EVENTS
         record of the same group commit, read by the ``events`` process) and the
         synced watermark ``<shard dir>/synced``; the replies; DELIVERY_MESSAGE_READY
         to the delivery process of each recipient domain.
         Reads ``<shard dir>/events.cursor`` once a second (reclamation waits for it).
Peers:   acceptor[*] and the ``mta`` command (requests, over the bus);
         delivery[*] (jobs out, outcomes back, over the bus).  No network peer.
Config:  [spool] (all keys), [delivery] hold, retry_schedule, retry_jitter, max_age,
         time_scale, max_in_flight, max_in_flight_per_domain, spread_threshold,
         connect_timeout, command_timeout, data_timeout,
         job_timeout_margin;
         [server] hostname, event_log, log_level; [events] max_backlog_bytes;
         [feedback] bounce_rules, bounce_domains; [suppression] enabled, path,
         max_size, bounce_rule; [dkim] (its DSNs are signed as the acceptors sign mail).

Start: open the bus, tell the supervisor it is ready (acceptors are started only
then), and rebuild the queue from disk a slice at a time, taking new mail meanwhile
(:meth:`Shard.recover_slice`).  SIGTERM: finish the batch in hand,
close, exit 0; whatever was not taken is not acknowledged, so nothing is lost.
SIGHUP (from the supervisor, at a reload, before its new acceptors start; answered in
``run/spool-<n>.applied.json``, which it waits for): the shard takes the
[delivery] keys it can change while it runs from the supervisor's record of the
active configuration -- hold, retry_schedule, retry_jitter, delay_warning_time and
the timeouts its job timeout is made of -- server.log_level, [dkim] and
[suppression] enabled, path, max_size, bounce_rule (the new acceptors' list) and
[feedback] bounce_rules (the supervisor's copy of the file it checked, run/bounce-rules-<digest>.toml,
read again if renamed or edited in place: the
record's digest of it), bounce_domains, [events] max_backlog_bytes (one lowered below
the backlog held then keeps that backlog until it is read below it); the rest (SPOOL_START_KEYS in
mta.config, SPOOL_READ_AT_START, and [spool]) takes effect at the next start.
SIGUSR1 (from the supervisor, once a reload's new delivery processes run): what the
delivery lanes whose limits the reload raised handed back is due again now
(:mod:`mta.spool.release`).
"""
from __future__ import annotations

import logging
import signal

from mta import bus, native, proc
from mta.spool.shard import Shard
from mta.store import WriterBusy

log = logging.getLogger("mta.spool")


def main(settings, shard: int, ready_fd: int | None) -> None:
    """Entry point of the spool[n] child."""
    name = proc.start_role("spool", shard, settings.config.server.log_level)
    log.info("starting %s; hot-path implementation %s", name, native.implementation())
    try:
        s = Shard(settings, shard)
    except WriterBusy as exc:
        # (the supervisor starts this shard again after its back-off: the other writer
        # may be an orphan on its way out, see proc.die_with_parent)
        log.error("%s; not starting", exc.strerror)
        raise SystemExit(1) from None

    def stop(signum, frame):
        s.stopping = True

    def reload(signum, frame):
        s.reload_wanted = True

    def limits(signum, frame):
        s.limits_wanted = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGUSR1, limits)
    ctx = bus.new_context()
    try:
        s.open(ctx)
        proc.report_ready(ready_fd)
        s.run()
    finally:
        bus.close_context(ctx)
    log.info("stopped")
