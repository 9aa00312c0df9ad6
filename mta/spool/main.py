"""spool[n]: the writer process of one spool shard.

Owns every message whose queue id maps to shard n.  It alone writes the
shard's segment files (see :mod:`mta.spool.store`).

Reads:   SPOOL_MESSAGE_COMMIT from acceptors; queue requests from the CLI
         (SPOOL_QUEUE_SUMMARY, SPOOL_QUEUE_LIST, SPOOL_MESSAGE_SHOW,
         SPOOL_MESSAGE_DELETE) on the ROUTER socket ``spool-<n>``.
Writes:  segment files under ``<spool>/shard-<n>/``; replies.
Config:  [spool] segment_size, max_batch_messages, max_batch_bytes,
         queue_high_water, compact_live_ratio, fsync.

Hot path (group commit): wait for the socket; take every request that is
waiting (up to the batch bounds); append all their records with one writev;
one fdatasync; then acknowledge them all.  Requests that arrive during the
fsync are the next batch.  A message is acknowledged only after the fsync that
covers it has returned.

Failure: a write or fsync error answers the whole batch STATUS_STORAGE (the
acceptor says 451 4.3.0); the next batch starts a new segment, so the shard
heals by itself when the disk does.  SIGTERM: finish the batch in hand, close,
exit 0.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import zmq

from mta import bus, proc
from mta.spool.store import MessageMeta, Store

log = logging.getLogger("mta.spool")

POLL_INTERVAL_MS = 200          # longest sleep between housekeeping checks
RECLAIM_INTERVAL = 1.0          # seconds between reclamation passes
RECLAIM_MAX_COPY = 2000         # messages copied forward per pass (bounds the pause)
LIST_LIMIT_MAX = 1_000_000


def shard_dir(spool_dir: str, shard: int) -> str:
    return os.path.join(spool_dir, f"shard-{shard:02d}")


class Shard:
    """The request loop of one shard."""

    def __init__(self, settings, shard: int):
        cfg = settings.config.spool
        self.cfg = cfg
        self.shard = shard
        self.store = Store(shard_dir(settings.spool_dir, shard), cfg.segment_size, cfg.fsync)
        self.endpoint = settings.endpoint(f"spool-{shard}")
        self.stopping = False
        self.healthy = True
        self.last_error = ""

    def open(self, ctx: zmq.Context) -> None:
        stats = self.store.recover()
        log.info("recovered queue: messages=%d segments=%d records=%d skipped_bytes=%d "
                 "seconds=%s", stats["messages"], stats["segments"], stats["records"],
                 stats["skipped_bytes"], stats["seconds"])
        self.server = bus.Server(ctx, self.endpoint, self.cfg.queue_high_water)

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        next_reclaim = time.monotonic() + RECLAIM_INTERVAL
        while not self.stopping:
            if poller.poll(POLL_INTERVAL_MS):
                self.batch()
            now = time.monotonic()
            if now >= next_reclaim:
                next_reclaim = now + RECLAIM_INTERVAL
                self.reclaim()
        # Anything that arrived but was not taken is not acknowledged: the
        # acceptors time out and answer 451, so nothing is lost.
        self.store.close()
        self.server.close()

    # ------------------------------------------------------------ group commit

    def batch(self) -> None:
        """Take every waiting request, write them together, sync once, then answer."""
        cfg = self.cfg
        server = self.server
        messages = []      # (MessageMeta, body)
        commit_peers = []  # (peer, req): one answer per request, whatever it carried
        done: list[str] = []
        delete_peers = []  # (peer, req, qids)
        size = 0
        while len(messages) < cfg.max_batch_messages and size < cfg.max_batch_bytes:
            got = server.recv()
            if got is None:
                break
            peer, frames = got
            try:
                m, f, body = bus.decode(frames)
            except bus.BusError as exc:
                log.warning("dropped a malformed request: %s", exc)
                continue
            if m.name == "SPOOL_MESSAGE_COMMIT":
                req, envelopes = f
                if len(envelopes) != len(body):
                    log.warning("dropped a malformed commit: %d envelopes, %d bodies",
                                len(envelopes), len(body))
                    continue
                for (qid, sender, rcpts, params, client, arrival), b in zip(envelopes, body):
                    messages.append((MessageMeta(qid, sender, rcpts, arrival, params, client), b))
                    size += len(b)
                commit_peers.append((peer, req))
            elif m.name == "SPOOL_MESSAGE_DELETE":
                qids = [q for q in f[1] if q in self.store.entries]
                done += qids
                delete_peers.append((peer, f[0], qids))
            else:
                self.query(peer, m.name, f)
        if not messages and not done:
            return
        status = bus.STATUS_OK
        try:
            new = self.store.write(messages, done)
            self.store.sync()
        except OSError as exc:
            status = bus.STATUS_STORAGE
            if self.healthy or exc.strerror != self.last_error:
                log.error("spool write failed: %s; answering 451 until it recovers",
                          exc.strerror or exc)
            self.healthy = False
            self.last_error = exc.strerror or str(exc)
        else:
            removed = self.store.commit(new, done)
            if removed:
                log.info("deleted by operator: %s", " ".join(removed))
            if not self.healthy:
                log.info("spool writes are succeeding again")
            self.healthy = True
            self.last_error = ""
        encode = bus.encode
        for peer, req in commit_peers:
            server.send(peer, encode("SPOOL_MESSAGE_COMMITTED", req, status))
        for peer, req, qids in delete_peers:
            server.send(peer, encode("SPOOL_MESSAGE_DELETE_REPLY", req, status,
                                     qids if status == bus.STATUS_OK else []))

    # ----------------------------------------------------------------- queries

    def query(self, peer: bytes, name: str, f: list) -> None:
        store = self.store
        if name == "SPOOL_QUEUE_SUMMARY":
            s = store.summary()
            s.update(shard=self.shard, healthy=self.healthy, error=self.last_error)
            self.server.send(peer, bus.encode("SPOOL_QUEUE_SUMMARY_REPLY", f[0], s))
        elif name == "SPOOL_QUEUE_LIST":
            limit = min(int(f[1] or LIST_LIMIT_MAX), LIST_LIMIT_MAX)
            out = []
            for qid in sorted(store.entries)[:limit]:
                e = store.entries[qid]
                out.append([qid, e.meta.sender, e.meta.rcpts, e.meta.arrival, e.length])
            self.server.send(peer, bus.encode("SPOOL_QUEUE_LIST_REPLY", f[0], out))
        elif name == "SPOOL_MESSAGE_SHOW":
            e = store.entries.get(f[1])
            if e is None:
                reply = bus.encode("SPOOL_MESSAGE_SHOW_REPLY", f[0], bus.STATUS_UNKNOWN, None,
                                   body=b"")
            else:
                m = e.meta
                entry = {"qid": m.qid, "sender": m.sender, "recipients": m.rcpts,
                         "arrival": m.arrival, "size": e.length, "params": m.params,
                         "client": m.client}
                reply = bus.encode("SPOOL_MESSAGE_SHOW_REPLY", f[0], bus.STATUS_OK, entry,
                                   body=store.read_body(e))
            self.server.send(peer, reply)
        else:
            log.warning("unexpected request %s ignored", name)

    # ------------------------------------------------------------- reclamation

    def reclaim(self) -> None:
        """Free segments whose messages are finished; compact the oldest if mostly empty."""
        if not self.healthy:
            return
        try:
            copies, unlink = self.store.reclaim_plan(self.cfg.compact_live_ratio,
                                                     RECLAIM_MAX_COPY)
            if not unlink:
                return
            if copies:
                new = self.store.write(copies, [])
                self.store.sync()
                self.store.commit(new, [])
            freed = self.store.unlink(unlink)
            if freed:
                log.info("reclaimed %d segment(s), %d bytes; copied forward %d message(s)",
                         len(unlink), freed, len(copies))
        except OSError as exc:
            log.error("reclamation failed: %s", exc.strerror or exc)


def main(settings, shard: int, ready_fd: int | None) -> None:
    """Entry point of the spool[n] child."""
    name = proc.start_role("spool", shard, settings.config.server.log_level)
    from mta import native
    log.info("starting %s; codec implementation %s", name, native.implementation())
    s = Shard(settings, shard)

    def stop(signum, frame):
        s.stopping = True

    signal.signal(signal.SIGTERM, stop)
    ctx = bus.new_context()
    try:
        s.open(ctx)
        proc.report_ready(ready_fd)
        s.run()
    finally:
        ctx.term()
    log.info("stopped")
