"""What every minimal server shares: the port argument, the ready line, and cutting whole frames off a buffer."""
from __future__ import annotations

import argparse
import struct

HEADER = struct.Struct(">I")


def split_whole_frames(pending: bytes) -> tuple[bytes, bytes]:
    """(the whole frames at the front of pending, the rest). An ECHO reply is its request, byte for byte."""
    start = 0
    while len(pending) - start >= 4:
        end = start + 4 + HEADER.unpack_from(pending, start)[0]
        if end > len(pending):
            break
        start = end
    return pending[:start], pending[start:]


def port_from_argv() -> int:
    parser = argparse.ArgumentParser(description="a minimal framed ECHO server (no limits, no deadlines)")
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args().port


def announce(sock) -> None:
    host, port = sock.getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
