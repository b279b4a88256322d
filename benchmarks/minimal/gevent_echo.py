"""A greenlet per connection (gevent's StreamServer), nothing else: no deadlines, no caps, no counters, no drain."""
import socket

from gevent.server import StreamServer

from frames import announce, port_from_argv, split_whole_frames


def handle(sock, _address):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    while data := sock.recv(65536):
        replies, pending = split_whole_frames(pending + data)
        if replies:
            sock.sendall(replies)


server = StreamServer(("127.0.0.1", port_from_argv()), handle, backlog=4096)
server.start()
announce(server.socket)
server.serve_forever()
