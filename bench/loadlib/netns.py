"""The private network namespace: nothing the harness starts can reach beyond loopback."""
from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sh22x"  # struct ifreq on Linux: name + short flags, padded to 40 octets


def enter_private_netns(mode: str) -> bool:
    """Move this process into a new network namespace with only loopback up.

    mode: 'no' (never), 'yes' (or exit), 'auto' (when permitted).  Returns True if done."""
    if mode == "no":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        msg = f"cannot create a network namespace: {os.strerror(err)}"
        if mode == "yes":
            sys.exit(f"load.py: {msg}")
        print(f"warning: {msg}; running in the host's network namespace "
              "(traffic still goes to 127.0.0.1 only)", file=sys.stderr)
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack(IFREQ, fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))
    return True
