"""`mta drain` on a terminal (the progress bar) says when the count is partial, as the
line mode does: a spool shard that did not answer is not counted in what is left."""
from __future__ import annotations

import io
import time

import rich
from rich.console import Console

from mta import opscli


class _Client:
    def __init__(self, answers):
        self.answers = list(answers)

    def ok(self, method, path):
        assert (method, path) == ("GET", "/api/admin/drain")
        return self.answers.pop(0)


def _drain(partial: bool) -> dict:
    d = {"remaining": {"messages": 0, "recipients": 0, "in_flight": 0},
         "draining": True, "done": False, "partial": partial}
    if partial:
        d["not_answering"] = [{"shard": 1, "state": "not answering", "error": "timeout"}]
    return d


def _bar_text(monkeypatch, d: dict) -> str:
    out = io.StringIO()        # (rich's console, as on a terminal)
    monkeypatch.setattr(rich, "_console", Console(file=out, force_terminal=True, width=200,
                                                  color_system=None))
    opscli._drain_bar(_Client([d]), d, time.monotonic() - 1, 0.1)
    return out.getvalue()


def test_the_drain_bar_says_a_shard_is_not_counted(monkeypatch):
    d = _drain(True)
    text = _bar_text(monkeypatch, d)
    assert f"partial: {opscli.partial_note(d)}" in text, text
    assert "spool[1] not answering" in text, text
    assert "partial" not in _bar_text(monkeypatch, _drain(False))
