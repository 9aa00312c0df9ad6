"""What revision of the mta runs: the checkout's HEAD, or --mta-head's copy of it."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .common import REPO


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
        tar.extractall(dst, filter="data")


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

