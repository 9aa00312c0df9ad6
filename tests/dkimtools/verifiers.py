"""Three independent DKIM verifiers for the tests, none of which touches real DNS.

- dkimpy: ``dkim.DKIM(msg).verify(idx, dnsfunc=...)`` with the public keys
  handed over by a function;
- mailauth 4 (Node): ``tests/js/verify.mjs`` with a resolver function that
  knows only the test keys, run in a network namespace of its own;
- OpenDKIM (Debian's libopendkim through ``opendkim-testmsg``): run in a
  private network namespace where the resolver is an unbound started on
  127.0.0.1 serving the test zone (``nsjob.py``).

Each takes messages as bytes and the TXT records as {name: text}.
"""
import functools
import json
import os
import shutil
import subprocess
import sys

import dkim

HERE = os.path.dirname(os.path.abspath(__file__))
JS_DIR = os.path.join(os.path.dirname(HERE), "js")
# new network + mount namespaces: as root directly, else inside a user namespace
NETNS_CHOICES = (["unshare", "--net", "--mount", "--"],
                 ["unshare", "--user", "--map-root-user", "--net", "--mount", "--"])
RUN_TIMEOUT = 120  # seconds for one batch of messages


class VerifierMissing(RuntimeError):
    """A verifier program is not installed (see tests/setup-deps.d/dkim.sh)."""


def dkimpy_verify(message: bytes, records: dict) -> list:
    """Return [True/False] for every DKIM-Signature of message, top first."""

    def dnsfunc(name, timeout=5):
        return records.get(name.decode().rstrip(".").lower(), "").encode()

    d = dkim.DKIM(message)
    count = sum(1 for name, _v in d.headers if name.lower() == b"dkim-signature")
    out = []
    for i in range(count):
        try:
            out.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:  # dkimpy raises on some failures (body hash)
            out.append(False)
    return out


def _write(messages, workdir, sub):
    folder = os.path.join(workdir, sub)
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, data in messages.items():
        path = os.path.join(folder, name.replace("/", "_") + ".eml")
        with open(path, "wb") as f:
            f.write(data)
        paths[name] = path
    return paths


def _require(program, hint):
    if shutil.which(program) is None:
        raise VerifierMissing(f"{program} is not installed: {hint}")


@functools.lru_cache(maxsize=1)
def netns():
    """The unshare command line that works here (probed once)."""
    _require("unshare", "apt-get install util-linux")
    tried = []
    for cmd in NETNS_CHOICES:
        r = subprocess.run(cmd + ["true"], capture_output=True, timeout=30)
        if r.returncode == 0:
            return cmd
        tried.append(f"{' '.join(cmd)}: {r.stderr.decode(errors='replace').strip()}")
    raise VerifierMissing("cannot create a private network namespace: " + "; ".join(tried))


def mailauth_verify(messages: dict, records: dict, workdir: str, now_ms=None) -> dict:
    """Return {name: [{"result", "comment", "domain", "selector", ...}]} from mailauth."""
    _require("node", "apt-get install nodejs")
    if not os.path.isdir(os.path.join(JS_DIR, "node_modules", "mailauth")):
        raise VerifierMissing("mailauth is not installed: (cd tests/js && npm install)")
    job = {"records": {k.lower(): v for k, v in records.items()},
           "messages": _write(messages, workdir, "mailauth")}
    if now_ms is not None:
        job["now"] = now_ms
    r = subprocess.run(netns() + ["node", os.path.join(JS_DIR, "verify.mjs")],
                       input=json.dumps(job).encode(), capture_output=True,
                       timeout=RUN_TIMEOUT, cwd=JS_DIR)
    if r.returncode != 0:
        raise RuntimeError(f"verify.mjs failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
    return json.loads(r.stdout)


def opendkim_verify(messages: dict, records: dict, workdir: str) -> dict:
    """Return {name: {"rc": exit status, "stderr": text}} from opendkim-testmsg."""
    for program, hint in (("opendkim-testmsg", "apt-get install opendkim-tools"),
                          ("unbound", "apt-get install unbound"),
                          ("unshare", "apt-get install util-linux"),
                          ("ip", "apt-get install iproute2")):
        _require(program, hint)
    job_dir = os.path.join(workdir, "opendkim")
    os.makedirs(job_dir, exist_ok=True)
    job = {"workdir": job_dir, "records": {k.lower(): v for k, v in records.items()},
           "messages": _write(messages, workdir, "opendkim-msgs")}
    job_path = os.path.join(job_dir, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    r = subprocess.run(netns() + [sys.executable, os.path.join(HERE, "nsjob.py"), job_path],
                       capture_output=True, timeout=RUN_TIMEOUT)
    if r.returncode != 0:
        raise RuntimeError(f"nsjob.py failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
    return json.loads(r.stdout)
