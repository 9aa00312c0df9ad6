"""Out-of-band bounces and spam complaints: a parsed report -> events and suppression entries.

Leaf library (pure functions; no I/O): the acceptor parses a report sent to a
bounce domain (:mod:`mta.feedback.reports`), finds the events of the original
message (``find``: a lookup in the events store by the Message-ID header the
report returned, or by the queue id a VERP return path carries), and calls
:func:`report_events`.  What comes back is

- one ``out_of_band`` event per *failed* recipient of a DSN, or one
  ``spam_complaint`` event per complaining recipient of an ARF report (none for
  one whose Feedback-Type is no complaint, :data:`NOT_COMPLAINTS`), each a
  flat SparkPost message event that repeats the original message's fields
  (message_id, transmission_id, campaign_id, rcpt_meta, rcpt_tags, ip_pool,
  sending_ip, msg_from, subject, ...), so consumers see it as theirs; and
- the suppression entries the report calls for: an out-of-band bounce whose
  class is hard Invalid Recipient (10) adds the address (``Bounce Rule``,
  non-transactional), a complaint adds it (``Spam Complaint``,
  non-transactional), as SparkPost's automatic sources do.

A report whose original message cannot be found still gives its events (with
the fields the report itself carries), marked ``"matched": "0"``; the
operator can see such reports rather than lose them (in the event log and the
events API; the webhooks skip them unless ``webhooks.unmatched_reports``).

Only a recipient of the original message is suppressed (the report's recipient
is one of those the stored events name).  Anyone can send a report to a bounce
domain -- no authentication, from any client -- so a made-up DSN or complaint
naming a thousand addresses would otherwise put them all on the list.  An
unmatched report (its message pruned from the events store, or the store
off) suppresses only with ``feedback.suppress_unmatched`` (*unmatched* here).

``event_id`` is left to the events process, which numbers each event by its
durable position in the spool (as for every other event).
"""
from __future__ import annotations

import time

from mta.feedback import suppression as sup
from mta.feedback.reports import ARF, DSN, Report, status_code

# Fields of the original message an out-of-band event repeats (SparkPost's oob/spm
# columns in sparkpost-feedback.md section 2, plus our own ids); ip_address and
# num_retries are those of the original's delivery (the receiving host, the attempts
# before it).
CARRIED = ("message_id", "transmission_id", "campaign_id", "template_id", "rcpt_meta",
           "rcpt_tags", "friendly_from", "msg_from", "subject", "msg_size", "ip_pool",
           "sending_ip", "injection_time", "transactional", "recv_method", "queue_id",
           "message_id_header", "routing_domain", "recipient_domain", "egress_source", "site",
           "ip_address", "num_retries", "scheduled_time")
SPAM_SOURCE = sup.SPAM_COMPLAINT
BOUNCE_SOURCE = sup.BOUNCE_RULE
VERP_SEPARATOR = "+"
MAX_NAMED = 100     # recipients of a report whose events are looked up by address
# ARF feedback types that are no complaint (no spam_complaint event, nobody suppressed):
# a recipient's "this is not spam" (RFC 6430), an SPF/DKIM/DMARC failure report (RFC 6591)
NOT_COMPLAINTS = ("not-spam", "auth-failure")


def verp_queue_id(return_path: str) -> str:
    """The queue id a VERP return path carries (``bounces+<qid>@...``), or ``""``.

    Our queue ids are hexadecimal; anything else after the separator is not ours.
    """
    local = return_path.rpartition("@")[0]
    tag = local.rpartition(VERP_SEPARATOR)[2] if VERP_SEPARATOR in local else ""
    try:
        int(tag, 16)
    except ValueError:
        return ""
    return tag.lower()


def named(report: Report) -> list[str]:
    """The recipients' addresses *report* names (lower case), whose events of the original
    message are looked up (:func:`report_events` matches its recipients to those); [] when
    it names none or more than MAX_NAMED (the message's newest events are taken then)."""
    if report.kind == DSN:
        addrs = [a for r in report.recipients if r.failed
                 for a in (r.original_recipient, r.final_recipient)]
    else:
        addrs = [*report.original_rcpt_to, report.header_to]
    out = list(dict.fromkeys(a.lower() for a in addrs if _address(a)))
    return out if len(out) <= MAX_NAMED else []


def _original_for(originals: list[dict], rcpt: str) -> dict | None:
    """The original message's event for recipient *rcpt* (else any of that message).

    Compared as the suppression list keys addresses (sup.normalize: lower case, the
    domain in A-labels): a recipient given as jo@bücher.example went to a server
    without SMTPUTF8 as jo@xn--bcher-kva.example, the form its reports name."""
    want = sup.normalize(rcpt)
    best = None
    for ev in originals:
        if sup.normalize(ev.get("rcpt_to", "")) == want:
            if ev.get("type") == "delivery":
                return ev
            best = best or ev
    return best or (originals[0] if originals and not want else None)


def _address(rcpt: str) -> bool:
    """Whether *rcpt* can be a recipient's address (a report may say "redacted" or "")."""
    local, at, domain = rcpt.rpartition("@")
    return bool(at and local and domain)


def _complainers(header_to: str, originals: list[dict]) -> tuple[list[str], bool]:
    """(who complained, whether to suppress them), for an ARF report without Original-Rcpt-To.

    The original message's recipients, when it was found, know better than the
    returned message's To field: receivers redact it ("redacted", Yahoo and Microsoft
    among them), and a Cc or Bcc recipient is not the one To names.  So To is taken
    when it is one of the original's recipients, else the original's only
    recipient.  With several recipients none of whom To names, nobody can be told
    apart: the event keeps the To field and nobody is suppressed by it (see
    :func:`report_events`).  Without an original, To is all there is.
    """
    known = list(dict.fromkeys(o["raw_rcpt_to"] for o in originals
                               if o.get("raw_rcpt_to")))
    if header_to and any(k.lower() == header_to.lower() for k in known):
        return [header_to], True
    if len(known) == 1:
        return known, True
    return ([header_to] if header_to else []), not known


def _base(kind: str, now: float, original: dict | None, rcpt: str, report: Report) -> dict:
    ev = {k: original[k] for k in CARRIED if original and k in original}
    ev.update({
        "type": kind,
        "timestamp": str(int(now)),
        "event_time": "%.3f" % now,
        "rcpt_to": rcpt.lower(),
        "raw_rcpt_to": rcpt,
        "recipient_domain": rcpt.rpartition("@")[2].lower(),
        "matched": "1" if original else "0",
    })
    ev.setdefault("routing_domain", ev["recipient_domain"])
    ev.setdefault("rcpt_meta", {})
    ev.setdefault("rcpt_tags", [])
    if not original:
        if report.message_id:
            ev["message_id_header"] = report.message_id
        if report.subject:
            ev["subject"] = report.subject
        if report.original_mail_from:
            ev["msg_from"] = report.original_mail_from
    if report.header_from and "friendly_from" not in ev:
        ev["friendly_from"] = report.header_from
    if original and "timestamp" in original and "injection_time" in ev:
        try:
            first = float(original.get("event_time") or original["timestamp"])
            ev["queue_time"] = str(max(0, int(round((now - first) * 1000))))
        except (TypeError, ValueError):
            pass
    return ev


def _sent_to(original: dict | None, rcpt: str) -> bool:
    """Whether *original* (the stored event :func:`_original_for` found) is of *rcpt*:
    the report names a recipient the message went to."""
    return original is not None and \
        sup.normalize(original.get("rcpt_to", "")) == sup.normalize(rcpt)


def _dsn_recipient(originals: list[dict], r) -> tuple[str, dict | None]:
    """(the recipient a DSN block is about, its original's event): its Original-Recipient,
    else its Final-Recipient -- also when only the Final-Recipient is a recipient of the
    message found: the Original-Recipient may be the sender's own ORCPT passed on (RFC 3461
    4.2), an address before its list or alias expansion that the message never went to."""
    rcpt = r.original_recipient or r.final_recipient
    original = _original_for(originals, rcpt) if rcpt else None
    if original is None and r.original_recipient and r.final_recipient:
        final = _original_for(originals, r.final_recipient)
        if final is not None:
            return r.final_recipient, final
    return rcpt, original


def report_events(report: Report, originals: list[dict], classifier,
                  now: float | None = None, unmatched: bool = False
                  ) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """(events, suppression entries) for *report*.

    *originals*: the events stored for the original message (any order; empty
    when it was not found).  *classifier*: :class:`mta.feedback.classify.Classifier`.
    Suppression entries are ``(address, source, description)``, all non-transactional,
    for recipients of the original message only; *unmatched*
    (``feedback.suppress_unmatched``): also those of a report whose message was not
    found.
    """
    now = time.time() if now is None else now
    events: list[dict] = []
    suppress: list[tuple[str, str, str]] = []
    if report.kind == DSN:
        for r in report.recipients:
            if not r.failed:
                continue        # delayed / delivered / relayed notices are not bounces
            rcpt, original = _dsn_recipient(originals, r)
            if not rcpt and original:
                rcpt = original.get("raw_rcpt_to", "")
            code, enhanced, text = status_code(r)
            cls, rule = classifier.classify(code, enhanced, text)
            # The diagnostic usually is the receiver's reply already ("550 5.1.1 ...").
            raw = text if text[:3].isdigit() else " ".join(
                x for x in (str(code), enhanced, text) if x)
            ev = _base("out_of_band", now, original, rcpt, report)
            ev.update({"bounce_class": str(cls), "bounce_rule": rule, "error_code": str(code),
                       "raw_reason": raw, "reason": raw[:200],
                       "delv_method": "esmtp"})
            if report.reporting_mta:
                ev["report_by"] = report.reporting_mta
            if r.remote_mta:
                ev["remote_host"] = r.remote_mta
            events.append(ev)
            if sup.adds_bounce_rule(cls) and _address(rcpt) and \
                    (_sent_to(original, rcpt) if originals else unmatched):
                suppress.append((rcpt, BOUNCE_SOURCE, f"{code}: {raw}"[:1000]))
    elif report.kind == ARF and report.feedback_type not in NOT_COMPLAINTS:
        # (a redacted Original-Rcpt-To, RFC 6590, names nobody)
        rcpts, sure = [r for r in report.original_rcpt_to if _address(r)], True
        if not rcpts:
            rcpts, sure = _complainers(report.header_to, originals)
        for rcpt in rcpts:
            original = _original_for(originals, rcpt) if rcpt else None
            ev = _base("spam_complaint", now, original, rcpt, report)
            ev.update({"fbtype": report.feedback_type or "abuse",
                       "report_by": report.report_from or report.reported_domain,
                       "report_to": report.report_to,
                       "delv_method": "esmtp"})
            if report.user_agent:
                ev["user_str"] = report.user_agent
            events.append(ev)
            if sure and _address(rcpt) and \
                    (_sent_to(original, rcpt) if originals else unmatched):
                suppress.append((rcpt, SPAM_SOURCE,
                                 f"{report.feedback_type or 'abuse'} report from "
                                 f"{report.report_from or report.reported_domain or 'unknown'}"))
    return events, suppress
