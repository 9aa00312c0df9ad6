"""What ``GET /api/v1/webhooks/events/documentation`` and ``.../samples`` answer.

Data only: the event categories and types a webhook can subscribe to, the
fields of each message event type this MTA emits (after SparkPost's event
documentation, ../shared/reference/sparkpost-feedback.md section 2) with a
description and a sample value each, and samples built from them.  Numbers
are JSON strings as in real batches.
"""
from __future__ import annotations

# category -> (display name, description, {type: (display name, description)})
CATEGORIES = {
    "message_event": ("Message Events", "Message events describe the life cycle of a message "
                      "including injection, delivery, and disposition.", {
                          "injection": ("Injection", "Message is received by or injected into "
                                        "the MTA."),
                          "delivery": ("Delivery", "Remote MTA acknowledged receipt of a "
                                       "message."),
                          "delay": ("Delay", "Remote MTA has temporarily rejected a message; "
                                    "it will be retried."),
                          "bounce": ("Bounce", "Remote MTA has permanently rejected a "
                                     "message, the message expired, or the recipient is "
                                     "suppressed."),
                          "out_of_band": ("Out of Band", "Remote MTA initially reported "
                                          "acceptance of a message, but it has since "
                                          "asynchronously reported that the message was not "
                                          "delivered."),
                          "spam_complaint": ("Spam Complaint", "The message was classified "
                                             "as spam by the recipient."),
                          "policy_rejection": ("Policy Rejection", "Due to policy, the MTA "
                                               "rejected a message or failed to generate "
                                               "it."),
                      }),
    "gen_event": ("Generation Events", "Generation events provide insight into message "
                  "generation failures or rejections.", {
                      "generation_failure": ("Generation Failure", "Message generation "
                                             "failed for an intended recipient."),
                      "generation_rejection": ("Generation Rejection", "The message was "
                                               "rejected by policy during generation."),
                  }),
    "track_event": ("Engagement Events", "Engagement events describe the behavior of a "
                    "recipient with respect to the message (not produced by this MTA).", {
                        "click": ("Click", "Recipient clicked a tracked link."),
                        "open": ("Open", "Recipient opened a message."),
                        "initial_open": ("Initial Open", "Recipient opened a message (top "
                                         "pixel)."),
                        "amp_click": ("AMP Click", "Recipient clicked a tracked link in an "
                                      "AMP message."),
                        "amp_open": ("AMP Open", "Recipient opened an AMP message."),
                        "amp_initial_open": ("AMP Initial Open", "Recipient opened an AMP "
                                             "message (top pixel)."),
                    }),
    "unsubscribe_event": ("Unsubscribe Events", "Unsubscribe events (not produced by this "
                          "MTA).", {
                              "list_unsubscribe": ("List Unsubscribe", "The user clicked the "
                                                   "List-Unsubscribe control."),
                              "link_unsubscribe": ("Link Unsubscribe", "The user clicked an "
                                                   "unsubscribe link."),
                          }),
    "relay_event": ("Relay Events", "Inbound relay events (not produced by this MTA).", {
        "relay_injection": ("Relay Injection", "Relayed message is received."),
        "relay_rejection": ("Relay Rejection", "Relayed message is rejected."),
        "relay_delivery": ("Relay Delivery", "Relayed message is delivered."),
        "relay_tempfail": ("Relay Temporary Failure", "Relayed message delivery failed "
                           "temporarily."),
        "relay_permfail": ("Relay Permanent Failure", "Relayed message delivery failed "
                           "permanently."),
    }),
}

# type -> category key
CATEGORY_OF = {t: c for c, (_, _, types) in CATEGORIES.items() for t in types}

# field -> (description, sample value)
FIELDS = {
    "type": ("Type of event this record describes", "delivery"),
    "event_id": ("Unique event identifier", "92356927693813856"),
    "timestamp": ("Event date and time, in Unix timestamp format (integer seconds since "
                  "00:00:00 GMT 1970-01-01)", "1460989507"),
    "injection_time": ("Time the message was injected", "2016-04-18T14:25:07.000Z"),
    "message_id": ("Message identifier, unique per message", "000443ee14578172be22"),
    "transmission_id": ("Transmission which originated this message", "65832150921904138"),
    "campaign_id": ("Campaign of which this message was a part", "Example Campaign Name"),
    "template_id": ("Slug of the template used to construct this message", "templ-1234"),
    "template_version": ("Version of the template used to construct this message", "1"),
    "customer_id": ("SparkPost-customer identifier through which this message was sent",
                    "1"),
    "subaccount_id": ("Unique subaccount identifier", "101"),
    "rcpt_to": ("Lowercase version of recipient address used on this message's SMTP "
                "envelope", "recipient@example.com"),
    "raw_rcpt_to": ("Actual recipient address used on this message's SMTP envelope",
                    "Recipient@example.com"),
    "recipient_domain": ("Domain of the recipient address", "example.com"),
    "routing_domain": ("Domain receiving the message", "example.com"),
    "rcpt_meta": ("Metadata describing the message recipient", {"customKey": "customValue"}),
    "rcpt_tags": ("Tags applied to the message", ["male", "US"]),
    "rcpt_type": ("Indicates that a recipient address appeared in the Cc or Bcc header or "
                  "the archive JSON array", "cc"),
    "friendly_from": ("Friendly sender or 'From' header in the original email",
                      "sender@example.com"),
    "msg_from": ("Sender address used on this message's SMTP envelope",
                 "msprvs1=17827RA6TC8Pz=bounces-12345@sparkpostmail1.com"),
    "subject": ("Subject line from the email header", "Summer deals are here!"),
    "msg_size": ("Message's size in bytes", "1337"),
    "ip_pool": ("IP pool through which this message was sent", "Example-Ip-Pool"),
    "sending_ip": ("IP address through which this message was sent", "127.0.0.1"),
    "ip_address": ("IP address of the host to which SparkPost delivered this message",
                   "127.0.0.1"),
    "delv_method": ("Protocol by which SparkPost delivered this message", "esmtp"),
    "recv_method": ("Protocol by which SparkPost received this message", "rest"),
    "queue_time": ("Delay, expressed in milliseconds, between this message's injection "
                   "and delivery", "12"),
    "num_retries": ("Number of failures on this message or recipient prior to this event",
                    "2"),
    "outbound_tls": ("Whether or not TLS was used during delivery of the message", "1"),
    "transactional": ("Value of the transactional field in the transmission options "
                      "(\"1\" for transactional)", "1"),
    "scheduled_time": ("Time the message was scheduled for delivery (start_time)",
                       "1460989507"),
    "bounce_class": ("Classification code for a given message (see Bounce Classification "
                     "Codes)", "1"),
    "error_code": ("Error code by which the remote server described a failed delivery "
                   "attempt", "554"),
    "raw_reason": ("Unmodified reason given by the remote server",
                   "MAIL REFUSED - IP (17.99.99.99) is in black list"),
    "reason": ("Canonicalized text of the response returned by the remote server due to "
               "a failed delivery attempt", "MAIL REFUSED - IP (a.b.c.d) is in black list"),
    "remote_addr": ("IP address of the host from which SparkPost received this message",
                    "127.0.0.1"),
    "fbtype": ("Type of spam report entered against this message", "abuse"),
    "report_by": ("Address of the entity reporting this message as spam",
                  "server.email.com"),
    "report_to": ("Address to which this spam report is to be delivered",
                  "abuse.example.com"),
    "rcpt_subs": ("Substitutions applied to the template to construct this message",
                  {"country": "US", "gender": "Female"}),
}

_COMMON = ["type", "event_id", "timestamp", "transmission_id", "campaign_id", "template_id",
           "template_version", "customer_id", "subaccount_id", "rcpt_to", "raw_rcpt_to",
           "recipient_domain", "rcpt_meta", "rcpt_tags", "friendly_from", "ip_pool",
           "sending_ip", "transactional"]
_MSG = ["message_id", "injection_time", "msg_from", "msg_size", "subject", "routing_domain",
        "scheduled_time", "recv_method"]
_DLV = ["delv_method", "ip_address", "num_retries", "queue_time"]
_FAIL = ["bounce_class", "error_code", "raw_reason", "reason"]

TYPE_FIELDS = {
    "injection": _COMMON + _MSG,
    "delivery": _COMMON + _MSG + _DLV + ["outbound_tls"],
    "delay": _COMMON + _MSG + _DLV + ["outbound_tls"] + _FAIL,
    "bounce": _COMMON + _MSG + _DLV + _FAIL,
    "out_of_band": _COMMON + _MSG + _DLV + _FAIL,
    "spam_complaint": _COMMON + _MSG + _DLV + ["fbtype", "report_by", "report_to"],
    "policy_rejection": _COMMON + ["message_id", "injection_time", "msg_from", "recv_method",
                                   "remote_addr"] + _FAIL,
    "generation_failure": _COMMON + ["routing_domain", "scheduled_time", "recv_method",
                                     "rcpt_subs", "error_code", "raw_reason", "reason"],
    "generation_rejection": _COMMON + ["subject", "routing_domain", "scheduled_time",
                                       "recv_method", "rcpt_subs"] + _FAIL,
}


def documentation() -> dict:
    out = {}
    for cat, (name, desc, types) in CATEGORIES.items():
        events = {}
        for t, (tname, tdesc) in types.items():
            fields = TYPE_FIELDS.get(t, ["type", "event_id", "timestamp"])
            events[t] = {"display_name": tname, "description": tdesc,
                         "event": {f: {"description": FIELDS[f][0],
                                       "sampleValue": t if f == "type" else FIELDS[f][1]}
                                   for f in fields}}
        out[cat] = {"display_name": name, "description": desc, "events": events}
    return out


def element(ev: dict) -> dict:
    """*ev* as one element of a webhook batch: under its type's category key
    (``msys.gen_event`` for generation_failure / _rejection, ``msys.message_event``
    for the message events and any type not listed)."""
    return {"msys": {CATEGORY_OF.get(ev.get("type"), "message_event"): ev}}


def sample(t: str) -> dict:
    """One sample event of type *t* (a known type) as it appears in a batch element."""
    fields = TYPE_FIELDS.get(t, ["type", "event_id", "timestamp"])
    return element({f: (t if f == "type" else FIELDS[f][1]) for f in fields})


def samples(types: list[str] | None) -> list[dict]:
    return [sample(t) for t in (types or TYPE_FIELDS)]
