"""Profiles: how many points, how long each, per experiment.

``quick`` is sized so that ``conclab run all --profile quick`` finishes in about
five minutes on a 2-core box with every backend (few points, 1 s each plus a
short warm-up, one round: 8 variants x 7 experiments leave no room for more):
the demo; ``standard`` is the reference run (3 interleaved rounds of 3 s points,
its budget below); ``full`` is the real sweep (10 s points, the whole concurrency
range, memory up to the file limit, 3 rounds); ``tiny`` exists for the harness's
own tests (seconds). ``rounds`` is the number of interleaved rounds a run makes
when ``--repeat`` is not given. Every field is a named tunable and is written to
manifest.json.
"""
from __future__ import annotations

import dataclasses
import os
import resource
from dataclasses import dataclass

FD_MARGIN = 200                 # fds a server keeps besides connections (listener, stdio, epoll, Go's runtime)


@dataclass(frozen=True)
class Profile:
    name: str
    point_s: float              # measured duration of one load point
    warmup_s: float             # load generator warm-up before measuring (not counted)
    sample_interval_s: float    # server sampler period
    settle_s: float             # pause after connections are up, before memory is read
    ramp_timeout_s: float       # longest wait for held connections to be accepted
    connect_rate: float         # new connections/s the generator opens when holding (--connect-rate)
    memory_conns: tuple         # idle connections held per memory point ("limit": the file limit)
    throughput_conns: tuple     # closed-loop concurrency sweep
    reference_conns: int        # the targets' point: closed loop, this many conns, 64 B ECHO
    size: int                   # payload bytes of ECHO
    latency_conns: int          # connections the open-loop generator spreads its rate over
    latency_fractions: tuple    # offered rates, as fractions of the backend's measured capacity
    io_conns: tuple             # io_bound concurrency sweep
    io_us: int                  # WORK wait per request
    cpu_conns: tuple            # cpu_bound concurrency
    cpu_us: int                 # WORK compute per request
    cpu_wide_variants: tuple    # variants also run with the server on every CPU ("*": all)
    c10k_conns: int             # idle connections held in c10k
    c10k_probe_conns: int       # the small closed loop that measures p99 meanwhile
    switch_rounds: int          # rounds per microbenchmark (the median is reported)
    switch_round_s: float       # target duration of one round
    pool_workers: int           # threadpool --workers (ThreadPoolExecutor's default formula)
    rounds: int = 1             # interleaved rounds when --repeat is not given (every variant per round)
    pitfall_s: float = 2.0      # pitfalls: how long the clients run (leak churn, hard-kill before SIGTERM)
    pitfall_rate: float = 200   # pitfalls: new connections/s (leak churn, silent and unbounded ramps)
    pitfall_silent: int = 100   # pitfalls no-deadline: silent clients holding connections
    pitfall_idle_s: float = 0.5  # pitfalls no-deadline: the fixed server's --idle-timeout
    pitfall_cap: int = 200      # pitfalls unbounded: the fixed server's --max-conns (3x as many connect)
    pool_sizes: tuple = (2, 6, 32, 128, 512, 2048)     # pool_sizing: thread pool --workers swept
    pool_conns: int = 1000      # pool_sizing: closed-loop connections at every pool size
    message_sizes: tuple = (64, 1024, 16_384, 65_536, 1_048_575)   # message_sizes: payload bytes (the largest
                                # fills the servers' default --max-frame, 1 MiB: a frame is op byte + payload)
    message_conns: int = 50     # message_sizes: closed-loop connections
    mn_conns: int = 10_000      # m_to_n: idle connections held
    convoy_conns: int = 8       # convoy: open-loop ECHO connections (the latency measured)
    convoy_rate: float = 400    # convoy: ECHO requests/s offered over them, with and without the CPU work
    convoy_cpu_conns: int = 2   # convoy: closed-loop connections sending CPU-only WORK beside them (K)
    convoy_cpu_us: int = 2000   # convoy: each of those requests' busy loop, holding the GIL
    cores_conns: int = 50       # cores: closed-loop connections, ECHO and CPU-only WORK (cpu_us each)
    redis_rtt_calls: int = 1000  # redis_call: EVALSHA round trips timed per variant and round (their median)

    def memory_points(self) -> list[int]:
        """memory_conns with "limit" resolved to this process's file limit (minus a margin)."""
        limit = max(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_MARGIN)
        points = {limit if n == "limit" else min(int(n), limit) for n in self.memory_conns}
        return sorted(points)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_workers() -> int:
    """ThreadPoolExecutor's default: min(32, cpu count + 4)."""
    return min(32, (os.cpu_count() or 1) + 4)


QUICK = Profile(
    name="quick", point_s=1.0, warmup_s=0.2, sample_interval_s=0.25, settle_s=0.3, ramp_timeout_s=20.0,
    connect_rate=5000,
    memory_conns=(0, 10_000), throughput_conns=(1, 50, 500), reference_conns=50, size=64,
    latency_conns=50, latency_fractions=(0.5, 0.9, 1.2), io_conns=(10, 100, 1000), io_us=10_000,
    cpu_conns=(50,), cpu_us=200, cpu_wide_variants=("go", "threads"), c10k_conns=10_000, c10k_probe_conns=10,
    switch_rounds=3, switch_round_s=0.1, pool_workers=default_workers(),
    pitfall_s=2.0, pitfall_rate=200, pitfall_silent=100, pitfall_idle_s=0.5, pitfall_cap=200,
    pool_sizes=(2, 32, 512), pool_conns=200, message_sizes=(64, 16_384, 1_048_575), message_conns=10,
    mn_conns=10_000, convoy_conns=8, convoy_rate=400, convoy_cpu_conns=2, convoy_cpu_us=2000, cores_conns=50,
    redis_rtt_calls=200,
)

FULL = Profile(
    name="full", point_s=10.0, warmup_s=1.0, sample_interval_s=0.5, settle_s=1.0, ramp_timeout_s=60.0,
    connect_rate=5000,
    memory_conns=(0, 1000, 2500, 5000, 10_000, 15_000, "limit"),
    throughput_conns=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), reference_conns=50, size=64,
    latency_conns=50, latency_fractions=(0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5),
    io_conns=(10, 20, 50, 100, 200, 500, 1000, 2000, 5000), io_us=10_000,
    cpu_conns=(1, 10, 50, 200), cpu_us=200, cpu_wide_variants=("*",), c10k_conns=10_000, c10k_probe_conns=10,
    switch_rounds=7, switch_round_s=0.5, pool_workers=default_workers(), rounds=3,
    pitfall_s=10.0, pitfall_rate=300, pitfall_silent=300, pitfall_idle_s=1.0, pitfall_cap=1000,
    pool_sizes=(2, 6, 32, 128, 512, 2048), pool_conns=1000, message_conns=50, mn_conns=10_000,
)

# standard: what results/reference is (`conclab run all --profile standard --run-id reference`): 3 interleaved
# rounds (every number a median with min, max and a 95 % interval), 3 s points, 6 latency rates from 0.1x capacity,
# memory at 0, 1000, 2500, 5000 and 10,000 connections, and C10K at 10,000. The sweeps are trimmed to one point
# each (throughput: the reference point, 50 connections, which latency also takes its capacity from; io_bound: 50
# connections, where the request-dispatch pool is held to workers / wait = 600 rps while the other models reach
# connections / wait = 5000: at 1000 connections the pool's requests wait ~1.7 s, too long for a 3 s point).
#
# Budget arithmetic, 8 variants x 3 rounds = 24 variant-rounds, with the costs measured on this 2-core machine,
# quiet (a load point: 3 s + 0.2 s warm-up + ~0.3 s generator start-up, connecting and STATS = ~3.5 s; one past
# saturation drains for up to 2 s more; a server start and stop ~0.6 s per variant, round and experiment):
#   memory      one server per variant-round, N held in steps to 10,000: ~10 s each     ~  250 s
#   throughput  24 x 3.5 s                                                              ~   85 s
#   latency     24 x up to 6 x 3.5..5.5 s: a variant-round stops offering higher rates
#               once the generator saturates (those points would measure it)           ~  400..550 s
#   io_bound    24 x 3.5 s                                                              ~   85 s
#   cpu_bound   24 x 3.5 s + 3 x 4 s (go also on both CPUs)                             ~  100 s
#   c10k        24 x ~7.3 s (hold 10,000, a 3 s probe, release, stop)                  ~  175 s
#   switch (microbenchmarks ~35 s) + calibration at start and end (~11 s)              ~   45 s
#   total                                                                               ~ 19..22 min
# Run only when named (not part of `all`), every backend, 3 rounds, estimated from quick runs here:
#   pool_sizing    15 servers (12 pool sizes x dispatch, go, asyncio, gevent) x 2 points x 3 rounds,
#                  ~4..6 s a point at 1000 connections (head-of-line points drain up to 2 s more)   ~  8..9 min
#   message_sizes  8 variants x 5 sizes x 3 rounds x ~4 s                                          ~  8 min
#   m_to_n         24 variant-rounds x ~7..10 s (hold 10,000, read, release, stop)                 ~  3..4 min
#   convoy         16 servers (threads x 3 switch intervals, 5 other Python models, go x 2 GOMAXPROCS,
#                  6 Python models --procs 2) x 2 points (without, with CPU work) x 3 rounds x ~4 s ~  6..7 min
#   cores          8 variants x 4 servers (1 or 2 CPUs x procs or GOMAXPROCS 1 or 2) x 2 loads
#                  x 3 rounds x ~3.5 s, plus a server start per server                             ~ 12 min
#   redis_call     8 variants x 2 stores (Redis, memory), the two pools x 2 sizes more (default, Little's law):
#                  20 servers x 1 point x 3 rounds x ~4.1 s (3.5 s a point + a server start and stop), plus
#                  1000 timed EVALSHAs (~0.1 s) per variant-round and one redis-server start          ~  4..5 min
STANDARD = Profile(
    name="standard", point_s=3.0, warmup_s=0.2, sample_interval_s=0.5, settle_s=0.3, ramp_timeout_s=30.0,
    connect_rate=5000,
    memory_conns=(0, 1000, 2500, 5000, 10_000), throughput_conns=(50,), reference_conns=50, size=64,
    latency_conns=50, latency_fractions=(0.1, 0.3, 0.5, 0.7, 0.9, 1.1), io_conns=(50,), io_us=10_000,
    cpu_conns=(50,), cpu_us=200, cpu_wide_variants=("go",), c10k_conns=10_000, c10k_probe_conns=10,
    switch_rounds=5, switch_round_s=0.1, pool_workers=default_workers(), rounds=3,
    pitfall_s=2.0, pitfall_rate=200, pitfall_silent=100, pitfall_idle_s=0.5, pitfall_cap=200,
    pool_sizes=(2, 6, 32, 128, 512, 2048), pool_conns=1000, message_conns=50, mn_conns=10_000,
    redis_rtt_calls=1000,
)

TINY = Profile(
    name="tiny", point_s=0.3, warmup_s=0.0, sample_interval_s=0.1, settle_s=0.05, ramp_timeout_s=5.0,
    connect_rate=2000, memory_conns=(0, 30), throughput_conns=(4,), reference_conns=4, size=64,
    latency_conns=4, latency_fractions=(0.5, 1.5), io_conns=(8,), io_us=10_000,
    cpu_conns=(4,), cpu_us=200, cpu_wide_variants=(), c10k_conns=40, c10k_probe_conns=2,
    switch_rounds=1, switch_round_s=0.01, pool_workers=default_workers(),
    pitfall_s=0.8, pitfall_rate=200, pitfall_silent=20, pitfall_idle_s=0.3, pitfall_cap=20,
    pool_sizes=(2, 16), pool_conns=8, message_sizes=(64, 65_536), message_conns=2, mn_conns=200,
    convoy_conns=2, convoy_rate=100, convoy_cpu_conns=1, convoy_cpu_us=2000, cores_conns=4, redis_rtt_calls=50,
)

PROFILES = {p.name: p for p in (QUICK, STANDARD, FULL, TINY)}
