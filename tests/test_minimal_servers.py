"""The bare twins in benchmarks/minimal/ (the overhead benchmark's yardsticks) answer ECHO correctly.

A yardstick that dropped or mangled replies would make every full backend look slow; each bare server gets the
same byte streams as a full backend would: one frame, frames coalesced in one write, a frame split across writes,
an empty payload and a large one, on several connections at once.
"""
from __future__ import annotations

import shutil
import socket

import pytest

from conclab.servers import protocol
from conclab.servers.launcher import ServerProcess

pytestmark = pytest.mark.live



def frame(payload: bytes) -> bytes:
    return protocol.encode(protocol.ECHO, payload)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        assert chunk, f"closed after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


MODEL_NAMES = ("threads", "threadpool", "asyncio", "uvloop", "gevent", "epoll", "go")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bare_twin_echoes_whole_split_and_coalesced_frames(bench, name):
    model = next(m for m in bench.MODELS if m.name == name)
    if name == "go" and shutil.which("go") is None:
        pytest.fail("the go toolchain is missing: .ci/run installs it")
    with ServerProcess.command(model.bare_command(4), name=f"{name}-bare") as server:
        host, port = server.target.rsplit(":", 1)
        clients = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        try:
            for i, sock in enumerate(clients):
                frames = [frame(b"a" * 64), frame(b""), frame(bytes(range(256)) * 40), frame(b"%d" % i)]
                stream = b"".join(frames)
                sock.sendall(stream[:3])                       # a header split
                sock.sendall(stream[3:70])                     # the rest of frame 1 and part of frame 2
                sock.sendall(stream[70:])                      # the rest, coalesced
                assert read_exactly(sock, len(stream)) == stream
        finally:
            for sock in clients:
                sock.close()
