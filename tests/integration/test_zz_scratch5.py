import time
from test_supervisor import ConnectionProbe


def test_fewer_acceptors(make_daemon):
    d = make_daemon(acceptors=3)
    probes = [ConnectionProbe(d.port) for _ in range(3)]
    for p in probes:
        p.start()
    time.sleep(1)
    d.reload(r"reloaded: accepting", smtp={"acceptors": 1})
    time.sleep(2)
    for p in probes:
        p.done.set()
    for p in probes:
        p.join(30)
    print([p.ok for p in probes], [p.failures for p in probes])
    assert not any(p.failures for p in probes)
