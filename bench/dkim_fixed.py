#!/usr/bin/env python3
"""What DKIM signing adds per message at one fixed offered rate (issue 15, item 5).

    unshare --net sh -c 'ip link set lo up; python bench/dkim_fixed.py --rate 400 \\
        --duration 30 --pairs 3 [--json out.json]'

Each run starts the mta (its defaults: one acceptor per 2 CPUs, one shard) with HTTP and a
static route for every domain to Postfix's smtp-sink, posts single-recipient 2 KB
transmissions (bench/http_load.py's body, From news@example.com) at exactly --rate per
second with bench/fixed_rate.py (open loop, 64 keep-alive connections) after a 5 s warm-up,
waits until every message is delivered, and divides the mta process tree's CPU
(utime+stime, /proc) over that window by the messages.  "on" adds a ``[dkim]`` RSA key
(--bits) for example.com: one signature per message, in the acceptor.  Runs go in pairs,
the order alternating (off/on, on/off, ...).

With --phases, one mta (with the key) serves every pair: its load alternates between
mail From example.com (signed) and From example.org (no key: unsigned), a window each,
every window waiting until its messages are delivered.  The pairs then differ only in
signing, not in a daemon's start, its warm-up or where its files landed, so more pairs fit
in the same time and their spread is smaller.

Signing's cost is compared with three figures of the bare private-key operation:
  - ``openssl speed rsaBITS`` (a tight loop in OpenSSL; before and after the pairs);
  - ``cryptography``'s sign call in this process, in a tight loop and paced at --rate (the
    same call the signer makes, run once every 1/rate s: a CPU that idles between calls
    runs it colder and slower, see bench/RESULTS.md);
  - in place: ``mta_dkim_key_cpu_seconds_total`` / ``mta_dkim_signatures_total`` of the
    "on" run itself, the key operations' CPU time in the signing acceptor as it ran.
Prints one line per run and a summary; loopback only (the URL, the route, the sink);
bounded: every wait has a timeout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadlib.common import CLK_TCK, LOOPBACK, free_port  # noqa: E402
from loadlib.procs import process_tree, run_group, start_mta, stop_child  # noqa: E402
from loadlib.targets.sink import sink_alive, start_smtp_sink  # noqa: E402

DRAIN_TIMEOUT_S = 60


def openssl_sign_ms(bits: int) -> float:
    out = subprocess.run(["openssl", "speed", "-seconds", "3", f"rsa{bits}"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith(f"rsa {bits} bits"):
            return float(line.split()[3].rstrip("s")) * 1000
    raise RuntimeError("openssl speed printed no rsa line")


def bare_sign_ms(key_file: Path, rate: float, n: int) -> float:
    """Median thread-CPU ms of cryptography's RSA PKCS#1 v1.5 SHA-256 sign, in a tight loop
    (rate 0) or once every 1/rate seconds."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    data = b"x" * 400
    times = []
    next_t = time.perf_counter()
    for _ in range(n):
        if rate:
            next_t += 1 / rate
            time.sleep(max(0.0, next_t - time.perf_counter()))
        t = time.thread_time()
        key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        times.append(time.thread_time() - t)
    return statistics.median(times) * 1000


def metrics(port: int) -> dict:
    """{(name, labels text): value} of the admin listener's /metrics (no parser needed for
    the few plain samples read here)."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            out[name] = float(v)
    return out


def delivered(m: dict) -> float:
    return m.get('mta_delivery_outcomes_total{result="delivered"}', 0.0)


def roles(root: int) -> dict[int, str]:
    out = {}
    for pid in process_tree(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        out[pid] = title[5:] if title.startswith("mta: ") else title
    return out


def cpu_by_role(root: int) -> dict[str, float]:
    names = roles(root)
    out: dict[str, float] = {}
    for pid, (_ppid, _start, ticks) in process_tree(root).items():
        role = names.get(pid, "?").split("[")[0]
        out[role] = out.get(role, 0.0) + ticks / CLK_TCK
    return out


SIGNED_FROM = "news@example.com"       # the domain of the [dkim] key
UNSIGNED_FROM = "news@example.org"     # no key, no fallback: not signed


class Mta:
    """One mta (HTTP, a route for every domain to smtp-sink) under fixed-rate load."""

    def __init__(self, args, d: Path, key_file: Path, signing: bool):
        self.args = args
        self.d = d
        self.key_file = key_file
        self.signing = signing

    def __enter__(self) -> "Mta":
        d = self.d
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        self.mta = self.log = None
        sink_port, self.sink = start_smtp_sink(d / "sink.out")
        try:
            http_port, smtp_port, self.admin_port = free_port(), free_port(), free_port()
            conf = (f'[server]\nstate_dir = "{d / "state"}"\nhostname = "mta.bench"\n\n'
                    f'[smtp]\nlisten = ["{LOOPBACK}:{smtp_port}"]\n\n'
                    f'[http]\nlisten = ["{LOOPBACK}:{http_port}"]\n\n'
                    f'[admin]\nlisten = ["{LOOPBACK}:{self.admin_port}"]\n\n'
                    f'[delivery]\nhold = false\n[[delivery.route]]\ndomain = "*"\n'
                    f'hosts = ["{LOOPBACK}:{sink_port}"]\n')
            if self.signing:
                conf += (f'\n[dkim]\nenabled = true\n[[dkim.keys]]\ndomain = "example.com"\n'
                         f'selector = "bench"\nkey_file = "{self.key_file}"\n')
            (d / "mta.toml").write_text(conf)
            self.mta, self.log = start_mta(d / "mta.toml", d, d / "mta.log")
            sink_alive(self.sink, d / "sink.out")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.url = f"http://{LOOPBACK}:{http_port}/api/v1/transmissions"
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.mta is not None:
                stop_child(self.mta)
        finally:
            stop_child(self.sink)
            if self.log is not None:
                self.log.close()

    def _load(self, seconds: float, sender: str) -> dict:
        """fixed_rate.py at --rate for *seconds*, From *sender*; its JSON figures."""
        out = self.d / "fr.json"
        cmd = [sys.executable, str(HERE / "fixed_rate.py"), "--url", self.url, "--rate",
               str(self.args.rate), "--connections", "64", "--from", sender,
               "--duration", str(seconds), "--json", str(out)]
        run_group(cmd, seconds + 120, check=True)
        return json.loads(out.read_text())

    def _settled(self, want: float) -> dict:
        """The metrics once *want* messages in all are delivered (bounded wait)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            m = metrics(self.admin_port)
            if delivered(m) >= want or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def warm(self, sender: str) -> None:
        """5 s of load from *sender*, every message of it delivered before what follows."""
        before = delivered(metrics(self.admin_port))
        n = self._load(5, sender)["completed"]
        if delivered(self._settled(before + n)) < before + n:
            raise RuntimeError(f"the {n} warm-up messages were not all delivered in time")

    def window(self, sender: str) -> dict:
        """One measured load from *sender*: the tree's CPU per message, until all delivered."""
        base = metrics(self.admin_port)
        cpu0 = cpu_by_role(self.mta.pid)
        fr = self._load(self.args.duration, sender)
        n = fr["completed"]
        m = self._settled(delivered(base) + n)
        cpu1 = cpu_by_role(self.mta.pid)
        got = delivered(m) - delivered(base)
        if got < n:
            raise RuntimeError(f"only {got:.0f} of {n} messages delivered in time")
        per = {r: (cpu1[r] - cpu0.get(r, 0.0)) * 1000 / n for r in cpu1}

        def delta(name: str) -> float:
            return m.get(name, 0) - base.get(name, 0)
        # The acceptors push their counters every second or so: a window's deltas may
        # hold a few signatures of the window before it. A window is signed if it is
        # mail From the key's domain, and the counters must agree (all but a tenth).
        sigs = delta("mta_dkim_signatures_total")
        signed = self.signing and sender == SIGNED_FROM
        if (sigs < 0.9 * n) if signed else (sigs > 0.1 * n):
            raise RuntimeError(f"{sigs:.0f} signatures counted for {n} messages From "
                               f"{sender}: the window is not what it should be")
        return {"dkim": signed, "sender": sender, "messages": n,
                "achieved": fr["achieved_per_second"], "p99_ms": fr["p99_ms"],
                "non_2xx": fr["non_2xx"], "tree_ms": sum(per.values()),
                "acceptor_ms": per.get("acceptor", 0.0), "per_role_ms": per,
                # per signature counted (one per signed message)
                "key_ms_per_sig": (delta("mta_dkim_key_cpu_seconds_total") * 1000 / sigs
                                   if signed else None),
                "signing_ms_per_sig": (delta("mta_dkim_signing_cpu_seconds_total") * 1000
                                       / sigs if signed else None),
                "signatures": sigs}


def run_once(args, work: Path, key_file: Path, signing: bool) -> dict:
    """A fresh mta, with or without the [dkim] key: warm-up, then one measured load."""
    with Mta(args, work / ("on" if signing else "off"), key_file, signing) as mta:
        mta.warm(SIGNED_FROM)
        return mta.window(SIGNED_FROM)


def run_phases(args, work: Path, key_file: Path, pairs: int) -> list[dict]:
    """One mta with the [dkim] key; its load alternates between mail From the key's domain
    (signed) and From a domain without a key (unsigned), *pairs* times each."""
    runs = []
    with Mta(args, work / "phases", key_file, True) as mta:
        mta.warm(UNSIGNED_FROM)
        mta.warm(SIGNED_FROM)
        for i in range(pairs):
            for sender in ((UNSIGNED_FROM, SIGNED_FROM) if i % 2 == 0
                           else (SIGNED_FROM, UNSIGNED_FROM)):
                runs.append(mta.window(sender))
                report(i, runs[-1])
    return runs


def report(i: int, r: dict) -> None:
    signing = r["dkim"]
    extra = (f" key op in place {r['key_ms_per_sig']:.3f} ms/signature, signing "
             f"{r['signing_ms_per_sig']:.3f} ms/signature" if signing else "")
    print(f"pair {i + 1} dkim {'on ' if signing else 'off'}: {r['achieved']:.0f} msgs/s,"
          f" p99 {r['p99_ms']:.1f} ms, tree {r['tree_ms']:.3f} ms/msg, acceptor "
          f"{r['acceptor_ms']:.3f}{extra}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=400.0, help="messages per second offered")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per measured run")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--phases", action="store_true",
                   help="one mta for all pairs, its load alternating between mail it signs "
                        "and mail it does not (From a domain without a key)")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (the daemons' state and logs)")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.duration > 600 or args.pairs < 1 or args.pairs > 40:
        p.error("--duration must be in (0, 600] s and --pairs in 1..40")
    work = Path(tempfile.mkdtemp(prefix="dkim-fixed-", dir=args.workdir))
    try:
        return measure(args, work)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)   # each run's spool: up to ~1 GB


def measure(args, work: Path) -> int:
    """The runs, the bare key operation's figures and the report, in *work*."""
    key_file = work / f"rsa{args.bits}.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key_file), str(args.bits)], check=True,
                   capture_output=True)
    bare = {"openssl_before_ms": openssl_sign_ms(args.bits)}
    if args.phases:
        runs = run_phases(args, work, key_file, args.pairs)
    else:
        runs = []
        for i in range(args.pairs):
            for signing in ((False, True) if i % 2 == 0 else (True, False)):
                runs.append(run_once(args, work, key_file, signing))
                report(i, runs[-1])
    bare["cryptography_tight_ms"] = bare_sign_ms(key_file, 0, 2000)
    bare["cryptography_paced_ms"] = bare_sign_ms(key_file, args.rate, int(args.rate * 5))
    bare["openssl_after_ms"] = openssl_sign_ms(args.bits)
    print("bare sign: openssl speed {openssl_before_ms:.3f} / {openssl_after_ms:.3f} ms "
          "(before / after); cryptography tight {cryptography_tight_ms:.3f} ms, paced at the "
          "same rate {cryptography_paced_ms:.3f} ms".format(**bare))
    pairs = []
    for i in range(args.pairs):
        off, on = sorted(runs[2 * i: 2 * i + 2], key=lambda r: r["dkim"])
        add_tree = on["tree_ms"] - off["tree_ms"]
        add_acc = on["acceptor_ms"] - off["acceptor_ms"]
        pairs.append({"adds_tree_ms": add_tree, "adds_acceptor_ms": add_acc,
                      "key_in_place_ms": on["key_ms_per_sig"]})
        print(f"pair {i + 1}: signing adds {add_tree:.3f} ms (tree), {add_acc:.3f} ms "
              f"(acceptor); / key op in place {add_tree / on['key_ms_per_sig']:.2f}x")
    mean_add = statistics.mean(x["adds_tree_ms"] for x in pairs)
    mean_key = statistics.mean(x["key_in_place_ms"] for x in pairs)
    openssl = (bare["openssl_before_ms"] + bare["openssl_after_ms"]) / 2
    print(f"mean: signing adds {mean_add:.3f} ms per message = {mean_add / mean_key:.2f}x the "
          f"key operation in place ({mean_key:.3f} ms), {mean_add / bare['cryptography_paced_ms']:.2f}x"
          f" cryptography's sign paced at {args.rate:.0f}/s, {mean_add / openssl:.2f}x openssl "
          f"speed ({openssl:.3f} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "bare": bare, "runs": runs,
                                               "pairs": pairs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
