"""The JSON-lines event log: rotation by size and age, retention, reopen (mta.obs.events)."""
from __future__ import annotations

import json
import os
import time

from mta.obs.events import RotatingLog


def lines(path) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(x) for x in f.read().splitlines()]


def new_log(path, **kw) -> RotatingLog:
    opts = {"rotate_bytes": 4096, "rotate_age": 0.0, "keep_files": 3,
            "max_total_bytes": 1 << 30}
    opts.update(kw)
    return RotatingLog(str(path), **opts)


def batch(start: int, n: int) -> list[dict]:
    return [{"type": "delivery", "event_id": str(i), "timestamp": str(int(time.time())),
             "pad": "x" * 100} for i in range(start, start + n)]


def test_rotation_by_size_keeps_every_line_until_retention(tmp_path):
    path = tmp_path / "events.jsonl"
    log = new_log(path, keep_files=3)
    seen = []
    for k in range(8):
        log.write(batch(k * 40, 40))
        seen += [str(i) for i in range(k * 40, k * 40 + 40)]
        assert log.rotation_due(time.time())           # 40 lines > 4096 bytes
        log.rotate()
        assert os.path.getsize(path) == 0
    rotated = log.rotated()
    assert len(rotated) == 3                           # keep_files
    # the newest three batches survive, oldest first, whole and in order
    kept = [e["event_id"] for p in rotated for e in lines(p)]
    assert kept == seen[-120:]
    # a small file is not rotated by size; by total bytes, older files go
    log.write(batch(1000, 1))
    assert not log.rotation_due(time.time())
    log.max_total_bytes = os.path.getsize(rotated[-1]) + 10
    log.prune()
    assert log.rotated() == rotated[-1:]
    log.close()


def test_rotation_by_age(tmp_path):
    path = tmp_path / "events.jsonl"
    log = new_log(path, rotate_bytes=1 << 30, rotate_age=60.0)
    assert not log.rotation_due(time.time() + 3600)    # empty: nothing to rotate
    log.write(batch(0, 1))
    assert not log.rotation_due(time.time())
    assert log.rotation_due(time.time() + 61)
    log.close()
    # the age survives a restart: it is the first line's timestamp
    old = {"type": "injection", "event_id": "1", "timestamp": str(int(time.time()) - 120)}
    path.write_text(json.dumps(old) + "\n")
    log = new_log(path, rotate_bytes=1 << 30, rotate_age=60.0)
    assert log.rotation_due(time.time())
    log.close()


def test_reopen_after_an_external_rename(tmp_path):
    path = tmp_path / "events.jsonl"
    log = new_log(path, rotate_bytes=1 << 30)
    log.write(batch(0, 3))
    os.rename(path, tmp_path / "events.jsonl.1")       # logrotate
    log.write(batch(3, 1))                             # still into the renamed file
    log.reopen()
    log.write(batch(4, 2))
    log.close()
    assert [e["event_id"] for e in lines(tmp_path / "events.jsonl.1")] == ["0", "1", "2", "3"]
    assert [e["event_id"] for e in lines(path)] == ["4", "5"]


def test_a_write_cut_short_by_a_full_disk_leaves_no_torn_line(tmp_path, monkeypatch):
    import errno

    import pytest

    from mta.obs import events as ev
    p = tmp_path / "events.jsonl"
    log = new_log(p, rotate_bytes=1 << 30)
    log.write(batch(0, 2))
    real = os.write
    calls = [0]

    def full_disk(fd, data):        # write(2) when the disk fills in the middle of the buffer
        calls[0] += 1
        if calls[0] == 1:
            return real(fd, bytes(data[:40]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ev.os, "write", full_disk)
    with pytest.raises(OSError):
        log.write(batch(2, 3))
    monkeypatch.setattr(ev.os, "write", real)
    log.write(batch(2, 3))          # space is back: the events process writes them again
    log.close()
    assert [e["event_id"] for e in lines(p)] == [str(i) for i in range(5)]


def test_a_torn_last_line_left_by_a_kill_or_a_power_cut_is_cut_at_open(tmp_path):
    # kill -9 in the middle of a write of many lines leaves part of one; a power cut can
    # leave zeros.  Both are past the last checkpoint: the events process writes those
    # events again, and they must start on a line of their own (before, the fragment
    # and the next event made one line no reader could parse; the chaos soak saw one).
    for tail in (b'{"type":"delivery","event_id":"2","pa', b"\0" * 5000,
                 b'{"x":"' + b"y" * 200_000):          # longer than one step back
        p = tmp_path / "events.jsonl"
        log = new_log(p, rotate_bytes=1 << 30)
        log.write(batch(0, 2))
        log.close()
        with open(p, "ab") as f:
            f.write(tail)
        log = new_log(p, rotate_bytes=1 << 30)
        log.write(batch(2, 2))
        log.close()
        assert [e["event_id"] for e in lines(p)] == ["0", "1", "2", "3"], tail[:20]
        os.unlink(p)
    # all of a file one torn line: nothing is left of it
    from mta.obs.events import _cut_torn_tail
    p = tmp_path / "one.jsonl"
    p.write_bytes(b'{"type":"deliv')
    fd = os.open(p, os.O_RDWR)
    assert _cut_torn_tail(fd, os.fstat(fd).st_size, step=4) == 0
    os.close(fd)
    assert p.read_bytes() == b""


def test_a_reopen_whose_sync_fails_does_not_end_the_log(tmp_path, monkeypatch):
    # SIGUSR1 (logrotate) while the disk fails: reopen() syncs the old file first; the
    # failed sync made the events process read again from its cursors, but the log was
    # left closed (fd -1, as if no event_log were configured): every later write and sync
    # did nothing, the cursors moved on, and the events were missing from the log.
    import errno

    import pytest

    from mta.obs import events as ev
    p = tmp_path / "events.jsonl"
    log = new_log(p, rotate_bytes=1 << 30)
    log.write(batch(0, 2))
    log.sync()
    real = os.fdatasync

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(ev.os, "fdatasync", eio)
    with pytest.raises(OSError):
        log.reopen()
    monkeypatch.setattr(ev.os, "fdatasync", real)
    log.write(batch(2, 3))          # the disk works again: read again from the cursors
    log.sync()
    log.close()
    assert [e["event_id"] for e in lines(p)] == [str(i) for i in range(5)]


def test_a_failed_sync_cuts_the_log_back_to_its_last_synced_line(tmp_path, monkeypatch):
    # After fdatasync fails (EIO) the kernel may have dropped the written pages while the
    # file keeps its size; the events process writes those events again from its cursors.
    # Appended after the lost stretch, they followed octets that are zeros on disk once a
    # later sync succeeds, glued to the first event written again (a line no reader can
    # parse), and the page cache held every one of them twice.  Cut back to what the last
    # good sync covered, each event is there once, each on its own line.
    import errno

    import pytest

    from mta.obs import events as ev
    p = tmp_path / "events.jsonl"
    log = new_log(p, rotate_bytes=1 << 30)
    log.write(batch(0, 2))
    log.sync()
    log.write(batch(2, 2))
    real = os.fdatasync

    def eio(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(ev.os, "fdatasync", eio)
    with pytest.raises(OSError):
        log.sync()
    monkeypatch.setattr(ev.os, "fdatasync", real)
    log.write(batch(2, 2))          # read again from the cursors
    log.sync()
    log.close()
    assert [e["event_id"] for e in lines(p)] == [str(i) for i in range(4)]
