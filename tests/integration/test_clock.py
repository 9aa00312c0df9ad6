"""The daemon and the wall clock: a spool written while the clock was ahead.

The clock was a day ahead while the daemon took mail (a VM booted with a wrong clock),
then set right while it was down.  The spool's records say the mail arrived, and was
deferred, a day from now: after the restart it must go now, not when the clock catches
up, and expire no sooner for it; an ``options.start_time`` keeps its instant.  The
records are written with the spool's own Store, as the shard writes them, before the
daemon starts.
"""
from __future__ import annotations

import os
import time

from daemon import wait_until
from mxlab import IPS, mx

from mta.queueid import new_qid
from mta.store import START_AT, MessageMeta, Store, shard_dir

IP_A = IPS[0]
AHEAD = 86400.0


def message(subject: str) -> bytes:
    return (f"From: <alice@sender.test>\r\nTo: <a@later.test>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@sender.test>\r\n\r\nhello\r\n").encode()


def spool_ahead(state_dir: str) -> dict[str, str]:
    """Write three messages as a shard whose clock was AHEAD seconds ahead would have:
    one never tried, one deferred once and due again as the daemon stopped, one scheduled
    for an hour after it came (options.start_time).  Their queue ids by name."""
    st = Store(shard_dir(os.path.join(state_dir, "spool"), 0), 4 << 20, fsync=True)
    st.recover()
    then = time.time() + AHEAD
    qids = {name: new_qid(0) for name in ("fresh", "deferred", "scheduled")}
    metas = [
        MessageMeta(qids["fresh"], "alice@sender.test", ["a@later.test"], then,
                    {"message_id": "<fresh@sender.test>"}, "c"),
        MessageMeta(qids["deferred"], "alice@sender.test", ["b@later.test"], then - 90.0,
                    {"message_id": "<deferred@sender.test>"}, "c",
                    state=[0], attempts=[1], due=[then - 1.0]),
        MessageMeta(qids["scheduled"], "alice@sender.test", ["c@later.test"], then,
                    {"message_id": "<scheduled@sender.test>", START_AT: then + 3600.0}, "c"),
    ]
    new = st.write([(m, message(name)) for m, name in zip(metas, qids)], [])
    st.sync()
    st.commit(new, [])
    st.close()
    return qids


def test_mail_spooled_while_the_clock_was_ahead_goes_at_once_after_it_is_set_right(lab):
    sink = lab.aio(IP_A)
    lab.serve(mx("later.test", "mx.later.test", IP_A))
    d = lab.daemon(shards=1, start=False, retry_schedule=[60.0], retry_jitter=0.0,
                   max_age=3600.0)
    qids = spool_ahead(d.state_dir)
    d.start()
    wait_until(lambda: sink.received() >= 2, 20, "the two messages due to be delivered")
    got = sorted(rcpt for t in sink.snapshot() for rcpt in t.rcpt_tos)
    assert got == ["a@later.test", "b@later.test"]
    assert "the clock is behind" in d.log()
    # the scheduled one waits for its start_time, an instant the client named
    [left] = d.queue_list()
    assert left["queue_id"] == qids["scheduled"], left
    time.sleep(1.0)
    assert sink.received() == 2
