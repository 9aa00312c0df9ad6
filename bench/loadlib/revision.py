"""What revision of the mta runs: the checkout's HEAD, --mta-head's copy of it, and
--mta-base's tree of another revision with its own compiled extensions (built once per
revision and Python, cached under bench/.cache/)."""
from __future__ import annotations

import datetime
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .common import REPO

BASE_CACHE = REPO / "bench" / ".cache" / "mta-base"   # gitignored
BUILD_TIMEOUT_S = 1200.0


def git(*cmd: str) -> str:
    """Output of a read-only git command in this repository ("" if git fails)."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.decode(errors="replace").strip() if r.returncode == 0 else ""


def git_archive(rev: str, dst: Path, *paths: str) -> None:
    """Extract rev's tree (or only paths of it) into the new directory dst; exit on failure."""
    r = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, *paths],
                       capture_output=True, timeout=120)
    if r.returncode != 0:
        sys.exit(f"load.py: git archive failed: {r.stderr.decode(errors='replace')}")
    dst.mkdir()
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        # The "data" filter where tarfile has it (3.11.4+; Debian 12's 3.11.2 has not):
        # the archive is this repository's own tree either way.
        tar.extractall(dst, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


def snapshot_head_mta(dst: Path) -> str:
    """--mta-head: extract HEAD's mta/ (git archive, read-only) into dst, add this checkout's
    compiled extensions; return HEAD's short hash."""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        sys.exit("load.py: --mta-head: cannot read HEAD with git")
    git_archive("HEAD", dst, "mta")
    built = sorted((REPO / "mta" / "_ext").glob("*.so"))
    if not built:
        sys.exit("load.py: --mta-head: no compiled extensions in mta/_ext (build them first)")
    if git("--no-optional-locks", "status", "--porcelain", "--", "mta/_pure",
           "mta/_ext/__init__.py"):
        print("warning: mta/_pure has uncommitted changes; the compiled extensions copied for "
              "--mta-head may not match HEAD", file=sys.stderr)
    for so in built:
        shutil.copy2(so, dst / "mta" / "_ext" / so.name)
    return head


def source_revision() -> str:
    """The repository's HEAD and whether mta/ has uncommitted changes (read-only git)."""
    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    dirty = git("--no-optional-locks", "status", "--porcelain", "--", "mta")
    return head + (" with uncommitted changes in mta/" if dirty else "")


def build_base(rev: str) -> tuple[Path, str, str]:
    """--mta-base REV: REV's mta/ package with REV's own ext/*.pyx compiled into its mta/_ext;
    return the directory holding it, REV's short hash and its subject.

    The build is made once per (commit, Python) in BASE_CACHE, under a lock so that two
    harnesses never build into each other; each invocation copies it (copy_base), so the
    cache stays as built."""
    full = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if not full:
        sys.exit(f"load.py: --mta-base {rev}: not a commit of {REPO}")
    short = git("rev-parse", "--short", full)
    subject = git("log", "-1", "--format=%s", full)
    cached = BASE_CACHE / f"{full}-{sys.implementation.cache_tag}"
    BASE_CACHE.mkdir(parents=True, exist_ok=True)
    with open(BASE_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (cached / "BUILT").exists():
            print(f"mta-base: {short} from the cached build {cached}")
        else:
            _build(full, short, cached)
    return cached, short, subject


def copy_base(cached: Path, dst: Path) -> None:
    """Copy a build_base() result's mta/ into the new directory dst (the daemon's source)."""
    dst.mkdir()
    shutil.copytree(cached / "mta", dst / "mta", ignore=shutil.ignore_patterns("__pycache__"))


def _build(full: str, short: str, cached: Path) -> None:
    """Archive commit full into a scratch directory, compile its extensions in place, and
    move its mta/ to cached (marked complete by cached/BUILT, written last)."""
    print(f"mta-base: building {short} (git archive, setup.py build_ext --inplace) ...",
          flush=True)
    work = BASE_CACHE / f".build-{full[:12]}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(cached, ignore_errors=True)
    try:
        git_archive(full, work)
        pyx = sorted((work / "ext").glob("*.pyx"))
        if pyx:
            try:
                r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"],
                                   cwd=work, stdin=subprocess.DEVNULL, capture_output=True,
                                   timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                sys.exit(f"load.py: --mta-base: building {short}'s extensions took more than "
                         f"{BUILD_TIMEOUT_S:.0f} s")
            if r.returncode != 0:
                out = (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()
                sys.exit(f"load.py: --mta-base: building {short}'s extensions failed "
                         f"({r.returncode}):\n" + "\n".join(out[-30:]))
        missing = [p.stem for p in pyx if not list((work / "mta" / "_ext").glob(p.stem + ".*.so"))]
        if missing:
            sys.exit(f"load.py: --mta-base: {short}'s build made no module for {missing}")
        cached.mkdir()
        (work / "mta").rename(cached / "mta")
        (cached / "BUILT").write_text(
            f"{full}\nmta/ of git archive {full}, ext/ compiled in place: "
            f"{', '.join(p.name for p in pyx) or 'no extensions'}\n"
            f"Python {sys.version.split()[0]}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"mta-base: built {short} into {cached}", flush=True)
