"""A ThreadPoolExecutor, a worker per connection, nothing else: no deadlines, no caps, no counters, no drain.

The yardstick for the threadpool backend's connection dispatch: ``--workers`` threads
(default: ThreadPoolExecutor's own), each running threads_echo.py's blocking loop for
one connection at a time; connections beyond them wait in the executor's queue.
"""
import argparse
import socket
from concurrent.futures import ThreadPoolExecutor

from frames import announce, split_whole_frames


def handle(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    with sock:
        while data := sock.recv(65536):
            replies, pending = split_whole_frames(pending + data)
            if replies:
                sock.sendall(replies)


parser = argparse.ArgumentParser(description="a minimal framed ECHO server on a thread pool (no limits, no deadlines)")
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--workers", type=int, default=None, help="worker threads (default: ThreadPoolExecutor's own)")
args = parser.parse_args()
listener = socket.create_server(("127.0.0.1", args.port), backlog=4096)
pool = ThreadPoolExecutor(args.workers)
announce(listener)
while True:
    conn, _ = listener.accept()
    pool.submit(handle, conn)
