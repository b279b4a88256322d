"""Thread per connection, nothing else: no deadlines, no caps, no counters, no drain."""
import socket
import threading

from frames import announce, port_from_argv, split_whole_frames


def handle(sock):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = b""
    with sock:
        while data := sock.recv(65536):
            replies, pending = split_whole_frames(pending + data)
            if replies:
                sock.sendall(replies)


listener = socket.create_server(("127.0.0.1", port_from_argv()), backlog=4096)
announce(listener)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
