"""Upgrade in place with mail queued: an old checkout's ``mta serve`` fills a state directory,
is stopped (kill -9 of its whole tree, or SIGTERM), and this checkout's ``mta serve`` starts on
the same directory and configuration.  Run by hand (it needs an old checkout with its
extensions built), inside a network namespace of its own:

    git worktree add --detach /tmp/old COMMIT
    (cd /tmp/old && /work/main/.venv/bin/python setup.py build_ext --inplace)
    unshare --net sh -c 'ip link set lo up; \\
        /work/main/.venv/bin/python tests/qa/upgrade_check.py /tmp/old --stop kill9'

``--stop upgrade`` tries the zero-downtime path instead: the old daemon runs from a symlink,
which is moved to this checkout before this checkout's ``mta upgrade`` (the new supervisor
must then run this code).  ``--make-fixture OUT.tar.gz`` stops the old daemon and writes its
state for tests/integration/test_upgrade_old_state.py (see tests/integration/fixtures/).

Everything listens on and connects to 127.0.0.1: the receiving server (aiosmtpd,
tests/sinks.py) that every domain is routed to ([[delivery.route]] domain "*", an address,
so no name is resolved) and the webhook receiver (tests/webhooks/receiver.py).

The old daemon gets: an HTTP transmission with a campaign and metadata (recipients
delivered, deferred by the receiver's 451, refused 550, suppressed), an SMTP message with one
recipient delivered and one deferred, an SMTP message deferred whole, a transmission
scheduled (options.start_time) past the switch, a suppression list entry, a webhook created
through the API.  Once its deliveries and deferrals are in its event log, it is stopped; the
receiver then takes everything; the new daemon must deliver each queued recipient exactly once
(and none delivered before again), answer the events API for the old events, keep the
suppression entry and the webhook, push the new events to the webhook, and log no traceback.
Exit status 0 when all of that held; the failures are printed otherwise.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))                      # tests/
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "webhooks"))

from daemon import HOST, REPO, Daemon, free_port, wait_until  # noqa: E402
from receiver import Receiver  # noqa: E402
from sinks import AioSink  # noqa: E402

KEY = "upgrade-key"
SENDER = "news@sender.test"
OK = ["ok-h@a.test", "ok-s@a.test"]
LATER = ["later-h@a.test", "later-h2@b.test", "later-s@a.test", "later-s2@c.test"]
SCHEDULED = ["sched@a.test"]
UNKNOWN = "unknown-h@a.test"
BLOCKED = "blocked@a.test"
IDN = "user@bücher.test"         # the list's canonical form changed (ee18037)


def shaped_events(d: Daemon) -> list[dict]:
    """The event log's SparkPost-shaped events, each event_id once (a log an old version
    began may hold lines of another shape before them: left out)."""
    seen: dict = {}
    for e in d.events_raw():
        if "event_id" in e:
            seen.setdefault(e["event_id"], e)
    return list(seen.values())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def make_fixture(d: Daemon, out: str, old: str, manifest: dict) -> None:
    """A tar.gz of the stopped old daemon's state directory (not its runtime sockets, spare
    segment files, locks) with manifest.json: what tests/test_upgrade_fixture.py reads."""
    import subprocess
    import tarfile
    commit = subprocess.run(["git", "-C", old, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    manifest = {**manifest, "commit": commit}

    def keep(info: tarfile.TarInfo):
        name = os.path.basename(info.name)
        if info.name.startswith("state/run") or name.startswith("spare.") or \
                name in ("writer.lock", "lock.mdb") or name.endswith(("-shm", "-wal")):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info
    with tarfile.open(out, "w:gz") as tar:
        tar.add(d.state_dir, arcname="state", filter=keep)
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    print(f"fixture written: {out} ({os.path.getsize(out)} octets), made by {commit}")


def events_path(tid: str) -> str:
    """The events API query for transmission *tid*, to an hour from now (its default ``to``
    is a minute ago, as SparkPost's)."""
    to = time.strftime("%Y-%m-%dT%H:%M:%S%%2B00:00", time.gmtime(time.time() + 3600))
    return f"/api/v1/events/message?transmissions={tid}&to={to}"


def run(old: str, stop: str, keep: bool, fixture: str = "") -> list[str]:
    failures: list[str] = []
    accept_all = [False]

    def rcpt(sink, address, mail_from):
        if address.startswith("unknown"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if address.startswith("later") and not accept_all[0]:
            return "451 4.3.0 <%s>: try again later" % address
        return None

    tmp = tempfile.mkdtemp(prefix="upgrade-check-")
    sink = AioSink(HOST, free_port(), rcpt=rcpt).start()
    rec = Receiver()
    d = Daemon(tmp, acceptors=1, shards=2,
               http={"api_keys": [KEY]},
               **({"webhooks": {"poll_interval": 0.1}}        # (a version that has them)
                  if os.path.exists(os.path.join(old, "mta", "api", "webhooks.py")) else {}),
               delivery={"hold": False, "time_scale": 0.01, "nameservers": ["127.0.0.1:9"],
                         "route": [{"domain": "*", "starttls": "none",
                                    "hosts": [f"{HOST}:{sink.port}"]}]})
    # "upgrade": the code is "installed" at a symlink that is moved to this checkout
    # before mta upgrade, as a package upgrade replaces the files under a running daemon
    code = os.path.join(tmp, "installed")
    os.symlink(old, code)
    d.env["PYTHONPATH"] = code if stop == "upgrade" else old
    new_pid = 0
    try:
        # ------------------------------------------------------------ the old version
        d.start()
        st, body = d.api("PUT", f"/api/v1/suppression-list/{BLOCKED}",
                         {"type": "non_transactional", "description": "asked to stop"}, KEY)
        assert st == 200, (st, body)
        st, body = d.api("PUT", "/api/v1/suppression-list/" + urllib.parse.quote(IDN),
                         {"type": "non_transactional", "description": "idn"}, KEY)
        assert st == 200, (st, body)
        st, body = d.api("POST", "/api/v1/webhooks",
                         {"name": "crm", "target": rec.url,
                          "events": ["injection", "delivery", "bounce", "delay"]}, KEY)
        # (a version without the webhooks API answers 404: the webhook checks are left out)
        assert st in (200, 404), (st, body)
        wid = body["results"]["id"] if st == 200 else None
        if wid is None:
            print("the old version has no webhooks API: no webhook checked")
        st, _, body = d.post({"campaign_id": "upgrade", "metadata": {"tier": "gold"},
                              "recipients": [{"address": a} for a in
                                             ("ok-h@a.test", "later-h@a.test",
                                              "later-h2@b.test", UNKNOWN, BLOCKED)],
                              "content": {"from": SENDER, "subject": "Before",
                                          "text": "hello"}},
                             headers={"Authorization": KEY})
        assert st == 200, body
        tid = body["results"]["id"]
        start = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 25))
        st, _, body = d.post({"campaign_id": "later", "options": {"start_time": start},
                              "recipients": [{"address": SCHEDULED[0]}],
                              "content": {"from": SENDER, "subject": "Scheduled",
                                          "text": "later"}},
                             headers={"Authorization": KEY})
        assert st == 200, body
        msg = (b"From: news@sender.test\r\nSubject: Over SMTP\r\n"
               b"Message-ID: <upg-1@sender.test>\r\n\r\nhello\r\n")
        d.send(SENDER, ["ok-s@a.test", "later-s@a.test"], msg)
        d.send(SENDER, ["later-s2@c.test"], msg.replace(b"upg-1", b"upg-2"))

        has_events = os.path.exists(os.path.join(old, "mta", "api", "events.py"))

        def settled():
            if not has_events:    # (events of another shape, in the log only)
                replies = {(a, r[:3]) for _, a, r in sink.rcpt_log}
                return {r for _, r, _ in sink.deliveries()} >= set(OK) and \
                    all((a, "451") in replies for a in LATER) and (UNKNOWN, "550") in replies
            evs = shaped_events(d)
            seen = {(e["type"], e.get("rcpt_to")) for e in evs}
            return all(("delivery", a) in seen for a in OK) and \
                all(("delay", a) in seen for a in LATER) and ("bounce", UNKNOWN) in seen
        wait_until(settled, 60, "the old daemon's deliveries and deferrals",
                   details=lambda: d.log()[-3000:])
        if not has_events:
            time.sleep(2.0)       # pacing only: the outcomes the receiver saw are recorded
        if wid:
            wait_until(lambda: any(e["type"] == "delay" for e in rec.events()), 30,
                       "a delay event at the webhook")
        # the events API of the old daemon, for comparison
        old_events = set()
        if has_events:
            st, before = d.api("GET", events_path(tid), key=KEY)
            assert st == 200, (st, before)
            old_events = {e["event_id"] for e in before["results"]}
            assert len(old_events) >= 7, before  # injections, deliveries, delays, bounces
        suppressed_before = {}
        for who in (BLOCKED, UNKNOWN):
            st, body = d.api("GET", f"/api/v1/suppression-list/{who}", key=KEY)
            suppressed_before[who] = st == 200
        assert suppressed_before[BLOCKED], "the suppression entry was not made"
        delivered_before = collections.Counter(r for _, r, _ in sink.deliveries())
        if fixture:
            if d.stop() != 0:
                failures.append("the old daemon's SIGTERM stop did not exit 0")
            make_fixture(d, fixture, old, {"transmission_id": tid, "webhook_id": wid,
                                           "made": time.time()})
            return failures
        if stop == "kill9":
            d.kill9()
        elif stop == "upgrade":
            os.unlink(code)
            os.symlink(REPO, code)
            mark = len(d.log())
            r = d.cli("upgrade", check=False, timeout=180)   # this version's command
            if r.returncode != 0:
                failures.append(f"mta upgrade: {r.returncode} {r.stdout!r} {r.stderr!r}"[:600])
            if d.proc.wait(60) != 0:
                failures.append("the old supervisor did not exit 0 after the upgrade")
            with open(os.path.join(d.state_dir, "run", "mta.pid")) as fh:
                new_pid = int(fh.read().strip())
            with open(f"/proc/{new_pid}/maps") as fh:
                if os.path.join(REPO, "mta", "_ext") not in fh.read():
                    failures.append("the new supervisor does not run this checkout")
        else:
            if d.stop() != 0:
                failures.append("the old daemon's SIGTERM stop did not exit 0")
        # ------------------------------------------------------------ the new version
        accept_all[0] = True
        if stop != "upgrade":
            d.env["PYTHONPATH"] = REPO
            # this version's offline reader on the old spool: every deferred recipient
            dumped = {r for m in d.spool_dump() for r in m["recipients"]}
            if not set(LATER) <= dumped:
                failures.append(f"mta spool-dump of the old spool: {sorted(dumped)}"[:400])
            mark = len(d.log())
            d.start()
        want = set(LATER) | set(SCHEDULED)
        try:
            wait_until(lambda: want <= {r for _, r, _ in sink.deliveries()}, 90,
                       "every queued recipient at the receiver", interval=0.2)
            wait_until(lambda: d.queue_summary()["total"]["messages"] == 0, 30,
                       "an empty queue", interval=0.2)
        except AssertionError as e:
            failures.append(str(e)[:300])
        got = collections.Counter(r for _, r, _ in sink.deliveries())
        for a in OK + LATER + SCHEDULED:
            if got[a] != 1:
                failures.append(f"{a} delivered {got[a]} times "
                                f"({delivered_before[a]} by the old version)")
        for a in (UNKNOWN, BLOCKED):
            if got[a]:
                failures.append(f"{a} delivered {got[a]} times")
        def new_delivery():
            st, body = d.api("GET", events_path(tid), key=KEY)
            done = st == 200 and any(e["type"] == "delivery" and
                                     e.get("rcpt_to") == "later-h@a.test"
                                     for e in body["results"])
            return (st, body) if done or st != 200 else None
        try:
            st, after = wait_until(new_delivery, 30, "the events API to have the new events")
        except AssertionError as e:
            failures.append(str(e)[:300])
            st, after = d.api("GET", events_path(tid), key=KEY)
        if st != 200:
            failures.append(f"events API after the upgrade: {st} {after!r}"[:300])
        else:
            now = {e["event_id"]: e for e in after["results"]}
            if not old_events <= set(now):
                failures.append(f"events API lost {len(old_events - set(now))} old event(s)")
            if not any(e["type"] == "delivery" and e.get("rcpt_to") == "later-h@a.test"
                       for e in now.values()):
                failures.append("events API: no delivery of later-h@a.test after the upgrade")
            for e in now.values():
                if e.get("campaign_id") != "upgrade" or e.get("rcpt_meta", e.get(
                        "metadata", {})).get("tier") != "gold":
                    failures.append(f"event without its campaign/metadata: {e}"[:300])
                    break
        st, body = d.api("GET", f"/api/v1/suppression-list/{BLOCKED}", key=KEY)
        if st != 200:
            failures.append(f"suppression entry lost: {st} {body!r}"[:200])
        # a search by source reads the index rows the old version wrote (52027cc added
        # the source octet to them)
        for source, who in (("Manually%20Added", BLOCKED), ("Bounce%20Rule", UNKNOWN)):
            st, body = d.api("GET", f"/api/v1/suppression-list?sources={source}", key=KEY)
            found = st == 200 and any(x["recipient"] == who for x in body["results"])
            if found != suppressed_before[who]:
                failures.append(f"suppression search by source {source}: {who} "
                                f"{'lost' if suppressed_before[who] else 'found'}: {body!r}"[:300])
        st, body = d.api("GET", f"/api/v1/webhooks/{wid}", key=KEY) if wid else (200, None)
        if st != 200:
            failures.append(f"webhook lost: {st} {body!r}"[:200])
        try:
            if wid:
                rec.wait(lambda r: {a for a in LATER if any(
                    e["type"] == "delivery" and e.get("rcpt_to") == a for e in r.events())}
                    == set(LATER), 30, "the new deliveries at the webhook")
        except AssertionError as e:
            failures.append(str(e)[:300])
        # the old list's entries still suppress: a transmission to them is refused
        # (injection and bounce events), none of it at the receiver
        again = [IDN, "Blocked@A.test", UNKNOWN]
        st, _, body = d.post({"recipients": [{"address": a} for a in again],
                              "content": {"from": SENDER, "subject": "After",
                                          "text": "again"}},
                             headers={"Authorization": KEY})
        if st != 200:
            failures.append(f"transmission to the suppressed addresses: {st} {body}"[:300])
        else:
            tid2 = body["results"]["id"]
            try:
                wait_until(lambda: {e.get("rcpt_to") for e in shaped_events(d)
                                    if e["type"] == "bounce" and e.get(
                                        "transmission_id") == tid2} >= {
                    "blocked@a.test", UNKNOWN}, 30, "suppression bounces")
            except AssertionError as e:
                failures.append(str(e)[:200])
            time.sleep(1.0)   # pacing only: what reached the receiver is checked below
            leaked = [r for _, r, _ in sink.deliveries() if r.lower() in
                      ("blocked@a.test", UNKNOWN, IDN, "user@xn--bcher-kva.test")]
            if leaked:
                failures.append(f"suppressed by the old list, delivered: {leaked}")
            evs = [e for e in shaped_events(d) if e.get("transmission_id") == tid2]
            print("after-upgrade transmission events:",
                  sorted((e["type"], e.get("rcpt_to"), e.get("bounce_class")) for e in evs))
        ids = collections.Counter(e["event_id"] for e in rec.events())
        dups = sum(n - 1 for n in ids.values() if n > 1)
        print(f"webhook: {len(ids)} event(s), {dups} sent again")
        if dups and stop == "term":
            failures.append(f"{dups} event(s) sent to the webhook again after a clean stop")
        log = d.log()[mark:]
        for word in ("Traceback", " died ", "CRITICAL"):
            if word in log:
                i = log.index(word)
                failures.append(f"log after the upgrade has {word.strip()!r}: "
                                f"{log[max(0, i - 300):i + 1500]}")
        if new_pid:
            os.kill(new_pid, signal.SIGTERM)
            wait_until(lambda: not alive(new_pid), 60, "the new supervisor to stop")
        elif d.stop() != 0:
            failures.append("the new daemon's stop did not exit 0")
    except Exception as e:  # noqa: BLE001 - reported, the run ends
        failures.append(f"{type(e).__name__}: {e}"[:3000])
    finally:
        if new_pid and alive(new_pid):
            os.kill(new_pid, signal.SIGKILL)
        d.cleanup()
        sink.stop()
        rec.close()
        if failures or keep:
            print(f"state and log kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", help="an old checkout with its extensions built")
    ap.add_argument("--stop", choices=("kill9", "term", "upgrade"),
                    help="how the old version ends: kill -9 of its tree, SIGTERM, or "
                         "'mta upgrade' (this version's command) with the code moved under it", default="kill9")
    ap.add_argument("--make-fixture", metavar="OUT.tar.gz", default="",
                    help="stop the old daemon (SIGTERM) and write its state as a fixture, "
                         "instead of starting this version on it")
    ap.add_argument("--keep", action="store_true", help="keep the state directory")
    a = ap.parse_args()
    signal.alarm(600)              # the whole run is bounded
    failures = run(os.path.abspath(a.old), a.stop, a.keep,
                   os.path.abspath(a.make_fixture) if a.make_fixture else "")
    for f in failures:
        print("FAIL:", f)
    print("ok" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
