"""A FUSE file system that loses, at a simulated power cut, everything not yet synced.

Run as a process of its own (``python crashfs.py MOUNTPOINT IMAGE``); the tests
drive it with :class:`CrashFS`.  It mounts an in-memory tree at MOUNTPOINT,
loaded from the pickled IMAGE when that file exists.  When it is unmounted
(SIGTERM: libfuse unmounts and the loop returns) it writes to IMAGE only what
a power cut at that moment would have left on disk, and exits.  Mounting
again on that image is the machine coming back up.

What is durable (the guarantees POSIX and ext4 give, and nothing more):

- **File contents and size** become durable at ``fsync`` or ``fdatasync`` of
  that file: the whole of the file as it is at that moment (ext4's fdatasync
  persists the data and the size needed to read it back).  Writes, truncations
  and extensions since the last sync of the file are lost at a crash, wherever
  they are in the file and whichever descriptor or name made them.  Closing a
  file makes nothing durable.  Contents belong to the inode: a hard link or a
  rename shares them.
- **Directory entries** (create, mkdir, link, rename, unlink, rmdir) become
  durable at ``fsync`` of the directory that holds them, all of that
  directory's entries at once; a rename across two directories needs both.
  An entry made durable keeps pointing at its inode, whose contents are
  whatever that inode had synced (empty for a file created and never synced).
  A directory is reachable after a crash only through durable entries from
  the root: a subdirectory whose own entry was never synced in its parent is
  gone with all it holds, however often its contents were synced.
- A crash discards everything else, all of it (not a random part of it: torn
  writes are not modelled; the spool's checksums are tested elsewhere).
  Metadata (mode, times, owner) is not modelled: it survives as it is.

The kernel's caches never hold a write back from this process (FUSE without
writeback caching sends every write here at once), and an unmount drops them,
so what the next mount shows is exactly the image.

Error injection: while the file IMAGE + ".fail" exists and names ``write``
and/or ``fsync`` (whitespace-separated), those operations fail with EIO and
change nothing (:meth:`CrashFS.fail`); the file is read at every such call.
"""
from __future__ import annotations

import errno
import os
import pickle
import signal
import stat
import subprocess
import sys
import time

BLOCK = 4096
CAPACITY = 4 << 30          # what statvfs reports: plenty, so no free-space check trips


class Node:
    """An inode: a regular file (data) or a directory (entries), with its durable twin."""

    __slots__ = ("is_dir", "mode", "data", "synced", "entries", "durable", "mtime")

    def __init__(self, is_dir: bool, mode: int):
        self.is_dir = is_dir
        self.mode = mode
        self.mtime = time.time()
        if is_dir:
            self.entries: dict[str, Node] = {}
            self.durable: dict[str, Node] = {}   # the entries as of the last directory fsync
            self.data = self.synced = None
        else:
            self.data = bytearray()
            self.synced = b""                    # the contents as of the last fsync/fdatasync
            self.entries = self.durable = None


def after_crash(root: Node) -> Node:
    """The tree a power cut leaves: from the root, durable entries and synced contents only."""
    made: dict[int, Node] = {}

    def copy(old: Node) -> Node:
        new = made.get(id(old))
        if new is not None:
            return new   # a second hard link to the same inode
        new = made[id(old)] = Node(old.is_dir, old.mode)
        new.mtime = old.mtime
        if old.is_dir:
            new.entries = {name: copy(child) for name, child in old.durable.items()}
            new.durable = dict(new.entries)
        else:
            new.synced = bytes(old.synced)
            new.data = bytearray(new.synced)
        return new

    return copy(root)


def _nlink(root: Node) -> dict[int, int]:
    counts: dict[int, int] = {}
    stack = [root]
    seen = set()
    while stack:
        d = stack.pop()
        if id(d) in seen:
            continue
        seen.add(id(d))
        for child in d.entries.values():
            counts[id(child)] = counts.get(id(child), 0) + 1
            if child.is_dir:
                stack.append(child)
    return counts


def operations(root: Node, fail_path: str | None = None):
    """The fusepy Operations over *root* (imported here: the test process needs no fusepy)."""
    from fuse import FuseOSError, Operations

    class CrashOps(Operations):
        use_ns = False

        def __init__(self):
            self.root = root
            self.handles: dict[int, Node] = {}
            self.next_fh = 1

        def _failing(self, op: str) -> bool:
            """True while the error-injection file names *op* (see the module's doc)."""
            if fail_path is None:
                return False
            try:
                with open(fail_path) as fh:
                    return op in fh.read().split()
            except FileNotFoundError:
                return False

        # ------------------------------------------------------------ lookup

        def _split(self, path: str) -> tuple[Node, str]:
            parent, _, name = path.rstrip("/").rpartition("/")
            d = self._node(parent or "/")
            if not d.is_dir:
                raise FuseOSError(errno.ENOTDIR)
            return d, name

        def _node(self, path: str) -> Node:
            n = self.root
            for part in path.split("/"):
                if not part:
                    continue
                if not n.is_dir:
                    raise FuseOSError(errno.ENOTDIR)
                n = n.entries.get(part)
                if n is None:
                    raise FuseOSError(errno.ENOENT)
            return n

        def _handle(self, n: Node) -> int:
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = n
            return fh

        def _file(self, path, fh) -> Node:
            n = self.handles.get(fh) if fh else None
            return n if n is not None else self._node(path)

        # --------------------------------------------------------- attributes

        def getattr(self, path, fh=None):
            n = self._file(path, fh)
            if n.is_dir:
                return {"st_mode": stat.S_IFDIR | n.mode, "st_nlink": 2, "st_size": BLOCK,
                        "st_mtime": n.mtime, "st_ctime": n.mtime, "st_atime": n.mtime,
                        "st_blocks": 8}
            size = len(n.data)
            return {"st_mode": stat.S_IFREG | n.mode, "st_size": size,
                    "st_nlink": max(1, self.links.get(id(n), 1)),
                    "st_mtime": n.mtime, "st_ctime": n.mtime, "st_atime": n.mtime,
                    "st_blocks": (size + 511) // 512}

        @property
        def links(self) -> dict[int, int]:
            return _nlink(self.root)

        def chmod(self, path, mode):
            self._node(path).mode = stat.S_IMODE(mode)
            return 0

        def chown(self, path, uid, gid):
            return 0

        def utimens(self, path, times=None):
            self._node(path).mtime = times[1] if times else time.time()
            return 0

        def access(self, path, amode):
            self._node(path)
            return 0

        def statfs(self, path):
            used = 0
            stack = [self.root]
            seen = set()
            while stack:
                d = stack.pop()
                for child in d.entries.values():
                    if id(child) in seen:
                        continue
                    seen.add(id(child))
                    if child.is_dir:
                        stack.append(child)
                    else:
                        used += (len(child.data) + BLOCK - 1) // BLOCK
            blocks = CAPACITY // BLOCK
            return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": blocks,
                    "f_bfree": blocks - used, "f_bavail": blocks - used,
                    "f_files": 1 << 20, "f_ffree": 1 << 20, "f_favail": 1 << 20,
                    "f_namemax": 255}

        # -------------------------------------------------------- directories

        def readdir(self, path, fh):
            return [".", ".."] + list(self._node(path).entries)

        def opendir(self, path):
            n = self._node(path)
            if not n.is_dir:
                raise FuseOSError(errno.ENOTDIR)
            return self._handle(n)

        def releasedir(self, path, fh):
            self.handles.pop(fh, None)
            return 0

        def fsyncdir(self, path, datasync, fh):
            d = self._file(path, fh)
            d.durable = dict(d.entries)
            return 0

        def mkdir(self, path, mode):
            d, name = self._split(path)
            if name in d.entries:
                raise FuseOSError(errno.EEXIST)
            d.entries[name] = Node(True, stat.S_IMODE(mode))
            d.mtime = time.time()
            return 0

        def rmdir(self, path):
            d, name = self._split(path)
            n = d.entries.get(name)
            if n is None:
                raise FuseOSError(errno.ENOENT)
            if not n.is_dir:
                raise FuseOSError(errno.ENOTDIR)
            if n.entries:
                raise FuseOSError(errno.ENOTEMPTY)
            del d.entries[name]
            return 0

        def unlink(self, path):
            d, name = self._split(path)
            n = d.entries.get(name)
            if n is None:
                raise FuseOSError(errno.ENOENT)
            if n.is_dir:
                raise FuseOSError(errno.EISDIR)
            del d.entries[name]   # open handles keep the inode
            d.mtime = time.time()
            return 0

        def link(self, target, source):
            n = self._node(source)
            if n.is_dir:
                raise FuseOSError(errno.EPERM)
            d, name = self._split(target)
            if name in d.entries:
                raise FuseOSError(errno.EEXIST)
            d.entries[name] = n
            return 0

        def rename(self, old, new):
            od, oname = self._split(old)
            nd, nname = self._split(new)
            n = od.entries.get(oname)
            if n is None:
                raise FuseOSError(errno.ENOENT)
            there = nd.entries.get(nname)
            if there is n:
                return 0
            if there is not None:
                if there.is_dir != n.is_dir:
                    raise FuseOSError(errno.EISDIR if there.is_dir else errno.ENOTDIR)
                if there.is_dir and there.entries:
                    raise FuseOSError(errno.ENOTEMPTY)
            del od.entries[oname]
            nd.entries[nname] = n
            return 0

        def symlink(self, target, source):
            raise FuseOSError(errno.EPERM)

        def mknod(self, path, mode, dev):
            raise FuseOSError(errno.EPERM)

        # -------------------------------------------------------------- files

        def create(self, path, mode, fi=None):
            d, name = self._split(path)
            n = d.entries.get(name)
            if n is None:
                n = d.entries[name] = Node(False, stat.S_IMODE(mode))
                d.mtime = time.time()
            return self._handle(n)

        def open(self, path, flags):
            n = self._node(path)
            if flags & os.O_TRUNC:
                del n.data[:]
            return self._handle(n)

        def release(self, path, fh):
            self.handles.pop(fh, None)
            return 0

        def flush(self, path, fh):
            return 0   # close() makes nothing durable

        def read(self, path, size, offset, fh):
            n = self._file(path, fh)
            return bytes(n.data[offset:offset + size])

        def write(self, path, data, offset, fh):
            n = self._file(path, fh)
            if self._failing("write"):
                raise FuseOSError(errno.EIO)
            end = offset + len(data)
            if len(n.data) < offset:
                n.data.extend(bytes(offset - len(n.data)))
            n.data[offset:end] = data
            n.mtime = time.time()
            return len(data)

        def truncate(self, path, length, fh=None):
            n = self._file(path, fh)
            if length < len(n.data):
                del n.data[length:]
            else:
                n.data.extend(bytes(length - len(n.data)))
            return 0

        def fsync(self, path, datasync, fh):
            n = self._file(path, fh)
            if self._failing("fsync"):
                raise FuseOSError(errno.EIO)
            n.synced = bytes(n.data)   # contents and size (ext4's fdatasync persists both)
            return 0

    return CrashOps()


def serve(mountpoint: str, image: str) -> None:
    """Mount the tree of *image* (empty if there is none); at unmount write what a crash
    leaves to *image*."""
    from fuse import FUSE

    if os.path.exists(image):
        with open(image, "rb") as fh:
            root = pickle.load(fh)
    else:
        root = Node(True, 0o755)
    ops = operations(root, image + ".fail")
    # -f foreground, -s one thread (no locking needed), big_writes: up to 128 KiB a write.
    FUSE(ops, mountpoint, foreground=True, nothreads=True, big_writes=True,
         fsname="crashfs")
    tmp = image + ".tmp"
    with open(tmp, "wb") as fh:
        pickle.dump(after_crash(ops.root), fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, image)


class CrashFS:
    """A crashfs process mounted on *mountpoint*; :meth:`crash` cuts the power and remounts."""

    def __init__(self, mountpoint: str, image: str, log: str):
        self.mountpoint = mountpoint
        self.image = image
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.crashes = 0
        os.makedirs(mountpoint, exist_ok=True)

    def mount(self, timeout: float = 30.0) -> None:
        assert not os.path.ismount(self.mountpoint), f"{self.mountpoint} is already mounted"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                          self.mountpoint, self.image],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"crashfs exited {self.proc.returncode}:\n{self._log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"crashfs not mounted after {timeout}s:\n{self._log()}")
            time.sleep(0.02)

    def unmount(self, timeout: float = 60.0) -> None:
        """Unmount (every user of the file system must be gone) and keep the crash image."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # libfuse unmounts and returns
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code, self.proc = self.proc.returncode, None
        if os.path.ismount(self.mountpoint):
            subprocess.run(["fusermount", "-u", "-z", self.mountpoint], check=False)
        assert code == 0, f"crashfs exited {code}:\n{self._log()}"

    def fail(self, *ops: str) -> None:
        """From now on, *ops* ("write", "fsync") fail with EIO; none: all work again."""
        path = self.image + ".fail"
        if not ops:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        with open(path + ".tmp", "w") as fh:
            fh.write(" ".join(ops) + "\n")
        os.replace(path + ".tmp", path)

    def crash(self) -> None:
        """Power cut: drop all that was not synced, then mount what is left."""
        self.unmount()
        self.crashes += 1
        self.mount()

    def _log(self) -> str:
        try:
            with open(self.log, "rb") as fh:
                return fh.read()[-4000:].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


if __name__ == "__main__":
    # Through the module, so that the image pickles crashfs.Node, not __main__.Node.
    import crashfs
    crashfs.serve(sys.argv[1], sys.argv[2])
