"""A level-triggered select.epoll loop, nothing else: no deadlines, no caps, no counters, no drain.

Per readiness event: one recv, the whole frames it completes sent back at once; what the kernel
does not take waits for EPOLLOUT (reading stops meanwhile), a partial frame waits for more bytes.
"""
import select
import socket

from frames import announce, port_from_argv, split_whole_frames

IN, OUT = select.EPOLLIN, select.EPOLLOUT


class Connection:
    __slots__ = ("sock", "pending", "unsent")

    def __init__(self, sock):
        self.sock, self.pending, self.unsent = sock, b"", b""


def accept(listener, epoll, conns):
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns[sock.fileno()] = Connection(sock)
        epoll.register(sock.fileno(), IN)


def read(conn, fd, epoll):
    """Returns False once the peer is gone."""
    data = conn.sock.recv(65536)
    if not data:
        return False
    replies, conn.pending = split_whole_frames(conn.pending + data)
    if replies:
        sent = send(conn.sock, replies)
        if sent < len(replies):
            conn.unsent = replies[sent:]
            epoll.modify(fd, OUT)
    return True


def flush(conn, fd, epoll):
    conn.unsent = conn.unsent[send(conn.sock, conn.unsent):]
    if not conn.unsent:
        epoll.modify(fd, IN)
    return True


def send(sock, data):
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def serve(listener):
    listener.setblocking(False)
    listen_fd, epoll, conns = listener.fileno(), select.epoll(), {}
    epoll.register(listen_fd, IN)
    while True:
        for fd, events in epoll.poll():
            if fd == listen_fd:
                accept(listener, epoll, conns)
                continue
            conn = conns[fd]
            try:
                alive = flush(conn, fd, epoll) if conn.unsent else read(conn, fd, epoll)
            except BlockingIOError:                 # a recv woken for nothing
                alive = True
            except OSError:                         # the peer reset
                alive = False
            if not alive:
                epoll.unregister(fd)
                del conns[fd]
                conn.sock.close()


listener = socket.create_server(("127.0.0.1", port_from_argv()), backlog=4096)
announce(listener)
serve(listener)
