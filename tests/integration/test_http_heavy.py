"""Transmissions that cost much work for their size: the work is bounded per
message, and one request does not hold the acceptor's event loop for the others."""
from __future__ import annotations

import json

import pytest

from mta.api import build
from mta.api import replies as R

KEY = "test-key-1"
AUTH = {"Authorization": KEY}


@pytest.fixture(scope="module")
def api(make_module_daemon):
    """One held daemon, one acceptor: every connection shares its event loop."""
    return make_module_daemon(subdir="heavy", acceptors=1, shards=1, http={"api_keys": [KEY]})


def looping_headers(n_headers: int, items: int, rcpts: int = 1, loops: int = 1) -> bytes:
    """*n_headers* header fields, each *loops* {{ each }} over *items* items that render
    nothing: little to send, *n_headers* x *loops* x *items* loop steps per recipient."""
    return json.dumps({"recipients": [{"address": f"r{i}@example.net"} for i in range(rcpts)],
            "content": {"from": "a@example.com", "subject": "s", "text": "t",
                        "headers": {f"X-H{i}": "{{each a}}{{end}}" * loops
                                    for i in range(n_headers)}},
            "substitution_data": {"a": [0] * items}}, separators=(",", ":")).encode()


def test_loop_steps_are_bounded_per_message_not_per_text(api):
    # 60 fields of 40,000 steps each: each text under MAX_LOOP_STEPS, the message
    # 2.4 million (seconds of CPU on the event loop for a 100 KB request)
    assert 40_000 < build.MAX_LOOP_STEPS < 60 * 40_000
    st, _, res = api.post(looping_headers(60, 40_000), headers=AUTH)
    assert st == 422, res
    assert res["errors"][0]["code"] == R.INVALID.code
    assert "{{ each }} loops would render more than" in res["errors"][0]["description"]
    # within the bound across its texts, a message is built
    st, _, res = api.post(looping_headers(2, 40_000), headers=AUTH)
    assert st == 200, res
    assert res["results"]["total_accepted_recipients"] == 1

