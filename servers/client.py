"""A blocking framed-protocol client: the one the launcher, ``conclab check`` and the tests talk with.

One socket, one ``FrameDecoder``, a timeout on every blocking call (the
constructor's, changeable through ``sock.settimeout``). It sends whatever it is
asked to, well-formed or not, and reports how the server ended the connection
(``ending``, ``closed_by_server``), so the reliability scenarios can be written
with it. ``stats()`` is the lab's one STATS client: ``ServerProcess.stats`` is
a fresh ``Client`` asking it.

The load generator does not use this: it has its own non-blocking engine.
"""
from __future__ import annotations

import contextlib
import json
import socket
import struct

from . import protocol
from .protocol import FrameDecoder

IO_TIMEOUT_S = 10.0
RECV_SIZE = 1 << 20


class Client:
    """A blocking connection to a lab server: send frames (or raw bytes), read frames."""

    def __init__(self, address, timeout: float = IO_TIMEOUT_S, receive_buffer: int | None = None) -> None:
        """``receive_buffer``: a fixed SO_RCVBUF set before connecting (no autotuning), so the
        window the server sees opens as this client reads, not in the kernel's own bursts."""
        if receive_buffer is None:
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        self.decoder = FrameDecoder(max_frame=2**32 - 1)      # a client accepts whatever length a server sends
        self.frames: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_frame(self) -> tuple[int, bytes]:
        """The next frame; ConnectionError if the server closes first."""
        while not self.frames:
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("closed by the server")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def send_frame(self, op: int, payload: bytes = b"") -> None:
        self.sock.sendall(protocol.encode(op, payload))

    def request(self, op: int, payload: bytes = b"") -> tuple[int, bytes]:
        self.send_frame(op, payload)
        return self.recv_frame()

    def stats(self) -> dict:
        """The server's STATS counters (this request counts as one). Raises ConnectionError on any other answer."""
        op, payload = self.request(protocol.STATS)
        if op != protocol.STATS:
            raise ConnectionError(f"STATS answered with op {op:#x}: {payload[:80]!r}")
        return json.loads(payload)

    def ending(self, timeout: float) -> str:
        """Read until the server closes: 'eof', 'reset', 'garbage' or 'open' (still open after ``timeout``)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    return "eof"
                self.frames.extend(self.decoder.feed(data))
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except TimeoutError:
            return "open"
        except protocol.ProtocolError:
            return "garbage"

    def closed_by_server(self) -> bool:
        """True if the server closed (EOF or reset) with no more data before the timeout."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0), not FIN."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
