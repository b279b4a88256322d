"""The lab's load generator: closed loop, open loop (coordinated-omission corrected) and hold.

Programmatic use (what ``conclab check``'s scenarios call; the experiments run the
command line instead, docs/protocol.md section 5)::

    from conclab.loadgen import LoadParams, run_load
    result = run_load(LoadParams(target="127.0.0.1:7878", mode="closed", conns=50, duration=5))
    result["throughput_rps"], result["latency_us"]["p99"], result["loadgen_saturated"]

The command line is ``conclab load`` (``conclab.loadgen.cli.add_parser``) or
``python -m conclab.loadgen``; docs/loadgen.md describes the modes and the result.
"""
from .params import DEFAULT_TARGET, LoadError, LoadParams
from .runner import run_load

__all__ = ["DEFAULT_TARGET", "LoadError", "LoadParams", "run_load"]
