"""Microbenchmarks: the node-wide limiter (mta.delivery.limits.NodeLimiter).

Run: python -m pytest bench/test_bench_limits.py --benchmark-only

What the delivery engine pays, in one process (no contention):

* take, admitted: one unit of a rate high enough that every call is admitted
  (the per-message cost: two fcntl calls and the mapped state);
* take, refused: a rate so low that every call is refused (no system call);
* take, 1,000 keys: admitted takes cycling over 1,000 keys (cache hits);
* take, evicting: cycling over more keys than ``max_open_files``, so every
  call opens a file and closes another (the worst case of the fd cache);
* acquire + release: one connection slot of a limit of 20 while 19 are held
  by another limiter (the per-connection cost, scanning the held slots);
* connections: counting 10 slots held by another limiter (status).
"""
import pytest

from mta.delivery.limits import CONNECTIONS, MESSAGE_RATE, NodeLimiter, limit_key

KEY = limit_key("ip-1", "mx.bench.example", CONNECTIONS)
RATE_KEY = limit_key("ip-1", "mx.bench.example", MESSAGE_RATE)


@pytest.fixture
def limiter(tmp_path):
    lim = NodeLimiter(str(tmp_path / "limits"))
    yield lim
    lim.close()


@pytest.fixture
def other(limiter):
    lim = NodeLimiter(limiter.directory.rsplit("/", 1)[0])
    yield lim
    lim.close()


@pytest.mark.benchmark(group="limits: take")
def test_bench_take_admitted(benchmark, limiter):
    assert benchmark(limiter.take, RATE_KEY, 1e12) == 0.0


@pytest.mark.benchmark(group="limits: take")
def test_bench_take_refused(benchmark, limiter):
    limiter.take(RATE_KEY, 1e-6)
    assert benchmark(limiter.take, RATE_KEY, 1e-6) > 0


@pytest.mark.benchmark(group="limits: take")
def test_bench_take_many_keys(benchmark, limiter):
    keys = [limit_key("ip-1", f"site-{n}", MESSAGE_RATE) for n in range(1000)]
    state = {"n": 0}

    def one():
        state["n"] += 1
        return limiter.take(keys[state["n"] % 1000], 1e12)
    assert benchmark(one) == 0.0
    assert limiter.open_files() == 1000


@pytest.mark.benchmark(group="limits: take")
def test_bench_take_evicting(benchmark, tmp_path):
    lim = NodeLimiter(str(tmp_path / "limits"), max_open_files=100)
    keys = [limit_key("ip-1", f"site-{n}", MESSAGE_RATE) for n in range(101)]
    state = {"n": 0}

    def one():
        state["n"] += 1
        return lim.take(keys[state["n"] % 101], 1e12)
    try:
        assert benchmark(one) == 0.0
        assert lim.open_files() == 100
    finally:
        lim.close()


@pytest.mark.benchmark(group="limits: slots")
def test_bench_acquire_release(benchmark, limiter, other):
    held = [other.acquire_connection(KEY, 20) for _ in range(19)]
    assert all(held)

    def one():
        slot = limiter.acquire_connection(KEY, 20)
        limiter.release(slot)
        return slot
    assert benchmark(one).index == 19


@pytest.mark.benchmark(group="limits: slots")
def test_bench_connections(benchmark, limiter, other):
    held = [other.acquire_connection(KEY, 20) for _ in range(10)]
    assert all(held)
    assert benchmark(limiter.connections, KEY) == 10
