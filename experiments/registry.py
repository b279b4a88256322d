"""The experiments, declared once: what each one is, writes, draws, states and needs.

``EXPERIMENTS`` is the one list. The harness (``conclab run``: which names
exist, what ``all`` runs and in which order, which tables to open, whether the
load generator must work), the report (sections, the sentence under each
heading, charts, summary, warnings) and its charts and findings (the pitfall
rows) read it; none keeps a copy. Adding an experiment = its module (``NAME``
and ``run(run)``) + one ``Experiment`` here (docs/architecture.md).

Dependencies are explicit: an experiment lists in ``needs`` the experiments
whose results it uses. The list is in dependency order (checked below), so a
run executes what it needs first. The harness does not add a need the user did
not ask for: the experiment then measures that number itself (``results``
returns nothing) and the manifest's ``needs`` records it (``measured_itself``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    """A CSV table an experiment writes (its columns: harness.tables.COLUMNS[name])."""
    name: str
    point: str | None = None            # the column that tells its points apart (warnings: "epoll@conns=50")


@dataclass(frozen=True)
class Fact:
    """One figure of a pitfall's "also" cell in the report: "<label> <broken value> broken, <fixed value> fixed".

    ``column`` is a pitfalls_summary column, or "a-b" for the difference of two; ``agg`` is "max", "sum"
    or "each" (every variant's value; the sides are then joined by "; ").
    """
    label: str
    column: str
    agg: str = "max"
    sides: tuple = ("broken", "fixed")
    sign: str = ""                      # printed before each value ("+")


@dataclass(frozen=True)
class Pitfall:
    """One row of the article's risk table (docs/article.md), and how the lab measures it."""
    name: str                           # the servers' --fault NAME
    risk: tuple                         # (Chinese, English): 风险点
    consequence: tuple                  # 后果 ("" when the article has no Chinese for it)
    remedy: tuple                       # 解决方案
    label: str                          # the chart panel's title (English: the fonts have no CJK glyphs)
    series: str                         # the pitfalls.csv column drawn over time
    axis: str                           # its axis label
    scale: float                        # applied to it on the chart (KiB -> MiB: 1 / 1024)
    measure: str                        # the pitfalls_summary.csv column the report's table shows
    also: tuple = ()                    # Facts: what else the table's row shows


@dataclass(frozen=True)
class Experiment:
    name: str                           # `conclab run NAME`; rows' ``experiment`` column; the report's section id
    what: str                           # one sentence for --help and the report ({size}: the ECHO payload, B)
    tables: tuple                       # Tables it writes, the main one (what "it has data" means) first
    charts: tuple = ()                  # the report's charts, in order (analysis.report makes each by name)
    findings: tuple = ()                # the charts whose finding is a line of the report's summary
    needs: tuple = ()                   # experiments whose results it uses (see ``results``)
    in_all: bool = True                 # part of `conclab run all` (False: runs only when named)
    loadgen: bool = True                # the harness checks the load generator before running it
    pitfalls: tuple = ()                # Pitfalls (the pitfalls experiment)
    module: str = ""                    # its module under conclab.experiments (default: the name)

    def __post_init__(self) -> None:
        if not self.module:
            object.__setattr__(self, "module", self.name)

    def load(self):
        """The experiment's module: it has NAME and run(run)."""
        return importlib.import_module(f"{__package__}.{self.module}")

    def about(self, size="64") -> str:
        """``what`` as the report shows it (the ECHO payload filled in; how to run it if ``all`` does not)."""
        text = self.what.format(size=size)
        return text if self.in_all else f"{text} Not part of `conclab run all`: run `conclab run {self.name}`."


EXPERIMENTS = (
    Experiment(
        "memory", "One server per variant and round holds N idle connections, N growing in steps; RSS, USS and VMS "
                  "are read once each step settles, and the kernel's memory (slab, socket buffers, kernel stacks, "
                  "page tables) before and at every step.",
        tables=(Table("memory", "n_target"), Table("memory_fit", "metric")),
        charts=("memory_rss", "memory_per_conn", "memory_kernel", "memory_thread_vms"),
        findings=("memory_per_conn", "memory_kernel")),
    Experiment(
        "throughput", "Closed loop: each connection sends a {size} B ECHO and waits for the reply, concurrency swept.",
        tables=(Table("throughput", "conns"),), charts=("throughput",), findings=("throughput",)),
    Experiment(
        "latency", "Open loop: requests are sent on schedule at fractions of each backend's capacity; latency is "
                   "measured from the scheduled send, so queueing counts.",
        tables=(Table("latency", "rate_fraction"),), charts=("latency_spectrum", "latency_load"),
        findings=("latency_load",),
        needs=("throughput",)),         # capacity: closed-loop throughput at latency_conns (else calibrated)
    Experiment(
        "io_bound", "Each request waits (a simulated downstream call) before it is answered, concurrency swept.",
        tables=(Table("io_bound", "conns"),), charts=("io_bound",), findings=("io_bound",)),
    Experiment(
        "cpu_bound", "Each request computes in a busy loop that holds the GIL.",
        tables=(Table("cpu_bound", "conns"),), charts=("cpu_bound",)),
    Experiment(
        "switch", "Microbenchmarks of one hand-off between two execution contexts, and what each server spent "
                  "per request at the reference point.",
        tables=(Table("switch", "bench"),), charts=("switch", "per_request"), findings=("switch",),
        needs=("throughput",),          # per request: the throughput rows at reference_conns (else measured)
        loadgen=False),                 # the microbenchmarks do not use it
    Experiment(
        "c10k", "Each server holds many idle connections while a small closed loop measures latency.",
        tables=(Table("c10k", "hold_target"),), charts=("c10k",), findings=("c10k",)),
    Experiment(
        "pool_sizing", "The thread pool at growing --workers, both dispatches, under a closed loop at two loads: "
                       "requests that only wait 10 ms (I/O-bound, bounded by Little's law: workers / 10 ms) and "
                       "plain ECHO; go, asyncio and gevent at the same loads beside it.",
        tables=(Table("pool_sizing", "workers"),), charts=("pool_sizing",), findings=("pool_sizing",),
        in_all=False),                  # ~7 min at --profile standard: named runs only, `all` keeps its budget
    Experiment(
        "message_sizes", "Closed loop, ECHO payloads from 64 B to 1 MiB (1,048,575 B: the largest that fits the "
                         "default 1 MiB max frame with its op byte): requests/s and payload MB/s per model.",
        tables=(Table("message_sizes", "size"),), charts=("message_sizes",), findings=("message_sizes",),
        in_all=False),
    Experiment(
        "m_to_n", "Each server holds many idle connections; its logical units (goroutines, greenlets, protocol "
                  "objects, threads: one per connection by design) against its OS threads (/proc/PID/task).",
        tables=(Table("m_to_n", "hold_target"),), charts=("m_to_n",), findings=("m_to_n",),
        in_all=False),
    Experiment(
        "convoy", "The GIL convoy: a few connections send 2 ms CPU-bound WORK (closed loop) beside short ECHO at a "
                  "fixed open-loop rate; ECHO p50 and p99 with and without the CPU work, per model: threads at three "
                  "switch intervals, the event loops, go at GOMAXPROCS 1 and 2, and each Python model on two "
                  "processes (--procs 2).",
        tables=(Table("convoy", "cpu_conns"),), charts=("convoy",), findings=("convoy",),
        in_all=False),
    Experiment(
        "cores", "ECHO and CPU-bound WORK, closed loop, on 1 and 2 server CPUs: each Python model with --procs 1 "
                 "and 2, go with GOMAXPROCS 1 and 2; throughput, the 2-CPU scaling ratio and RSS summed over the "
                 "server's processes.",
        tables=(Table("cores", "case"),), charts=("cores",), findings=("cores",),
        in_all=False),
    Experiment(
        "redis_call", "Closed loop, {size} B ECHO, each request making one Redis round trip (the shared rate limit "
                      "at a rate that never limits, --rate-limit-store redis://) against the same limit in memory, "
                      "paired per round; the thread pools at their default size and at Little's law's; the server's "
                      "CPU and context switches per request, and Redis's own CPU.",
        tables=(Table("redis_call", "store"),), charts=("redis_call",), findings=("redis_call",),
        in_all=False),
    Experiment(
        "pitfalls", "Each row of the article's risk table (docs/article.md), run twice per backend under the "
                    "same scripted clients: broken (--fault X: the safeguard off) and fixed, sampled over time.",
        tables=(Table("pitfalls", "t_s"), Table("pitfalls_summary", "pitfall")), charts=("pitfalls",),
        in_all=False,                   # `all` must stay within its budget
        loadgen=False,                  # scripted clients in the harness
        pitfalls=(
            Pitfall("leak", ("未关闭conn", "conn not closed"), ("文件描述符泄漏", "file descriptor leak"),
                    ("defer conn.Close()", "close every connection, whatever path the handler leaves by"),
                    label="conn not closed", series="close_wait", axis="server sockets in CLOSE_WAIT", scale=1.0,
                    measure="close_wait_end", also=(Fact("fds", "fds_end-fds_start", sign="+"),)),
            Pitfall("no-deadline", ("无读超时机制", "no read timeout"),
                    ("恶意客户端占连接", "malicious clients hold connections"),
                    ("conn.SetReadDeadline()", "a read deadline: --idle-timeout"),
                    label="no read timeout", series="starved", axis="fresh clients starved (cumulative)",
                    scale=1.0, measure="starved", also=(Fact("served", "served", "sum"),)),
            Pitfall("unbounded", ("不限并发数", "unbounded concurrency"), ("内存/CPU过载", "memory/CPU overload"),
                    ("使用带缓冲的channel做限流", "a buffered channel as a limiter: --max-conns"),
                    label="unbounded concurrency", series="rss_kib", axis="server RSS (MiB)", scale=1 / 1024,
                    measure="rss_kib_peak", also=(Fact("threads peak", "threads_peak"),
                                                  Fact("rejected", "rejected", "sum", sides=("fixed",)))),
            Pitfall("hard-kill", ("优雅关闭", "graceful shutdown: the article's advice list, not its table"),
                    ("", "replies in flight lost"),
                    ("sync.WaitGroup", "wait for the handlers before exiting: drain on SIGTERM"),
                    label="no graceful shutdown", series="replies_lost", axis="replies lost (cumulative)",
                    scale=1.0, measure="replies_lost", also=(Fact("exit", "exit_status", "each"),)),
        )),
)
BY_NAME = {e.name: e for e in EXPERIMENTS}


def get(name: str) -> Experiment:
    """The experiment called ``name`` (KeyError if there is none)."""
    return BY_NAME[name]


def names(in_all: bool = False) -> list:
    """Every experiment (``in_all``: those `conclab run all` runs), in run and report order."""
    return [e.name for e in EXPERIMENTS if e.in_all or not in_all]


def tables() -> dict:
    """experiment -> the names of the tables it writes."""
    return {e.name: tuple(t.name for t in e.tables) for e in EXPERIMENTS}


def pitfalls() -> tuple:
    """The Pitfalls, in the article's order."""
    return next(e.pitfalls for e in EXPERIMENTS if e.pitfalls)


def plan(selected) -> list:
    """The selected experiments in run order: registry order, which puts every need before what needs it."""
    unknown = set(selected) - set(BY_NAME)
    if unknown:
        raise KeyError(sorted(unknown)[0])
    return [n for n in names() if n in selected]


# -- at run time: what an experiment takes from the experiments it needs -----------------------------

def results(run, experiment: str, needed: str) -> list:
    """The rows ``needed`` wrote earlier in this run (its main table), for ``experiment`` to use.

    ``experiment`` must list ``needed`` in its ``needs`` (a dependency is declared, never implicit). Empty
    when the run did not include ``needed``: the experiment then measures what it needs itself and says so
    (``measured_itself``).
    """
    if needed not in get(experiment).needs:
        raise LookupError(f"{experiment} uses {needed}'s results but its registry entry does not list it in needs")
    writer = run.tables.get(get(needed).tables[0].name) if needed in run.experiments else None
    return list(writer.rows) if writer is not None else []


def sources(experiments) -> dict:
    """The manifest's ``needs``: experiment -> needed -> whether the run has it, and the variants the
    experiment measured it for itself (all of them when the run does not have it)."""
    return {name: {need: {"in_run": need in experiments, "measured_itself": []} for need in get(name).needs}
            for name in experiments if get(name).needs}


def measured_itself(run, experiment: str, needed: str, variant) -> None:
    """Record (manifest ``needs``) that ``experiment`` measured for ``variant`` what ``needed`` did not give it."""
    entry = run.manifest.setdefault("needs", {}).setdefault(experiment, {}).setdefault(
        needed, {"in_run": needed in run.experiments, "measured_itself": []})
    if variant.name not in entry["measured_itself"]:
        entry["measured_itself"].append(variant.name)


def _check() -> None:
    seen = set()
    for e in EXPERIMENTS:
        for need in e.needs:
            if need not in seen:
                raise ValueError(f"registry: {e.name} needs {need}, which must be an experiment listed before it")
        seen.add(e.name)


_check()
