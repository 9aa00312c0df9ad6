"""Queue ids: what the operator's commands take as one (mta.queueid.is_qid)."""
from __future__ import annotations

from mta.queueid import is_qid, new_qid, new_qid_for_shard, normal_qid


def test_made_ids_are_queue_ids():
    for qid in (new_qid(0), new_qid(7), new_qid_for_shard(3, 4)):
        assert is_qid(qid) and is_qid(normal_qid(qid.lower())), qid


def test_loose_spellings_are_not_queue_ids():
    # int(text, 16) takes each of these; a queue id is exactly 20 upper-case hex digits
    good = new_qid(1)
    for bad in ("0X" + good[2:], "0x" + good[2:], " " + good[1:], good[1:] + " ",
                good[:-1] + "\n", "\t" + good[1:], good[:5] + "_" + good[6:],
                "+" + good[1:], "-" + good[1:], "\u0663" * 20, "\uff11" * 20,
                good.lower(), good + "0", good[:-1], ""):
        assert not is_qid(bad), repr(bad)
        if bad[:2] in ("0x", "0X") or bad.strip() != bad:
            assert not is_qid(normal_qid(bad)), repr(bad)
