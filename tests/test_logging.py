"""The daemon's diagnostic log line (mta/proc.py): what the stock logging.Formatter writes."""
import logging
import os
import random

import pytest

from mta import proc


@pytest.fixture
def handler():
    saved = (logging.logProcesses, logging.logThreads, logging.logMultiprocessing,
             logging._srcfile, logging.getLogger().handlers[:], logging.getLogger().level)
    proc.setup_logging("info", "delivery[3]")
    yield logging.getLogger().handlers[0]
    (logging.logProcesses, logging.logThreads, logging.logMultiprocessing,
     logging._srcfile, handlers, level) = saved
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_the_line_is_the_stock_formatters_in_any_order_of_times(handler):
    stock = logging.Formatter("%(asctime)s %(levelname)s delivery[3][%(process)d]: %(message)s")
    rnd = random.Random(7)
    base = 1_796_000_000.0
    # times within one second, across seconds, going back (a clock step), far apart
    times = [base + 0.001, base + 0.999, base + 1.0, base + 0.5, base + 86_400.25,
             base + 59.9999] + [base + rnd.uniform(-5e6, 5e6) for _ in range(300)]
    for t in times:
        r = logging.LogRecord("x", logging.WARNING, __file__, 1, "to=<%s> status=%s",
                              ("a@b.test", "sent"), None)
        r.created = t
        r.msecs = int((t - int(t)) * 1000) + 0.0
        r.process = os.getpid()
        assert handler.format(r) == stock.format(r), t


def test_records_are_made_without_the_process_lookups(handler):
    r = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    assert r.process is None and r.thread is None        # not looked up per record
    assert handler.format(r).endswith(f" INFO delivery[3][{os.getpid()}]: m")
