"""`sd_notify` for the systemd `Type=notify` unit: READY=1 once serving, STOPPING=1 on stop.

A datagram to the socket named by $NOTIFY_SOCKET (an abstract one when it
starts with '@'). Without the variable (launchd, a terminal) it does nothing.
"""

from __future__ import annotations

import os
import socket


def sd_notify(message: str) -> bool:
    """Send `message`; return whether there was a socket to send it to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True
