"""The pitfall lab: each risk of the article's table, broken (``--fault X``) against fixed.

The article the lab answers (docs/article.md, a Go interview write-up) lists
three risks and their remedies, and asks for a graceful shutdown besides:

    风险点 (risk)          后果 (consequence)              解决方案 (remedy)
    未关闭conn             文件描述符泄漏                   defer conn.Close()
    (conn not closed)      (file descriptor leak)
    无读超时机制            恶意客户端占连接                 conn.SetReadDeadline()
    (no read timeout)      (malicious clients hold conns)
    不限并发数              内存/CPU过载                    使用带缓冲的channel做限流
    (unbounded concurrency) (memory/CPU overload)          (a buffered channel as a limiter)
    优雅关闭 (graceful shutdown) / CLOSE_WAIT monitoring

Every backend has the switches (servers/config.py ``--fault``). For each
pitfall and each variant this runs the broken server and the fixed one (no
fault) under the same scripted clients (in-process sockets, driven from the
harness's CPUs) and samples both over time: fds, CLOSE_WAIT, RSS, threads,
and what the clients saw (served, starved, replies lost).

* ``leak``: clients connect, PING, hang up, at ``pitfall_rate`` per second for
  ``pitfall_s``. Broken: fds and CLOSE_WAIT grow by one per client; fixed: flat.
* ``no-deadline``: ``pitfall_silent`` clients connect and send nothing; then a
  fresh client arrives every FRESH_EVERY_S and PINGs, giving up after
  PATIENCE_S. The fixed server has ``--idle-timeout pitfall_idle_s``. The
  connection-dispatch thread pool is the lesson: every worker owns a silent
  client, so fresh clients starve for ever when broken, and for
  ceil(silent / workers) x idle timeout when fixed (the window is sized to see that).
* ``unbounded``: UNBOUNDED_FACTOR x ``pitfall_cap`` connections at
  ``pitfall_rate``, each PINGs once and stays. Fixed: ``--max-conns
  pitfall_cap``, the rest get ERROR "server busy" (counted starved, and
  ``rejected`` in the summary); broken: memory (and threads) climb with every one.
* ``hard-kill``: WORK_CONNS closed-loop clients with WORK (WORK_IO_US) in
  flight; after ``pitfall_s`` the harness stops sending and sends SIGTERM.
  Broken: the process dies at once and the replies in flight are lost; fixed:
  the drain answers every request sent before the signal (0 lost), exit 0.

Rows: pitfalls.csv (the time series) and pitfalls_summary.csv (one row per
variant x pitfall x fixed, the final figures). Not part of ``all`` (it would
push ``all --profile quick`` past its five minutes); run it with
``conclab run pitfalls``. Without ``--backends`` it runs DEFAULT_VARIANTS, one
of each kind of model. ``--repeat`` does not apply: one time series per case.
"""
from __future__ import annotations

import dataclasses
import math
import selectors
import socket
import threading
import time

from conclab.servers import protocol
from conclab.servers.protocol import ERROR, PING, PONG, WORK, FrameDecoder

from conclab.servers.launcher import ServerStartError

from . import registry

NAME = "pitfalls"
PITFALLS = tuple(p.name for p in registry.pitfalls())   # leak, no-deadline, unbounded, hard-kill: SCRIPTS has each
DEFAULT_VARIANTS = ("threads", "threadpool", "asyncio", "go")   # thread/conn, pool, event loop, goroutines
PATIENCE_S = 1.0               # a client that got no reply in this long gives up (counted starved)
FRESH_EVERY_S = 0.2            # no-deadline: a fresh client every this often
SILENT_SETTLE_S = 0.3          # no-deadline: fresh clients start this long after the silent ones are in
UNBOUNDED_FACTOR = 3           # unbounded: connections opened = this x the cap of the fixed server
WORK_CONNS = 16                # hard-kill: closed-loop clients
WORK_IO_US = 300_000           # hard-kill: each WORK waits this long in the server
KILL_TAIL_S = 0.5              # hard-kill: sampling goes on this long after the server exited
DRAIN_TIMEOUT_S = 5.0          # hard-kill: the fixed server's --drain-timeout
RESOLVE_SLACK_S = 2.0          # hard-kill: after the drain deadline, what is still unanswered is lost
POLL_S = 0.02
PING_FRAME = protocol.encode(PING, b"")


# -- scripted clients -------------------------------------------------------------------------------

class Tally:
    """What the clients saw so far (read by the sampling thread while the clients run)."""

    def __init__(self) -> None:
        self.served = self.starved = self.rejected = self.lost = self.sent = self.dropped = 0
        self.clients = 0
        self.stopping = False
        self.lock = threading.Lock()           # hard-kill: no request is sent once stopping is set
        self.measured = threading.Event()      # the clients are done: take the last sample...
        self.release = threading.Event()       # ...and only then may they close their connections


class Client:
    __slots__ = ("decoder", "outstanding", "role", "since", "sock")

    def __init__(self, sock, role: str) -> None:
        self.sock, self.role = sock, role
        self.decoder = FrameDecoder()
        self.outstanding = 0
        self.since = time.monotonic()


def connect(address, tally: Tally, role: str, send: bytes | None = PING_FRAME) -> Client | None:
    """A new client (blocking connect, then non-blocking); None and starved += 1 if it cannot connect."""
    tally.clients += 1
    try:
        sock = socket.create_connection(address, timeout=PATIENCE_S)
        sock.setblocking(False)
        client = Client(sock, role)
        if send:
            sock.send(send)
            tally.sent += 1
            client.outstanding = 1
        return client
    except OSError:
        tally.starved += 1
        return None


class Loop:
    """A selector over the clients: replies, closes, patience."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.selector = selectors.DefaultSelector()
        self.clients: set = set()

    def add(self, client: Client | None) -> None:
        if client is not None:
            self.clients.add(client)
            self.selector.register(client.sock, selectors.EVENT_READ, client)

    def close(self, client: Client) -> None:
        if client in self.clients:
            self.clients.discard(client)
            self.selector.unregister(client.sock)
        client.sock.close()

    def poll(self, timeout: float, on_reply=None, patience: float | None = PATIENCE_S) -> None:
        for key, _ in self.selector.select(timeout):
            client = key.data
            try:
                data = client.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.tally.lost += client.outstanding
                if client.role == "silent":
                    self.tally.dropped += 1
                self.close(client)
                continue
            for op, payload in client.decoder.feed(data):
                if op == ERROR:
                    if payload == b"server busy":
                        self.tally.rejected += 1
                        self.tally.starved += 1
                    elif client.role == "silent":
                        self.tally.dropped += 1
                    else:
                        self.tally.lost += client.outstanding
                    client.outstanding = 0
                    self.close(client)
                    break
                if op in (PONG, WORK):
                    self.tally.served += 1
                    client.outstanding -= 1
                    if on_reply is not None:
                        on_reply(client)
                    elif client.role == "once":
                        self.close(client)
                        break
        if patience is not None:
            now = time.monotonic()
            for client in [c for c in self.clients if c.outstanding and now - c.since > patience]:
                self.tally.starved += 1
                client.outstanding = 0
                self.close(client)

    def close_all(self, pending_starved: bool = True) -> None:
        for client in list(self.clients):
            if pending_starved and client.outstanding:
                self.tally.starved += 1
            self.close(client)
        self.selector.close()


def paced(rate: float):
    """Sleep so that successive calls happen ``rate`` times a second."""
    start, n = time.monotonic(), 0
    def wait() -> None:
        nonlocal n
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
    return wait


def leak_clients(address, tally: Tally, plan: dict, done: threading.Event) -> None:
    """Connect, PING, wait for PONG, hang up: again and again."""
    until, wait = time.monotonic() + plan["duration"], paced(plan["rate"])
    while time.monotonic() < until:
        client = connect(address, tally, "once")
        if client is not None:
            loop = Loop(tally)
            loop.add(client)
            while loop.clients:
                loop.poll(POLL_S)
            loop.close_all()
        wait()


def no_deadline_clients(address, tally: Tally, plan: dict, done: threading.Event) -> None:
    """Silent clients hold connections; then fresh clients try to be served."""
    loop, wait = Loop(tally), paced(plan["rate"])
    start = time.monotonic()
    for _ in range(plan["silent"]):
        loop.add(connect(address, tally, "silent", send=None))
        wait()
    time.sleep(SILENT_SETTLE_S)
    next_fresh = time.monotonic()
    while time.monotonic() < start + plan["duration"]:
        if time.monotonic() >= next_fresh:
            loop.add(connect(address, tally, "once"))
            next_fresh += FRESH_EVERY_S
        loop.poll(POLL_S)
    tally.measured.set()
    tally.release.wait(RELEASE_WAIT_S)
    loop.close_all()


def unbounded_clients(address, tally: Tally, plan: dict, done: threading.Event) -> None:
    """Many connections, each PINGs once and stays open."""
    loop, wait = Loop(tally), paced(plan["rate"])
    until = time.monotonic() + plan["duration"]
    for _ in range(plan["conns"]):
        loop.add(connect(address, tally, "stay"))
        loop.poll(0, patience=None)
        wait()
    while time.monotonic() < until:
        loop.poll(POLL_S, patience=None)
    tally.measured.set()
    tally.release.wait(RELEASE_WAIT_S)
    loop.close_all()


def work_clients(address, tally: Tally, plan: dict, done: threading.Event) -> None:
    """Closed loop of WORK; once ``tally.stopping`` is set no new request goes out, replies are awaited."""
    frame = protocol.encode_work(WORK_IO_US, 0, b"in flight")
    loop = Loop(tally)

    def next_request(client: Client) -> None:
        with tally.lock:
            if tally.stopping:
                return
            try:
                client.sock.send(frame)
            except OSError:
                return
            tally.sent += 1
            client.outstanding += 1

    clients = [connect(address, tally, "work", send=None) for _ in range(plan["conns"])]
    for client in clients:                       # staggered over one WORK wait: replies never come all at once,
        loop.add(client)                         # so some request is always in flight when the signal comes
        if client is not None:
            next_request(client)
        loop.poll(WORK_IO_US / 1e6 / plan["conns"], on_reply=next_request, patience=None)
    while not done.is_set() and (not tally.stopping or any(c.outstanding for c in loop.clients)):
        loop.poll(POLL_S, on_reply=next_request, patience=None)
    for client in list(loop.clients):           # the deadline passed: what is still unanswered is lost
        tally.lost += client.outstanding
        client.outstanding = 0
    tally.measured.set()
    tally.release.wait(RELEASE_WAIT_S)
    loop.close_all()


SCRIPTS = {"leak": leak_clients, "no-deadline": no_deadline_clients, "unbounded": unbounded_clients,
           "hard-kill": work_clients}
RELEASE_WAIT_S = 10.0


def script(pitfall: str, address, tally: Tally, plan: dict, done: threading.Event) -> None:
    """Run one pitfall's clients; they close their connections only after the last sample."""
    try:
        SCRIPTS[pitfall](address, tally, plan, done)
    finally:
        tally.measured.set()


# -- the experiment ---------------------------------------------------------------------------------

def chosen_variants(run) -> list:
    """--backends if given, else DEFAULT_VARIANTS (the ones the run has)."""
    if (run.params or {}).get("backends_option"):
        return list(run.variants)
    return [v for v in run.variants if v.name in DEFAULT_VARIANTS]


def run(run) -> None:
    if run.repeat > 1:
        run.progress(f"[{NAME}] --repeat {run.repeat} does not apply: one time series per case")
    wanted = chosen_variants(run)
    saved, run.variants = run.variants, wanted
    try:
        for variant in run.variants_for(NAME):
            for pitfall in PITFALLS:
                for fixed in (False, True):
                    try:
                        measure(run, variant, pitfall, fixed)
                    except ServerStartError as exc:
                        run.skip(NAME, variant, f"server did not start: {exc}", point=case(pitfall, fixed))
                    except (OSError, RuntimeError) as exc:
                        run.skip(NAME, variant, f"failed: {type(exc).__name__}: {exc}", point=case(pitfall, fixed))
    finally:
        run.variants = saved


def case(pitfall: str, fixed: bool) -> str:
    return f"{pitfall} {'fixed' if fixed else 'broken'}"


def plan_for(run, variant, pitfall: str) -> dict:
    """The scripted clients' parameters: identical for the broken and the fixed server."""
    p = run.profile
    plan = {"duration": p.pitfall_s, "rate": p.pitfall_rate}
    if pitfall == "no-deadline":
        waves = math.ceil(p.pitfall_silent / p.pool_workers) if variant.name == "threadpool" else 1
        plan.update(silent=p.pitfall_silent,
                    duration=max(p.pitfall_s, p.pitfall_silent / p.pitfall_rate + SILENT_SETTLE_S
                                 + (waves + 1) * p.pitfall_idle_s + PATIENCE_S))
    elif pitfall == "unbounded":
        conns = UNBOUNDED_FACTOR * p.pitfall_cap
        plan.update(conns=conns, duration=conns / p.pitfall_rate + p.pitfall_s / 2)
    elif pitfall == "hard-kill":
        plan.update(conns=WORK_CONNS)
    return plan


def server_options(run, pitfall: str, fixed: bool, plan: dict) -> dict:
    """run.serve options: the cap and idle timeout each case needs."""
    p = run.profile
    options = {"max_conns": UNBOUNDED_FACTOR * p.pitfall_cap + 100, "idle_timeout": 3600.0}
    if pitfall == "no-deadline" and fixed:
        options["idle_timeout"] = p.pitfall_idle_s
    if pitfall == "unbounded":
        options["max_conns"] = p.pitfall_cap
    return options


def measure(run, variant, pitfall: str, fixed: bool) -> None:
    plan = plan_for(run, variant, pitfall)
    options = server_options(run, pitfall, fixed, plan)
    if not fixed:
        options["fault"] = pitfall
    started = time.monotonic()
    with serve(run, variant, options) as server:
        labels = {"backend": variant.backend, "variant": variant.name, "pitfall": pitfall, "fixed": fixed}
        server.sampler.stop()                    # this experiment samples itself, in step with the clients
        server.sampler.point = case(pitfall, fixed)
        tally, done = Tally(), threading.Event()
        clients = threading.Thread(target=script, args=(pitfall, (server.host, server.port), tally, plan, done),
                                   name=f"pitfall-{pitfall}", daemon=True)
        rows, exit_status, t0 = [], None, time.monotonic()

        def sample() -> None:
            gauges = server.sampler.sample() or {}
            rows.append({**labels, "t_s": round(time.monotonic() - t0, 3), "fds": gauges.get("fds"),
                         "close_wait": gauges.get("tcp_close_wait"), "rss_kib": gauges.get("rss_kib"),
                         "threads": gauges.get("threads"), "served": tally.served, "starved": tally.starved,
                         "replies_lost": tally.lost})

        sample()
        clients.start()
        interval = run.profile.sample_interval_s
        kill_at = t0 + plan["duration"] if pitfall == "hard-kill" else None
        while not tally.measured.is_set():
            if kill_at is not None and time.monotonic() >= kill_at:
                with tally.lock:
                    tally.stopping = True          # from here no request is sent: all were sent before the signal
                exit_status = stop_sampled(server, sample, interval)
                give_up = time.monotonic() + DRAIN_TIMEOUT_S + RESOLVE_SLACK_S
                while not tally.measured.wait(interval):
                    sample()
                    if time.monotonic() > give_up:
                        done.set()
                end = time.monotonic() + KILL_TAIL_S
                while time.monotonic() < end:
                    sample()
                    time.sleep(interval)
                break
            sample()
            tally.measured.wait(interval)
        sample()
        tally.release.set()
        clients.join()
        for row in rows:
            run.write(NAME, row)
        if exit_status is None and server.alive():
            exit_status, _ = server.stop(grace=1.0 if pitfall == "unbounded" else 10.0)
        summary = summarize(labels, rows, tally, exit_status)
        run.write("pitfalls_summary", summary)
    run.progress(f"[{NAME}] {variant.name} {case(pitfall, fixed)}: {describe(summary)} "
                 f"({time.monotonic() - started:.1f} s)")


def serve(run, variant, options: dict):
    """run.serve, the fault switch (if any) added to the variant's own options."""
    fault = options.pop("fault", None)
    if fault is not None:
        variant = dataclasses.replace(variant, options=(*variant.options, "--fault", fault))
    return run.serve(NAME, variant, 1, stop_grace=2.0, **options)


def stop_sampled(server, sample, interval: float) -> int | None:
    """SIGTERM the server (hard-kill), sampling while it drains; its exit status."""
    result = {}
    stopper = threading.Thread(target=lambda: result.update(status=server.stop(grace=DRAIN_TIMEOUT_S + 5.0)[0]),
                               name="stopper", daemon=True)
    stopper.start()
    while stopper.is_alive():
        sample()
        stopper.join(interval)
    return result.get("status")


SUMMARY_COLUMNS = ("run_id", "backend", "variant", "pitfall", "fixed", "duration_s", "clients", "sent", "served",
                   "starved", "rejected", "replies_lost", "silent_dropped", "fds_start", "fds_end", "fds_peak",
                   "close_wait_end", "close_wait_peak", "rss_kib_start", "rss_kib_peak", "threads_start",
                   "threads_peak", "exit_status")


def summarize(labels: dict, rows: list, tally: Tally, exit_status) -> dict:
    """The final figures of one case (pitfalls_summary.csv)."""
    measured = [r for r in rows if r["fds"] is not None]

    def first(key):
        return measured[0][key] if measured else None

    def last(key):
        return measured[-1][key] if measured else None

    def peak(key):
        values = [r[key] for r in measured if r[key] is not None]
        return max(values) if values else None
    return {**labels, "duration_s": rows[-1]["t_s"] if rows else None, "clients": tally.clients,
            "sent": tally.sent, "served": tally.served, "starved": tally.starved, "rejected": tally.rejected,
            "replies_lost": tally.lost, "silent_dropped": tally.dropped, "fds_start": first("fds"),
            "fds_end": last("fds"), "fds_peak": peak("fds"), "close_wait_end": last("close_wait"),
            "close_wait_peak": peak("close_wait"), "rss_kib_start": first("rss_kib"), "rss_kib_peak": peak("rss_kib"),
            "threads_start": first("threads"), "threads_peak": peak("threads"), "exit_status": exit_status}


def describe(s: dict) -> str:
    text = (f"fds {s['fds_start']}->{s['fds_end']} (peak {s['fds_peak']}), CLOSE_WAIT end {s['close_wait_end']}, "
            f"RSS peak {(s['rss_kib_peak'] or 0) / 1024:.1f} MiB, threads peak {s['threads_peak']}; "
            f"served {s['served']}, starved {s['starved']} (rejected {s['rejected']}), lost {s['replies_lost']} "
            f"of {s['sent']} sent")
    if s["pitfall"] == "hard-kill":
        text += f", exit status {s['exit_status']}"
    return text

