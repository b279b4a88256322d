"""What the kernel knows about TCP sockets, asked cheaply: counts by state on one port, one socket's unsent bytes.

``count``: /proc/net/tcp lists every socket of the machine, and psutil's
``net_connections`` parses it and reads every fd of the process besides: with
thousands of connections that is a long stretch of Python holding the GIL,
and a single-threaded server stalls for all of it. sock_diag (NETLINK_SOCK_DIAG, what ``ss`` uses) runs a
small filter program in the kernel ("local port == P", the states asked for)
and returns only the matches. When netlink is not available the caller falls
back to something slower. The servers' metrics and the harness's sampler both
count this way.

``close_wait_sockets``: which sockets on a port are in CLOSE_WAIT, each named
by the kernel's socket cookie (unique while the socket lives), so a reader
sampling twice can tell a socket that stays there from two that passed
through.

``unsent``: the bytes a socket's send queue holds that TCP has not sent yet
(SIOCOUTQNSD), because the peer's receive window has no room for them. A
graceful close queues its FIN behind them; a peer that never reads them
leaves that socket in FIN-WAIT-1, holding the data, long after the server
forgot it. Bytes in flight are not counted: the window had room for them, so
the peer takes them (and a delayed ACK does not hold up a close). The
event-loop backends ask before closing, and watch the number to see whether
a reply still makes progress.
"""
from __future__ import annotations

import fcntl
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3
TCP_ESTABLISHED, TCP_TIME_WAIT, TCP_CLOSE_WAIT = 1, 6, 8
SIOCOUTQNSD = 0x894B           # linux/sockios.h: bytes in the send queue not yet sent
STATE_NAMES = {TCP_ESTABLISHED: "tcp_established", TCP_TIME_WAIT: "tcp_time_wait", TCP_CLOSE_WAIT: "tcp_close_wait"}
RECV_BUFFER = 1 << 20
TIMEOUT_S = 2.0

NLMSG = struct.Struct("=IHHII")                # len, type, flags, seq, pid
COOKIE_AT = 4 + 2 + 2 + 16 + 16 + 4            # inet_diag_msg: family, state, timer, retrans; sockid up to its cookie
COOKIE = struct.Struct("=Q")
REQ = struct.Struct("=BBBBI48s")               # family, protocol, ext, pad, states, sockid (zeros)
RTATTR = struct.Struct("=HH")
BC_OP = struct.Struct("=BBH")                  # code, yes, no


def port_filter(port: int) -> bytes:
    """Bytecode: accept iff sport >= port and sport <= port (jump past the end = reject)."""
    length = 4 * BC_OP.size
    return (BC_OP.pack(INET_DIAG_BC_S_GE, 8, length + 4) + BC_OP.pack(0, 0, port) +
            BC_OP.pack(INET_DIAG_BC_S_LE, 8, length - 8 + 4) + BC_OP.pack(0, 0, port))


def request(family: int, port: int, seq: int, states=STATE_NAMES) -> bytes:
    states = sum(1 << state for state in states)
    bytecode = port_filter(port)
    body = REQ.pack(family, socket.IPPROTO_TCP, 0, 0, states, bytes(48))
    body += RTATTR.pack(RTATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    return NLMSG.pack(NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def count(port: int, states=STATE_NAMES) -> dict:
    """{tcp_established, tcp_close_wait, tcp_time_wait} for local ``port`` (or only ``states``, a few of
    the TCP_* numbers above); OSError if netlink fails."""
    counts = dict.fromkeys((STATE_NAMES[state] for state in states), 0)
    _dump(port, states, counts)
    return counts


def close_wait_sockets(port: int) -> frozenset:
    """The cookies of the sockets of local ``port`` in CLOSE_WAIT; OSError if netlink fails."""
    cookies: set = set()
    _dump(port, (TCP_CLOSE_WAIT,), dict.fromkeys((STATE_NAMES[TCP_CLOSE_WAIT],), 0), cookies)
    return frozenset(cookies)


def _dump(port: int, states, counts: dict, cookies: set | None = None) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(TIMEOUT_S)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            sock.send(request(family, port, seq, states))
            _read_dump(sock, counts, cookies)


def unsent(fd: int) -> int:
    """Bytes in the send queue of TCP socket ``fd`` not sent yet, for want of window (0 if it cannot say)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _read_dump(sock, counts: dict, cookies: set | None = None) -> None:
    while True:
        data = sock.recv(RECV_BUFFER)
        offset = 0
        while offset + NLMSG.size <= len(data):
            length, kind, _, _, _ = NLMSG.unpack_from(data, offset)
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                error = -struct.unpack_from("=i", data, offset + NLMSG.size)[0]
                if error:
                    raise OSError(error, "sock_diag request failed")
                return
            if kind == SOCK_DIAG_BY_FAMILY:
                state = data[offset + NLMSG.size + 1]
                name = STATE_NAMES.get(state)
                if name in counts:
                    counts[name] += 1
                    if cookies is not None:
                        cookies.add(COOKIE.unpack_from(data, offset + NLMSG.size + COOKIE_AT)[0])
            if length < NLMSG.size:
                raise OSError("malformed netlink message")
            offset += (length + 3) & ~3
