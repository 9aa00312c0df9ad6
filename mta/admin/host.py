"""What the kernel says about the host, read at scrape time by the admin process.

- The spool's block device: its ``st_dev`` (major:minor) looked up in
  ``/proc/diskstats``.  A file system with no block device of its own (major 0:
  overlayfs, btrfs subvolumes) is followed through ``/proc/self/mountinfo``: the
  mount's source when it is a device node, an overlay's ``upperdir``.  Fields
  of ``/proc/diskstats`` (Documentation/admin-guide/iostats.rst): reads
  completed, sectors read (512 bytes each), writes completed, sectors written,
  I/Os in progress, milliseconds spent doing I/O, weighted milliseconds.
- TCP: ``/proc/net/snmp`` (Tcp:) and ``/proc/net/netstat`` (TcpExt:), each a
  header line of names followed by a line of values.
- A process: ``/proc/<pid>/stat`` (utime, stime in clock ticks; rss in pages).

Every reader returns None or an empty result when the file is missing or
unreadable (not Linux, a container without /proc/diskstats): the families are
then left out, never made up.
"""
from __future__ import annotations

import os

SECTOR = 512
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_stat(pid: int) -> tuple[float, int] | None:
    """(CPU seconds user + system, resident bytes) of *pid*, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text.rpartition(b")")[2].split()
    try:
        utime, stime = int(fields[11]), int(fields[12])
        rss = int(fields[21])
    except (IndexError, ValueError):
        return None
    return (utime + stime) / _TICKS, rss * _PAGE


def _mountinfo_source(major: int, minor: int) -> tuple[str, str, str] | None:
    """(fstype, source, super options) of the mount whose device is major:minor."""
    want = f"{major}:{minor}"
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                head, sep, tail = line.partition(" - ")
                parts = head.split()
                if sep and len(parts) > 2 and parts[2] == want:
                    t = tail.split()
                    if len(t) >= 3:
                        return t[0], t[1], t[2]
    except OSError:
        pass
    return None


def _in_diskstats(major: int, minor: int) -> str | None:
    try:
        with open("/proc/diskstats") as fh:
            for line in fh:
                f = line.split()
                if len(f) > 3 and f[0] == str(major) and f[1] == str(minor):
                    return f[2]
    except OSError:
        pass
    return None


def device_of(path: str) -> tuple[int, int, str] | None:
    """(major, minor, name in /proc/diskstats) of the block device holding *path*, or None."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    for _ in range(3):      # a device node, or an overlay's upper directory, at most twice
        major, minor = os.major(dev), os.minor(dev)
        name = _in_diskstats(major, minor)
        if name is not None:
            return major, minor, name
        src = _mountinfo_source(major, minor)
        if src is None:
            return None
        fstype, source, opts = src
        try:
            if source.startswith("/dev/"):
                dev = os.stat(source).st_rdev
                continue
            if fstype == "overlay":
                upper = next((o[len("upperdir="):] for o in opts.split(",")
                              if o.startswith("upperdir=")), None)
                if upper:
                    dev = os.stat(upper).st_dev
                    continue
        except OSError:
            return None
        return None
    return None


def diskstats(major: int, minor: int) -> dict | None:
    """The counters of one device in /proc/diskstats (bytes and seconds), or None."""
    try:
        with open("/proc/diskstats") as fh:
            for line in fh:
                f = line.split()
                if len(f) >= 14 and f[0] == str(major) and f[1] == str(minor):
                    v = [int(x) for x in f[3:14]]
                    return {"reads": v[0], "read_bytes": v[2] * SECTOR, "writes": v[4],
                            "written_bytes": v[6] * SECTOR, "in_progress": v[8],
                            "io_seconds": v[9] / 1000.0, "weighted_seconds": v[10] / 1000.0}
    except (OSError, ValueError):
        pass
    return None


def _table(path: str, prefix: str) -> dict[str, int]:
    """The name -> value pairs of the *prefix* lines of /proc/net/snmp or netstat."""
    try:
        with open(path) as fh:
            lines = [x.split() for x in fh if x.startswith(prefix + ":")]
    except OSError:
        return {}
    out = {}
    for names, values in zip(lines[0::2], lines[1::2]):
        for k, v in zip(names[1:], values[1:]):
            try:
                out[k] = int(v)
            except ValueError:
                pass
    return out


def tcp() -> dict[str, int]:
    """Tcp: and TcpExt: counters of the host's network namespace (empty if unreadable)."""
    out = _table("/proc/net/snmp", "Tcp")
    out.update(_table("/proc/net/netstat", "TcpExt"))
    return out


def free_space(path: str) -> tuple[int, int] | None:
    """(bytes available to unprivileged users, file system size) at *path*, or None."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
