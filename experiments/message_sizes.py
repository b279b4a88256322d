"""Experiment message_sizes: closed loop at payloads from 64 B to 1 MiB, per model: requests/s and MB/s.

Each connection of a closed loop (``profile.message_conns``, 50) sends an
ECHO of S bytes and waits for the reply, for S in ``profile.message_sizes``:
64 B, 1 KiB, 16 KiB, 64 KiB and 1 MiB. The largest payload is 1,048,575 B,
not 1,048,576: a frame's length counts its op byte too (docs/protocol.md), and
the servers' default ``--max-frame`` is 1,048,576, so this is the largest
ECHO every server accepts without a non-default option (``max_frame`` in each
row is what the server ran with).

Small messages measure the cost per request (system calls, hand-offs, the
interpreter); large ones measure copying: ``mb_per_s`` = requests/s x payload
bytes / 10^6, the payload echoed per second in each direction. One server per
variant and round serves every size, smallest first.
"""
from __future__ import annotations

import time

from conclab.servers.protocol import DEFAULT_MAX_FRAME

from .harness.run import describe, key

NAME = "message_sizes"
BYTES_PER_MB = 1e6
CONN_MARGIN = 100


def run(run) -> None:
    run.each_variant(NAME, lambda variant, repeat: measure_variant(run, variant, repeat))


def sizes(profile) -> list:
    """The payloads to measure, each one that fits a frame (op byte + payload <= the default max frame)."""
    return sorted({s for s in profile.message_sizes if 0 <= s <= DEFAULT_MAX_FRAME - 1})


def mb_per_s(throughput_rps, size: int):
    """Payload MB (10^6 B) echoed per second, one direction; None without a throughput."""
    return throughput_rps * size / BYTES_PER_MB if throughput_rps is not None else None


def measure_variant(run, variant, repeat: int) -> None:
    conns = run.profile.message_conns
    with run.serve(NAME, variant, repeat, max_conns=conns + CONN_MARGIN) as server:
        for size in sizes(run.profile):
            started = time.monotonic()
            row = run.measure(server, f"size={size}", "closed", conns, size=size, op="echo")
            row.update(key(NAME, variant, repeat), size=size, conns=conns, max_frame=DEFAULT_MAX_FRAME,
                       mb_per_s=mb_per_s(row.get("throughput_rps"), size), server_cpus=run.server_cpus)
            run.write(NAME, row)
            run.progress(f"[{NAME}] {variant.name} size={size} r{repeat}: {describe(row)}, "
                         f"{row['mb_per_s'] or 0:.1f} MB/s ({time.monotonic() - started:.1f} s)")
