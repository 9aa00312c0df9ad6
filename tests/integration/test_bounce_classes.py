"""Bounce classes in the event log: the real daemon, a real DNS server and receivers that
answer the way Gmail and others document (tests/feedback/corpus.txt), and the events the
spool writes for them (``bounce_class``, ``bounce_rule``; issue 14, item 2).
"""
from __future__ import annotations

import os
import time

import pytest

from daemon import HOST, free_port, wait_until
from mxlab import IPS, mx
from sinks import AioSink
from test_delivery import check_events, message, received_ok, wait_queue_empty

IP_A, IP_B, IP_C = IPS[0], IPS[1], IPS[2]

GMAIL_NO_SUCH_USER = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    "550 5.1.1 unnecessary spaces. https://support.google.com/mail/?p=NoSuchUser - gsmtp")
GMAIL_RATE_LIMITED = (
    "421-4.7.28 [127.0.0.1] Our system has detected an unusual rate of unsolicited mail\r\n"
    "421 4.7.28 originating from your IP address. Mail has been temporarily rate limited. - gsmtp")
INBOX_FULL = "452 4.2.2 The recipient's inbox is out of storage space. - gsmtp"
ODD = "550 5.0.0 Something this table has never seen"
# Gmail's IP block as it comes on the wire: the phrase that names it ("unusual rate of
# unsolicited mail") is broken over two lines
GMAIL_IP_BLOCKED = (
    "550-5.7.28 [127.0.0.1] Our system has detected an unusual rate of\r\n"
    "550-5.7.28 unsolicited mail originating from your IP address. To protect our\r\n"
    "550-5.7.28 users from spam, mail sent from your IP address has been blocked.\r\n"
    "550 5.7.28 https://support.google.com/mail/?p=UnsolicitedIPError - gsmtp")

# A 421 closes the session, so the rate-limited recipient has a domain (and MX) of her own.
REPLIES = {"bob@dest.test": GMAIL_NO_SUCH_USER, "carol@rate.test": GMAIL_RATE_LIMITED,
           "dave@dest.test": INBOX_FULL, "eve@dest.test": ODD,
           "frank@dest.test": GMAIL_IP_BLOCKED}


# an operator rules file's two versions in the reload tests (the sink's ODD reply: class 10,
# then 51)
RULES_ODD = '[[rule]]\nname = "lab-odd"\ncode = 550\ntext = "never seen"\nclass = 10\n'
RULES_BLOCKED = ('[[rule]]\nname = "lab-odd-blocked"\ncode = 550\ntext = "never seen"\n'
                 'class = 51\n')


def odd_sink():
    """A started sink that answers ODD to the odd* recipients and takes the others."""
    return AioSink(HOST, free_port(),
                   rcpt=lambda s, a, f: ODD if a.startswith("odd") else None).start()


def to_sink(sink) -> dict:
    """[delivery] that delivers everything to *sink*."""
    return {"hold": False, "route": [{"domain": "*", "starttls": "none",
                                      "hosts": [f"{HOST}:{sink.port}"]}]}


def terminal(d, rcpt: str) -> dict | None:
    """The first bounce or delivery event of *rcpt* in *d*'s event log."""
    ev = [e for e in d.events() if e["raw_rcpt_to"] == rcpt
          and e["type"] in ("bounce", "delivery")]
    return ev[0] if ev else None


class OnlyQid:
    """The daemon's event log, only the events of message *qid*."""

    def __init__(self, d, qid):
        self.d, self.qid = d, qid

    def events(self):
        return [e for e in self.d.events() if e["queue_id"] == self.qid]


def test_events_carry_bounce_class_and_rule(lab, tmp_path):
    rules = tmp_path / "bounce_rules.toml"
    # The operator's rule wins over the shipped "temp-mailbox-full" for this one reply.
    rules.write_text('[[rule]]\nname = "lab-inbox-full"\ncode = 452\nenhanced = "4.2.2"\n'
                     'text = "inbox is out of storage"\nclass = 20\n')
    dest = lab.aio(IP_A, rcpt=lambda s, a, f: REPLIES.get(a))
    rate = lab.aio(IP_C, rcpt=lambda s, a, f: REPLIES.get(a))
    lab.aio(IP_B)
    lab.serve(mx("dest.test", "mx.dest.test", IP_A) + mx("sender.test", "mx.sender.test", IP_B)
              + mx("rate.test", "mx.rate.test", IP_C))
    # retries every 0.1 s (100 s scaled by 0.001); gives up after 0.8 s
    d = lab.daemon(retry_schedule=[100.0], time_scale=0.001, retry_jitter=0.0, max_age=800.0,
                   sections={"feedback": {"bounce_rules": str(rules)}})
    m = message("classified")
    rcpts = ["ann@dest.test", *REPLIES]
    qid = d.send("alice@sender.test", rcpts, m)
    wait_until(lambda: dest.received() >= 1, 15, "the delivery to ann")
    wait_queue_empty(d)
    [t] = dest.snapshot()
    assert t.rcpt_tos == ["ann@dest.test"]
    received_ok(t.data, m, qid)
    assert rate.received() == 0 and len(rate.rcpt_log) >= 2   # carol was tried again

    # (the DSNs to alice are messages of their own: only this message's events here)
    ev = check_events(OnlyQid(d, qid), {(qid, "ann@dest.test"): "delivery",
                          (qid, "bob@dest.test"): "bounce",
                          (qid, "carol@rate.test"): "expiration",
                          (qid, "dave@dest.test"): "expiration",
                          (qid, "eve@dest.test"): "bounce",
                          (qid, "frank@dest.test"): "bounce"})
    ann = ev[(qid, "ann@dest.test")]["terminal"]
    assert "bounce_class" not in ann and "bounce_rule" not in ann

    bob = ev[(qid, "bob@dest.test")]["terminal"]
    assert bob["error_code"] == "550" and bob["raw_reason"].startswith("550 5.1.1 "), bob
    assert (bob["bounce_class"], bob["bounce_rule"]) == ("10", "gmail-no-such-user")

    # An expiry is a bounce of class 24 (Timeout) whose reason names the expiry and quotes
    # the last reply; that reply's own class and rule come along.
    carol = ev[(qid, "carol@rate.test")]
    assert carol["transient"], "carol was deferred at least once before she expired"
    for e in carol["transient"]:
        assert e["error_code"] == "421" and e["raw_reason"].startswith("421 4.7.28 "), e
        assert (e["bounce_class"], e["bounce_rule"]) == ("70", "temp-rate-limited"), e
    t = carol["terminal"]
    assert (t["type"], t["bounce_class"], t["bounce_rule"]) == ("bounce", "24", "expired"), t
    assert "message expired" in t["raw_reason"] and "last reply: 421 4.7.28 " in t["raw_reason"]
    assert (t["last_bounce_class"], t["last_bounce_rule"]) == ("70", "temp-rate-limited"), t

    dave = ev[(qid, "dave@dest.test")]
    assert dave["transient"]
    for e in dave["transient"]:
        assert (e["bounce_class"], e["bounce_rule"]) == ("20", "lab-inbox-full"), e
    t = dave["terminal"]
    assert (t["bounce_class"], t["last_bounce_class"], t["last_bounce_rule"]) == \
        ("24", "20", "lab-inbox-full"), t

    eve = ev[(qid, "eve@dest.test")]["terminal"]
    assert (eve["bounce_class"], eve["bounce_rule"]) == ("1", "undetermined")

    # A reply over several lines is classified as its text reads, lines joined: a spam
    # block (51), not the generic mail block (50) that "blocked" alone would give
    frank = ev[(qid, "frank@dest.test")]["terminal"]
    assert (frank["bounce_class"], frank["bounce_rule"]) == ("51", "spam-block"), frank


def test_bad_operator_rules_are_refused_naming_the_rule(make_daemon, tmp_path):
    from mta.config import ConfigError, load

    rules = tmp_path / "bounce_rules.toml"
    rules.write_text('[[rule]]\nname = "fine"\ncode = 550\nclass = 10\n'
                     '[[rule]]\nname = "broken"\ncode = 550\ntext = "(oops"\nclass = 10\n')
    cfg = tmp_path / "mta.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path}"\n[feedback]\n'
                   f'bounce_rules = "{rules}"\n')
    with pytest.raises(ConfigError) as ei:
        load(str(cfg))
    msg = str(ei.value)
    assert msg.startswith("feedback.bounce_rules: ") and "rule[1] (broken).text" in msg, msg
    rules.write_text('[[rule]]\nname = "fine"\ncode = 550\nclass = 10\n')
    assert load(str(cfg)).config.feedback.bounce_rules == str(rules)
    os.unlink(rules)
    with pytest.raises(ConfigError, match="feedback.bounce_rules: .*cannot read"):
        load(str(cfg))


def test_a_reload_gives_the_spool_shards_the_new_bounce_rules(make_daemon, tmp_path):
    """feedback.bounce_rules changed at a reload: the new acceptors classified the
    out-of-band reports by the new rules while the spool shards (not replaced) went on
    classifying the in-band bounces by the old ones until a restart.  Now they take them
    at the reload (logged) and nothing is named as waiting for a restart."""
    import re

    sink = odd_sink()
    try:
        d = make_daemon(acceptors=1, shards=1, delivery=to_sink(sink))

        d.send("alice@sender.test", ["odd-1@dest.test"], message("before"))
        ev = wait_until(lambda: terminal(d, "odd-1@dest.test"), 20, "the first bounce")
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("1", "undetermined"), ev

        rules = tmp_path / "bounce_rules.toml"
        rules.write_text(RULES_ODD)
        log = d.reload(feedback={"bounce_rules": str(rules)})
        d.wait_log(r"spool\[0\].*reload: bounce rules " + re.escape(str(rules)))
        assert "feedback.bounce_rules" not in log, log[-2000:]
        d.send("alice@sender.test", ["odd-2@dest.test"], message("after"))
        ev = wait_until(lambda: terminal(d, "odd-2@dest.test"), 20, "the second bounce")
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("10", "lab-odd"), ev
    finally:
        sink.stop()


def test_a_reload_gives_the_spool_shards_a_rules_file_edited_in_place(make_daemon, tmp_path):
    """The operator edits the feedback.bounce_rules file in place (its name unchanged) and
    reloads: the supervisor compared only the name, so the spool shards (not replaced)
    went on classifying in-band bounces by the old rules until a restart while the new
    acceptors read the new ones.  Now the content counts: the shards read it again."""
    import re

    rules = tmp_path / "bounce_rules.toml"
    rules.write_text(RULES_ODD)
    sink = odd_sink()
    try:
        d = make_daemon(acceptors=1, shards=1, feedback={"bounce_rules": str(rules)},
                        delivery=to_sink(sink))

        d.send("alice@sender.test", ["odd-1@dest.test"], message("before"))
        ev = wait_until(lambda: terminal(d, "odd-1@dest.test"), 20, "the first bounce")
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("10", "lab-odd"), ev

        rules.write_text(RULES_BLOCKED)
        d.reload()
        d.wait_log(r"spool\[0\].*reload: bounce rules " + re.escape(str(rules)))
        d.send("alice@sender.test", ["odd-2@dest.test"], message("after"))
        ev = wait_until(lambda: terminal(d, "odd-2@dest.test"), 20, "the second bounce")
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("51", "lab-odd-blocked"), ev

        # a reload that leaves the file as it is does not make the shards read it again
        d.reload()
        assert len(re.findall(r"spool\[0\].*reload: bounce rules ", d.log())) == 1, \
            d.log()[-3000:]
    finally:
        sink.stop()


def _stale_rules_gauge(d) -> float | None:
    """mta_spool_bounce_rules_stale{shard="0"} in /metrics (None: not there)."""
    return d.metric("mta_spool_bounce_rules_stale", shard="0")


@pytest.mark.parametrize("copy", ["kept", "gone"])
def test_a_rules_file_broken_after_the_check_keeps_the_old_rules_and_the_rest(
        make_daemon, tmp_path, copy):
    """The rules file is edited (valid: the supervisor checks it and reloads) and broken
    before the spool shard reads it.  The shard threw the whole reload away -- the record
    of the active configuration could not be read, as its rules file was checked again
    -- so [suppression] bounce_rule = false, changed by the same reload, was not taken
    either: a Bounce Rule entry was still added.  Now the shard reads the supervisor's
    copy of the file it checked (run/bounce-rules-<digest>.toml): it takes the checked
    rules and the rest.  Without the copy (*copy* gone: as under a supervisor that keeps
    none) it reads the operator's file: it takes the rest, keeps the rules it had
    (logged), and says so: /metrics and its answer to the supervisor; a reload after the
    file is repaired reads it."""
    import json
    import re
    import signal

    from mta.feedback import suppression as S
    rules = tmp_path / "bounce_rules.toml"
    rules.write_text(RULES_ODD)
    sink = odd_sink()
    try:
        d = make_daemon(acceptors=1, shards=1, feedback={"bounce_rules": str(rules)},
                        server={"ready_timeout": 10},
                        delivery=to_sink(sink))
        listed = os.path.join(d.state_dir, "suppression")


        def on_list(address) -> bool:
            lst = S.SuppressionList(listed, 1 << 24)
            try:
                return lst.check(address, False)
            finally:
                lst.close()
        d.send("alice@sender.test", ["odd-1@dest.test"], message("before"))
        ev = wait_until(lambda: terminal(d, "odd-1@dest.test"), 20, "the first bounce")
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("10", "lab-odd"), ev
        wait_until(lambda: on_list("odd-1@dest.test"), 20, "the Bounce Rule entry")
        assert _stale_rules_gauge(d) == 0

        active = os.path.join(d.state_dir, "run", "active-config.json")

        def serial():
            with open(active, "rb") as fh:
                return json.loads(fh.read()).get("serial")
        first = serial()
        shard = d.children()["spool[0]"]
        done = len(re.findall(r"reloaded: ", d.log()))
        os.kill(shard, signal.SIGSTOP)
        try:
            rules.write_text(RULES_BLOCKED)
            d.sections["suppression"] = {"bounce_rule": False}
            d.write_config()
            d.proc.send_signal(signal.SIGHUP)
            # the supervisor checked the file and recorded what it applies: now it breaks
            wait_until(lambda: serial() != first, 20, "the reload's record")
            rules.write_text('[[rule]]\nname = "broken\n')
            run = os.path.join(d.state_dir, "run")
            copies = [n for n in os.listdir(run) if n.startswith("bounce-rules-")]
            assert len(copies) == 2, copies     # the checked file's, the previous one's
            if copy == "gone":
                for n in copies:
                    os.unlink(os.path.join(run, n))
        finally:
            os.kill(shard, signal.SIGCONT)
        d.wait_log(r"reloaded: ", count=done + 1, timeout=60)
        d.send("alice@sender.test", ["odd-2@dest.test"], message("during"))
        ev = wait_until(lambda: terminal(d, "odd-2@dest.test"), 20, "the second bounce")
        time.sleep(0.5)
        # the rest of the reload: no Bounce Rule entry any more
        assert not on_list("odd-2@dest.test"), "the rest of the reload was not taken"
        if copy == "kept":
            # the rules the supervisor checked, though the file is broken now
            assert (ev["bounce_class"], ev["bounce_rule"]) == ("51", "lab-odd-blocked"), ev
            d.wait_log(r"spool\[0\].*reload: bounce rules " + re.escape(str(rules)))
            assert "the bounce rules stay as they were" not in d.log()
            assert _stale_rules_gauge(d) == 0
            return
        # the old rules
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("10", "lab-odd"), ev
        d.wait_log(r"spool\[0\].*reload: feedback.bounce_rules: .*the bounce rules stay as "
                   r"they were")
        # visible: the gauge, the shard's answer to the supervisor
        wait_until(lambda: _stale_rules_gauge(d) == 1, 20, "the stale rules gauge",
                   interval=0.3)
        with open(os.path.join(d.state_dir, "run", "spool-0.applied.json"), "rb") as fh:
            said = json.loads(fh.read())
        assert said["bounce_rules_stale"] and "broken" in said["bounce_rules_error"], said

        # repaired as the supervisor checked it: a reload makes the shard read it
        rules.write_text(RULES_BLOCKED)
        d.reload()
        d.wait_log(r"spool\[0\].*reload: bounce rules " + re.escape(str(rules)))
        d.send("alice@sender.test", ["odd-3@dest.test"], message("after"))
        ev = wait_until(lambda: terminal(d, "odd-3@dest.test"), 20, "the third bounce")
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("51", "lab-odd-blocked"), ev
        wait_until(lambda: _stale_rules_gauge(d) == 0, 20, "the gauge back to 0",
                   interval=0.3)
    finally:
        sink.stop()


@pytest.mark.parametrize("damage", ["broken", "deleted"])
def test_a_shard_restarted_after_the_rules_file_is_damaged_runs_the_validated_rules(
        make_daemon, tmp_path, damage):
    """The operator reloads a good rules file, then saves a broken one (or deletes it)
    without a reload; the spool shard is then killed (-9) and restarted by the
    supervisor.  The shard read the operator's file itself at its start: it failed,
    over and over (the node answered 451 to everything).  Now the supervisor keeps a
    copy of the file it validated in run/, and a child reads that: the restarted shard
    starts, mail flows and bounces are classified by the rules last validated."""
    import re
    import signal

    rules = tmp_path / "bounce_rules.toml"
    rules.write_text(RULES_ODD)
    sink = odd_sink()
    try:
        d = make_daemon(acceptors=1, shards=1, feedback={"bounce_rules": str(rules)},
                        delivery=to_sink(sink))

        # a good edit, reloaded: validated, and the rules every process runs
        rules.write_text(RULES_BLOCKED)
        d.reload()
        d.send("alice@sender.test", ["odd-1@dest.test"], message("before"))
        ev = wait_until(lambda: terminal(d, "odd-1@dest.test"), 20, "the first bounce")
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("51", "lab-odd-blocked"), ev

        # then saved broken (or deleted) without a reload, and the shard dies
        if damage == "broken":
            rules.write_text('[[rule]]\nname = "broken\n')
        else:
            rules.unlink()
        old = d.children()["spool[0]"]
        os.kill(old, signal.SIGKILL)
        d.wait_log(r"spool\[0\] pid=\d+ died")
        d.wait_restarted("spool[0]", old, timeout=20)
        d.wait_log(r"started spool\[0\]", count=2, timeout=20)
        time.sleep(1.5)     # a shard that failed its start would have died by now
        assert len(re.findall(r"spool\[0\] pid=\d+ died", d.log())) == 1, d.log()[-3000:]
        assert [n for n in os.listdir(os.path.join(d.state_dir, "run"))
                if n.startswith("bounce-rules-")], "no copy of the validated rules"
        qid = d.send("alice@sender.test", ["odd-2@dest.test", "good@dest.test"],
                     message("after"))
        assert qid
        ev = wait_until(lambda: terminal(d, "odd-2@dest.test"), 20, "the second bounce")
        assert (ev["bounce_class"], ev["bounce_rule"]) == ("51", "lab-odd-blocked"), ev
        ev = wait_until(lambda: terminal(d, "good@dest.test"), 20, "the delivery")
        assert ev["type"] == "delivery", ev
    finally:
        sink.stop()
