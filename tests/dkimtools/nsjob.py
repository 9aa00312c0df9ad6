"""Run opendkim-testmsg against a private unbound, inside a private network namespace.

Started by ``verifiers.opendkim_verify`` as
``unshare --net --mount [--user --map-root-user] -- python nsjob.py JOB.json``.
Inside the new namespaces the only network is a loopback interface that this
script brings up; unbound listens on 127.0.0.1:53 and serves the test zone
(the DKIM selector TXT records) and refuses everything else; /etc/resolv.conf
is replaced, for this mount namespace only, by one naming 127.0.0.1, so
libopendkim's resolver can reach nothing but that unbound.

JOB.json: {"workdir": DIR, "records": {NAME: TXT}, "messages": {NAME: PATH}}.
Writes {NAME: {"rc": INT, "stderr": TEXT}} as JSON on stdout.
"""
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

DNS_ADDR = "127.0.0.1"
START_TIMEOUT = 10.0  # seconds for unbound to answer
TESTMSG_TIMEOUT = 20.0  # seconds per message


def _txt_strings(text):
    return [text[i:i + 250] for i in range(0, len(text), 250)]


def _unbound_conf(workdir, records):
    zones = sorted({name.split("._domainkey.", 1)[1] for name in records})
    lines = [
        "server:",
        f"    interface: {DNS_ADDR}",
        "    port: 53",
        "    do-daemonize: no",
        '    username: ""',
        '    chroot: ""',
        f'    directory: "{workdir}"',
        '    pidfile: ""',
        "    use-syslog: no",
        f'    logfile: "{workdir}/unbound.log"',
        "    verbosity: 0",
        "    do-ip6: no",
        '    module-config: "iterator"',
        # nothing is ever looked up anywhere else
        '    local-zone: "." refuse',
    ]
    for zone in zones:
        lines.append(f'    local-zone: "{zone}." static')
    for name, text in sorted(records.items()):
        strings = " ".join('"%s"' % s for s in _txt_strings(text))
        lines.append(f"    local-data: '{name}. 60 IN TXT {strings}'")
    lines += ["remote-control:", "    control-enable: no", ""]
    path = os.path.join(workdir, "unbound.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _query(name):
    """Send one TXT query to the private unbound; True when it answers."""
    qid = 0x4D54
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00" + struct.pack(">HH", 16, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(packet, (DNS_ADDR, 53))
            data, _ = s.recvfrom(4096)
        except OSError:
            return False
    return len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid


def _die_with_parent():
    """In the child: be killed when this script dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main():
    with open(sys.argv[1]) as f:
        job = json.load(f)
    workdir = job["workdir"]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = os.path.join(workdir, "resolv.conf")
    with open(resolv, "w") as f:
        f.write(f"nameserver {DNS_ADDR}\noptions timeout:2 attempts:1\n")
    subprocess.run(["mount", "--bind", resolv, "/etc/resolv.conf"], check=True)
    conf = _unbound_conf(workdir, job["records"])
    unbound = subprocess.Popen(["unbound", "-d", "-c", conf], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    try:
        probe = next(iter(job["records"]))
        deadline = time.monotonic() + START_TIMEOUT
        while not _query(probe):
            if unbound.poll() is not None or time.monotonic() > deadline:
                err = unbound.stderr.read().decode(errors="replace") if unbound.poll() is not None else ""
                raise SystemExit(f"unbound did not start: {err}")
            time.sleep(0.05)
        results = {}
        for name, path in job["messages"].items():
            with open(path, "rb") as msg:
                r = subprocess.run(["opendkim-testmsg"], stdin=msg, capture_output=True,
                                   timeout=TESTMSG_TIMEOUT)
            results[name] = {"rc": r.returncode,
                             "stderr": (r.stdout + r.stderr).decode(errors="replace").strip()}
        json.dump(results, sys.stdout)
    finally:
        unbound.terminate()
        try:
            unbound.wait(5)
        except subprocess.TimeoutExpired:
            unbound.kill()


if __name__ == "__main__":
    main()
