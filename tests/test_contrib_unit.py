"""contrib/mta.service, the systemd unit operators copy: systemd reads it without a
complaint (a misspelt key is only a warning to systemd, and the setting silently
missing), and it orders the mta after the clock is set.  contrib/60-mta.conf, the
sysctl settings beside it: sysctl applies it (in a network namespace of its own)."""
from __future__ import annotations

import configparser
import os
import subprocess

CONTRIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "contrib")
UNIT = os.path.join(CONTRIB, "mta.service")
SYSCTL = os.path.join(CONTRIB, "60-mta.conf")


def test_systemd_reads_the_unit_without_a_complaint(tmp_path):
    with open(UNIT) as fh:
        text = fh.read()
    # (the installed command is not on this machine: a binary that is)
    copy = tmp_path / "mta.service"
    copy.write_text(text.replace("/usr/local/bin/mta", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)


def test_the_unit_starts_after_the_network_and_the_clock():
    p = configparser.ConfigParser(strict=False, interpolation=None)
    p.optionxform = str
    p.read(UNIT)
    after = p["Unit"]["After"].split()
    assert "network-online.target" in after and "time-sync.target" in after
    assert p["Service"]["Type"] == "notify" and p["Service"]["User"] == "mta"


def test_sysctl_applies_the_settings_file():
    """Every line of it is a setting this kernel has, and takes (sysctl -p fails on an
    unknown key): applied in a fresh network namespace, whose settings it reads back."""
    r = subprocess.run(["unshare", "--net", "sh", "-c",
                        f"sysctl -q -p {SYSCTL} && cat /proc/sys/net/ipv4/tcp_migrate_req"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "1\n", (r.stdout, r.stderr)
