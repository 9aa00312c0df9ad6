"""The live status page in a real headless Chromium (Debian's ``chromium``) against the daemon.

Chromium loads ``/`` from the admin listener, runs the page's script (which
fetches ``/api/admin/status``) and dumps the DOM; the numbers it shows must
match the API.  Under load the page's numbers lie between what the API said
just before and just after the browser ran; once the load stops they are
equal.  The browser is kept on loopback: every name resolves to nothing but
127.0.0.1 and anything else goes to a proxy address where nothing listens.
"""
from __future__ import annotations

import html.parser
import os
import shutil
import smtplib
import subprocess
import tempfile
import threading

from daemon import HOST, wait_until
from mxlab import mx
from test_admin_api import admin_call, message

# Debian's chromium, installed by scripts/install-test-deps.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"


def chromium(url: str, *args: str, budget_ms: int = 6000) -> bytes:
    with tempfile.TemporaryDirectory() as profile:
        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                f"--user-data-dir={profile}", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--no-pings",
                "--proxy-server=127.0.0.1:9",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                f"--virtual-time-budget={budget_ms}", *args, url]
        r = subprocess.run(argv, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return r.stdout


class Dom(html.parser.HTMLParser):
    """Text of every element with an id; count of SVG shapes by class; body attributes."""

    def __init__(self, data: str):
        super().__init__()
        self.text: dict[str, str] = {}
        self.classes: dict[str, int] = {}
        self.body: dict = {}
        self.stack: list = []
        self.feed(data)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        for c in (a.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        if tag in ("meta", "br", "input", "img", "rect", "polyline", "line"):
            return
        self.stack.append(a.get("id"))

    def handle_startendtag(self, tag, attrs):
        for c in (dict(attrs).get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1

    def handle_endtag(self, tag):
        if tag in ("meta", "br", "input", "img", "rect", "polyline", "line"):
            return
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        for ident in self.stack:
            if ident:
                self.text[ident] = self.text.get(ident, "") + data


def number(dom: Dom, ident: str) -> float:
    return float(dom.text[ident].strip())


def status(d) -> dict:
    st, _, s = admin_call(d, "GET", "/api/admin/status")
    assert st == 200, s
    return s


class Load(threading.Thread):
    """A light SMTP load: one message every 0.1 s on one connection until stopped."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.d, self.sent, self.stop = d, 0, threading.Event()

    def run(self):
        with smtplib.SMTP(HOST, self.d.port, local_hostname="load.test", timeout=30) as s:
            while not self.stop.wait(0.1):
                s.sendmail("a@sender.test", [f"r{self.sent}@load.test"],
                           message(f"load{self.sent}"))
                self.sent += 1


def test_status_page_shows_the_api_numbers_under_load(make_daemon, tmp_path):
    d = make_daemon(acceptors=2, shards=2)      # delivery held: the queue only grows
    url = f"http://{HOST}:{d.admin_port}/"
    load = Load(d)
    load.start()
    try:
        # (every child -- acceptors, spools, delivery, events, webhooks -- has reported:
        # a slot is listed from the start; "ok" once every child's report is fresh)
        def reported():
            s = status(d)
            return s["totals"]["accepted_messages"] >= 10 and s["ok"] and len(
                s["processes"]) == 7
        wait_until(reported, 30, "some load accepted, every child up", interval=0.3)
        before = status(d)
        dom = Dom(chromium(url, "--dump-dom").decode())
        after = status(d)
    finally:
        load.stop.set()
        load.join(30)
    assert int(dom.body.get("data-rendered", "0")) >= 1, dom.text.get("error")
    assert dom.text["state"].strip() == "ok"
    for ident, get in (("total-accepted", lambda s: s["totals"]["accepted_messages"]),
                       ("total-accepted-smtp", lambda s: s["totals"]["accepted_smtp"]),
                       ("queue-messages", lambda s: s["queue"]["total"]["messages"]),
                       ("queue-recipients", lambda s: s["queue"]["total"]["recipients"])):
        assert get(before) <= number(dom, ident) <= get(after), (ident, get(before),
                                                                 dom.text[ident], get(after))
    assert number(dom, "rate-injection") > 0
    assert number(dom, "children-up") == number(dom, "children-total") == len(
        after["processes"]) == 7
    assert dom.classes.get("series", 0) >= 1        # the rates chart has its lines
    assert dom.classes.get("bar", 0) >= 1           # the queue-by-pool chart its bar

    # Quiet: the page and the API agree exactly.
    sent = load.sent
    wait_until(lambda: status(d)["totals"]["accepted_messages"] == sent
               and status(d)["queue"]["total"]["messages"] == sent, 30,
               "the last message counted", interval=0.3)
    s = status(d)
    dom = Dom(chromium(url, "--dump-dom").decode())
    assert number(dom, "total-accepted") == s["totals"]["accepted_messages"] == sent
    assert number(dom, "queue-messages") == s["queue"]["total"]["messages"] == sent
    assert number(dom, "queue-recipients") == s["queue"]["total"]["recipients"]
    assert number(dom, "total-delivered") == s["totals"]["delivered"] == 0
    assert number(dom, "suspensions-count") == len(s["suspensions"]) == 0
    assert "smtp_transaction" in dom.text["table-latency"]
    assert str(s["latency_seconds"]["smtp_transaction"]["count"]) in dom.text["table-latency"]
    assert dom.text.get("error", "").strip() == ""
    # delivery is held: "ok" (it takes mail) does not hide that none goes out
    assert s["delivery_held"] is True
    assert "delivery is held" in dom.text.get("problems", ""), dom.text.get("problems")

    # A picture of it (docs/status-page.png is one made this way).
    shot = tmp_path / "status.png"
    chromium(url, f"--screenshot={shot}", "--window-size=1280,1000")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if os.environ.get("MTA_STATUS_SCREENSHOT"):
        shutil.copy(shot, os.environ["MTA_STATUS_SCREENSHOT"])


def test_status_page_with_a_token_reads_it_from_the_fragment(make_daemon):
    d = make_daemon(admin={"tokens": ["page-t0ken"]})
    d.send("a@sender.test", ["x@example.net"], message("tok"))
    wait_until(lambda: admin_call(d, "GET", "/api/admin/status", token="page-t0ken")[2][
        "totals"]["accepted_messages"] == 1, 20, "the message counted", interval=0.3)
    url = f"http://{HOST}:{d.admin_port}/"
    dom = Dom(chromium(url + "#token=page-t0ken", "--dump-dom").decode())
    assert number(dom, "total-accepted") == 1
    dom = Dom(chromium(url, "--dump-dom").decode())            # no token: the page says so
    assert "401" in dom.text["error"] and dom.text["total-accepted"].strip() == "-"


def test_status_page_shows_a_suspension_and_why(lab):
    """A source whose address is not on this host (192.0.2.10: binding fails locally, no
    packet leaves) is suspended; the page lists it with the reason the API gives."""
    lab.serve(mx("susp.test", "mx.susp.test", "127.0.0.10"))
    sink = lab.aio("127.0.0.10")
    d = lab.daemon(processes=1, sections={"egress": {
        "source": [{"name": "absent", "source_address": "192.0.2.10"},
                   {"name": "ip-4", "source_address": "127.0.0.4"}],
        "pool": [{"name": "default", "sources": [{"source": "absent"}, {"source": "ip-4"}]}],
        "suspend_time": 120.0}})
    for i in range(6):
        d.send("a@sender.test", [f"r{i}@susp.test"], message(f"susp{i}"))
    wait_until(lambda: sink.received() == 6, 60, "6 deliveries", interval=0.2)
    s = wait_until(lambda: (lambda s: s if s["suspensions"] and s["totals"]["delivered"] == 6
                            else None)(status(d)), 20, "the suspension in the API",
                   interval=0.3)
    [susp] = s["suspensions"]
    assert susp["source"] == "absent" and "192.0.2.10" in susp["reason"]
    dom = Dom(chromium(f"http://{HOST}:{d.admin_port}/", "--dump-dom").decode())
    assert number(dom, "suspensions-count") == 1
    assert "absent" in dom.text["table-suspensions"]
    assert susp["reason"] in dom.text["table-suspensions"]
    assert number(dom, "total-delivered") == 6
    assert "mx.susp.test" in dom.text["table-sites"]
