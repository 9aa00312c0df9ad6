"""The smart sink (a receiver that behaves like a mailbox provider) for the tests.

One copy of the code: it lives in ``bench/loadlib/smartsink.py`` (the benchmarks use
it too); this module loads it from there by path, so the tests need no package
layout for ``bench/``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench", "loadlib",
                     "smartsink.py")
_spec = importlib.util.spec_from_file_location("_mta_smartsink", _PATH)
_mod = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("_mta_smartsink", _mod)
_spec.loader.exec_module(_mod)

Policy = _mod.Policy
Seen = _mod.Seen
Accepted = _mod.Accepted
SmartSink = _mod.SmartSink
rate_per_window = _mod.rate_per_window
YAHOO_RATE = _mod.YAHOO_RATE
GMAIL_RATE = _mod.GMAIL_RATE
OUTLOOK_RATE = _mod.OUTLOOK_RATE
