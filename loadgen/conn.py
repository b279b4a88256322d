"""Opening client sockets, and naming why a connection failed.

Failure kinds (the keys of a result's ``errors``): ``refused``, ``reset``,
``timeout``, ``emfile`` (this process is out of file descriptors),
``addr_unavailable`` (out of ephemeral ports for this source address),
``unreachable``, ``server_busy`` / ``rate_limited`` / ``idle_timeout`` /
``frame_timeout`` / ``server_error`` (an ERROR frame, by its reason),
``closed`` (EOF with no ERROR), ``protocol`` (a reply that is not the one
asked for), ``other``.
"""
from __future__ import annotations

import errno
import socket

from .params import LoadError, parse_target

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)   # Linux >= 4.2

ERRNO_REASONS = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.ECONNABORTED: "reset",
    errno.ETIMEDOUT: "timeout",
    errno.EMFILE: "emfile",
    errno.ENFILE: "emfile",
    errno.EADDRNOTAVAIL: "addr_unavailable",
    errno.EADDRINUSE: "addr_unavailable",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTUNREACH: "unreachable",
}

SERVER_REASONS = {
    "server busy": "server_busy",
    "rate limited": "rate_limited",
    "idle timeout": "idle_timeout",
    "frame timeout": "frame_timeout",
}


def reason_of(error: BaseException | int) -> str:
    """The failure kind of an OSError (or a bare errno)."""
    if isinstance(error, TimeoutError):
        return "timeout"
    code = error if isinstance(error, int) else getattr(error, "errno", None)
    return ERRNO_REASONS.get(code, "other")


def server_reason(payload: bytes) -> str:
    """The failure kind of an ERROR frame's reason text."""
    return SERVER_REASONS.get(payload.decode("utf-8", "replace").strip().lower(), "server_error")


def resolve(target: str) -> tuple:
    """(family, socket address) of ``HOST:PORT``, resolved once so hot loops never resolve."""
    host, port = parse_target(target)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LoadError(f"cannot resolve --target host {host!r}: {exc.strerror}") from None
    return infos[0][0], infos[0][4]


def new_socket(family: int, source: str | None = None) -> socket.socket:
    """A non-blocking TCP socket with Nagle off, bound to ``source`` if given.

    With a source address the port is still chosen at connect() time
    (IP_BIND_ADDRESS_NO_PORT), so each source address gets the whole
    ephemeral range per destination.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
    except OSError:
        sock.close()
        raise
    return sock


def connect(family: int, address, timeout: float, source: str | None = None) -> socket.socket:
    """A connected non-blocking socket, or OSError/TimeoutError."""
    sock = new_socket(family, source)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def probe(family: int, address, timeout: float) -> None:
    """Raise OSError if nothing accepts TCP connections at ``address``."""
    connect(family, address, timeout).close()
