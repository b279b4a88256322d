"""``--cpu-offload process``: WORK's CPU part computed in a process pool, beside an event loop.

An event loop (asyncio, uvloop, gevent, epoll) runs every connection on one
thread, so WORK's ``cpu_us`` (``session.burn``, a busy loop that holds the GIL)
stalls every other connection for as long as it computes. With
``--cpu-offload process`` the loop hands that computation to a
``concurrent.futures.ProcessPoolExecutor`` and serves the other connections
until it is done; then it replies. A process, not a thread: a thread would
hold the same GIL as the loop while it burns.

What is shared lives here, once: the pool (``Offload``), its start and stop,
and what runs in a worker (``burn``, imported there by name: the worker
process imports ``conclab.servers.session``, nothing of the backend). Each
backend only waits its own way for the ``concurrent.futures.Future`` that
``Offload.submit`` returns (asyncio and uvloop ``await`` it, a gevent greenlet
parks while the hub serves the others, the epoll loop is woken through an fd
in its epoll set) and then replies with ``Request.computed(now)``, which skips
the burn. A connection reads nothing more while its request computes, as
while it waits: its replies stay in request order.

The pool, per server process (each worker of ``--procs N`` has its own):

* its size is the CPUs the server may run on, ``len(os.sched_getaffinity(0))``
  (a server pinned to one CPU gets one worker, which then shares that CPU with
  the loop: the option pays off with a CPU to spare);
* its workers are started at start, before ``listening on``: ``Offload.start``
  returns once each of them is up and has imported what it runs, so no request
  pays for a process start;
* they are *spawned*, not forked: a fresh interpreter inherits neither the
  listening socket (a forked child holding it would keep the port accepting
  after the drain closed it) nor the loop's descriptors and threads;
* they ignore SIGINT (a Ctrl-C reaches the whole process group; the server
  drains and still needs them for the requests in progress), and die with the
  server process (PR_SET_PDEATHSIG, SIGKILL). SIGTERM stays deadly: it is how
  the pool stops a worker (``terminate``) when it breaks or shuts down;
* ``close`` at the end of the drain: every offloaded request of a connection
  still open got its reply by then, so a computation still running belongs to a
  connection that is gone (reset, or aborted at --drain-timeout): its worker is
  terminated rather than waited for (WORK's cpu_us may be minutes).

If the pool breaks (a worker killed from outside), the request is computed in
the server process instead, as without the option, with one warning on stderr:
a reply is late rather than lost. ``offloaded`` (STATS, metrics) counts the
requests answered after their CPU part ran in the pool.
"""
from __future__ import annotations

import os
import signal

from .base import StartupError, warn
from .session import burn

PROCESS = "process"            # the one --cpu-offload value that offloads ("none" is the default)
START_TIMEOUT_S = 60.0         # the pool's workers must all be up within this (interpreters starting on a busy box)


def pool_size() -> int:
    """The pool's workers: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0))


def start(config, stats) -> "Offload | None":
    """The started pool of this server process under ``--cpu-offload process``, else None."""
    if config.cpu_offload != PROCESS:
        return None
    offload = Offload(stats)
    offload.start()
    return offload


def _in_worker(server: int, started) -> None:
    """A pool worker's initializer: leave SIGINT to the server, die with it (``server``: its pid;
    if it died before we asked, at once), then wait at ``started`` until every worker and the server are there."""
    from . import processes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    processes.signal_on_parent_death(signal.SIGKILL)
    if os.getppid() != server:
        os._exit(1)
    started.wait(START_TIMEOUT_S)


class Offload:
    """One server process's pool, and the counting of what it computed."""

    def __init__(self, stats, workers: int | None = None) -> None:
        self.stats = stats
        self.workers = workers or pool_size()
        self.executor = None
        self.running: set = set()          # futures not done yet (done ones leave from the executor's thread)
        self.warned = False

    def start(self) -> None:
        """Create the pool and have every worker up (initialized, ``burn`` imported) before returning.

        The pool starts a worker per submit while none is idle, and none is until all
        have met at the barrier: so one submit per worker starts them all, and the
        barrier returns once each has run its initializer (PR_SET_PDEATHSIG included).
        """
        import multiprocessing
        import threading
        from concurrent.futures import ProcessPoolExecutor, wait
        context = multiprocessing.get_context("spawn")
        started = context.Barrier(self.workers + 1)
        self.executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_in_worker,
                                            initargs=(os.getpid(), started))
        warmups = [self.executor.submit(burn, 0) for _ in range(self.workers)]
        try:
            started.wait(START_TIMEOUT_S)
        except threading.BrokenBarrierError:
            pass                                # the warm-ups below say what went wrong
        done, _ = wait(warmups, START_TIMEOUT_S)
        failed = [future.exception() for future in done if future.exception() is not None]
        if failed or len(done) < self.workers:
            self.close()
            reason = repr(failed[0]) if failed else f"its workers did not start within {START_TIMEOUT_S:g} s"
            raise StartupError(f"--cpu-offload: the process pool did not start: {reason}")

    def submit(self, cpu_us: int):
        """Have ``cpu_us`` computed in the pool: a ``concurrent.futures.Future`` (a failed one if the pool is broken)."""
        from concurrent.futures import Future
        try:
            future = self.executor.submit(burn, cpu_us)
        except RuntimeError as exc:        # BrokenProcessPool, or the pool already shut down
            future = Future()
            future.set_exception(exc)
            return future
        self.running.add(future)
        future.add_done_callback(self.running.discard)
        return future

    def settle(self, future, cpu_us: int) -> None:
        """A submitted computation is over (``future`` is done): count it, or, if the pool failed it,
        compute it here, as without the option (warning once). Either way the reply may go out next."""
        error = future.exception()
        if error is None:
            self.stats.count("offloaded")
            return
        if not self.warned:
            self.warned = True
            warn(f"--cpu-offload: the process pool failed ({type(error).__name__}: {error}); "
                 "computing WORK in the server process from now on")
        burn(cpu_us)

    def close(self) -> None:
        """The drain is over: stop the workers (terminating any still computing for a connection that is gone)."""
        executor = self.executor
        if executor is None:
            return
        self.executor = None
        if any(not future.done() for future in list(self.running)):
            terminate = getattr(executor, "terminate_workers", None)        # CPython 3.14+
            if terminate is not None:
                terminate()
            else:
                for process in list((executor._processes or {}).values()):
                    process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
