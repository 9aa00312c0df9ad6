"""In-process tests of the bus codec's declared field checks (mta/bus)."""
from __future__ import annotations

import pytest

from mta import bus

QID = "0" * 20


def roundtrip(name: str, *values, **kw):
    return bus.decode(bus.encode(name, *values, **kw))


def envelope(**change) -> list:
    env = [QID, "s@example.com", ["r@example.net"], {}, "c [127.0.0.1]", 1.5]
    for k, v in change.items():
        env[int(k[1:])] = v
    return env


def test_well_formed_messages_pass():
    m, f, bodies = roundtrip("SPOOL_MESSAGE_COMMIT", 1, [envelope(), envelope(f5=7)],
                             bodies=[b"a", b"b"])
    assert m.name == "SPOOL_MESSAGE_COMMIT" and f[0] == 1 and bodies == [b"a", b"b"]
    m, f, body = roundtrip("DELIVERY_MESSAGE_READY", 3, QID, "", "example.net",
                           [[0, "r@example.net"]], {"BODY": "8BITMIME"}, 1, body=b"x")
    assert f[4] == [[0, "r@example.net"]] and body == b"x"
    m, f, _ = roundtrip("DELIVERY_OUTCOME", 3, QID,
                        [[0, "delivered", 250, "2.0.0", "ok", "mx.test", "127.0.0.1"]])
    assert f[2][0][1] == "delivered"
    # Messages without a check take what they are given.
    assert roundtrip("SPOOL_QUEUE_LIST", 9, "anything")[1] == [9, "anything"]


@pytest.mark.parametrize("envelopes, bodies", [
    ([envelope(f2=[])], [b"a"]),                     # no recipient
    ([envelope(f2="r@example.net")], [b"a"]),       # recipients not a list
    ([envelope(f2=[1])], [b"a"]),                    # a recipient not a string
    ([envelope()[:5]], [b"a"]),                      # too short
    ([envelope(f3=[])], [b"a"]),                     # params not a map
    ([envelope(f5="now")], [b"a"]),                  # arrival not a number
    ([envelope(f5=True)], [b"a"]),                   # nor a boolean
    ([envelope(f0="")], [b"a"]),                     # empty queue id
    ([envelope(f0="Q" * 65)], [b"a"]),               # queue id too long
    ([envelope(f1=None)], [b"a"]),                   # sender
    (["x"], [b"a"]),
    (5, [b"a"]),                                     # envelopes not a list
    ([envelope(), envelope()], [b"a"]),              # a body missing
    ([envelope()], [b"a", b"b"]),                    # a body too many
])
def test_commit_with_a_bad_envelope_is_refused(envelopes, bodies):
    with pytest.raises(bus.BusError, match="SPOOL_MESSAGE_COMMIT"):
        roundtrip("SPOOL_MESSAGE_COMMIT", 1, envelopes, bodies=bodies)


@pytest.mark.parametrize("values", [
    ("1", QID, "", "d", [[0, "r@d"]], {}, 1),        # req
    (1, QID, "", "d", [], {}, 1),                    # no recipient
    (1, QID, "", "d", [["0", "r@d"]], {}, 1),        # index not a number
    (1, QID, "", "d", [[0, "r@d", 3]], {}, 1),       # recipient not [index, address]
    (1, QID, "", "d", [[0, "r@d"]], [], 1),          # params
    (1, QID, None, "d", [[0, "r@d"]], {}, 1),        # sender
    (1, QID, "", "d", [[0, "r@d"]], {}, 1.5),        # attempt
])
def test_bad_delivery_job_is_refused(values):
    with pytest.raises(bus.BusError, match="DELIVERY_MESSAGE_READY"):
        roundtrip("DELIVERY_MESSAGE_READY", *values, body=b"x")


@pytest.mark.parametrize("values", [
    (1, QID, "delivered"),
    (1, QID, [[0, "delivered", 250]]),                               # too short
    (1, QID, [["0", "delivered", 250, "", "", "", ""]]),             # index
    (1, 7, [[0, "delivered", 250, "", "", "", ""]]),                 # qid
])
def test_bad_outcome_is_refused(values):
    with pytest.raises(bus.BusError, match="DELIVERY_OUTCOME"):
        roundtrip("DELIVERY_OUTCOME", *values)
