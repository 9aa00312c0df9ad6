import signal
import time
from daemon import HOST, free_port
from sinks import AioSink


def route(sink):
    return [{"domain": "*", "starttls": "none", "hosts": [f"{HOST}:{sink.port}"]}]


def test_sigterm_during_roll(make_daemon):
    a = AioSink(HOST, free_port(), name="A").start()
    a.delay = 60
    try:
        d = make_daemon(acceptors=1, shards=1, server={"shutdown_timeout": 4.0},
                        delivery={"hold": False, "processes": 3, "route": route(a)})
        for i in range(6):
            d.send("s@example.com", [f"r{i}@d{i}.example"], b"Subject: x\r\n\r\nx\r\n")
        time.sleep(2)
        d.sections["delivery"]["retry_schedule"] = [5.0, 10.0]
        d.write_config()
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("replacing the delivery", timeout=20)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(120)
        print("exit", rc, "after", time.monotonic() - t0)
        print("\n".join(x for x in d.log().splitlines() if "supervisor" in x))
    finally:
        a.stop()
