"""Other hosts on this machine: Linux network namespaces joined by veth pairs (``ip netns``, root only).

Here, beside the launcher, because it is about where a server (or anything else)
runs; the tests and the experiments harness use it, nothing in a server does.

A network namespace has its own interfaces, addresses, routes, port space and
TCP stack, so a process started in one (``ip netns exec NAME ...``) talks to
the others through a real network path (veth, a bridge, the whole IP and TCP
stack on both sides) instead of loopback. The lab uses two shapes:

* ``Lan(["server", "master", "w1", "w2"])``: one namespace per host, each with
  ``eth0`` at 10.200.X.(i+1)/24, all plugged into a bridge that lives in a
  namespace of its own (the switch), so nothing is added to this machine's own
  interfaces, routes or firewall. The distributed Locust test runs on it.
* ``linked_host("srv")``: one namespace joined to *this* host by a veth pair,
  10.200.X.1 here and 10.200.X.2 there; ``conclab run --server-host NAME``
  puts the server there and keeps the load generator here.

Names are unique per process (``clab<pid>-<role>``; veths are created inside
their namespaces, so only ``linked_host``'s one interface is named here,
``clab<pid>x<n>``), so runs side by side do not collide, and namespaces left by
a run that died (its pid gone) are removed the next time one is made. Closing
(the context managers, also on error) kills every process still in the
namespaces and deletes them, which deletes their interfaces.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass

PREFIX = "clab"
SUBNET = "10.200.{}.0/24"
IP_TIMEOUT_S = 10.0
NAME_RE = re.compile(rf"^{PREFIX}(\d+)-")


class NetnsError(Exception):
    """A namespace could not be made or used; the message is one line (``ip``'s own last words)."""


def ip(*args: str, namespace: str | None = None) -> str:
    """Run ``ip [-n NAMESPACE] ARGS``; its stdout, or NetnsError with its stderr."""
    if shutil.which("ip") is None:
        raise NetnsError("the `ip` command is missing (apt-get install iproute2)")
    cmd = ["ip", *(["-n", namespace] if namespace else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise NetnsError(f"`{' '.join(cmd)}`: {last}")
    return done.stdout


def unavailable_reason() -> str | None:
    """None if namespaces can be made here (tried: one is made and removed), else why not."""
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        ip("netns", "add", name)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    with contextlib.suppress(NetnsError):
        ip("netns", "del", name)
    return None


@dataclass(frozen=True)
class Host:
    """One namespace and its address."""

    namespace: str
    address: str

    def command(self, argv) -> list[str]:
        """``argv`` run inside this host (``ip netns exec``: the same pid, no extra process in between)."""
        return ["ip", "netns", "exec", self.namespace, *[str(a) for a in argv]]


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def remove(namespace: str) -> None:
    """Kill whatever still runs in ``namespace``, then delete it (and so its interfaces). Never raises."""
    with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        for pid in ip("netns", "pids", namespace).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    with contextlib.suppress(NetnsError, OSError, subprocess.TimeoutExpired):
        ip("netns", "del", namespace)


def remove_stale() -> None:
    """Delete the lab's namespaces whose creating process is gone (a run that crashed)."""
    for name in namespaces():
        match = NAME_RE.match(name)
        if match and not os.path.exists(f"/proc/{match[1]}"):
            remove(name)


def free_subnet() -> int:
    """X of a 10.200.X.0/24 that no interface of this host uses (random start: parallel runs rarely meet)."""
    used = set(re.findall(r"inet 10\.200\.(\d+)\.", ip("-4", "-o", "addr", "show")))
    start = random.randrange(1, 255)
    for x in [*range(start, 255), *range(1, start)]:
        if str(x) not in used:
            return x
    raise NetnsError("every 10.200.X.0/24 is in use on this host")


def new_namespace(role: str) -> str:
    name = f"{PREFIX}{os.getpid()}-{role}"
    remove(name)                       # our own leftover (the same pid, an earlier attempt)
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", namespace=name)
    return name


class Lan:
    """Hosts named ``roles`` on one switch; ``lan[role]`` is a ``Host``. A context manager: removed on exit."""

    def __init__(self, roles) -> None:
        self.roles = list(roles)
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []

    def __enter__(self) -> "Lan":
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, role: str) -> Host:
        return self.hosts[role]

    def create(self) -> None:
        remove_stale()
        x = random.randrange(1, 255)           # nothing of this host's own is on the LAN: any X will do
        switch = self._add("switch")
        ip("link", "add", "br0", "type", "bridge", namespace=switch)
        ip("link", "set", "br0", "up", namespace=switch)
        for i, role in enumerate(self.roles):
            name = self._add(role)
            ip("link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", name, namespace=switch)
            ip("link", "set", f"p{i}", "master", "br0", "up", namespace=switch)
            address = f"10.200.{x}.{i + 1}"
            ip("addr", "add", f"{address}/24", "dev", "eth0", namespace=name)
            ip("link", "set", "eth0", "up", namespace=name)
            self.hosts[role] = Host(name, address)

    def _add(self, role: str) -> str:
        name = new_namespace(role)
        self._made.append(name)
        return name

    def close(self) -> None:
        for name in reversed(self._made):
            remove(name)
        self._made.clear()


@contextlib.contextmanager
def linked_host(role: str):
    """A namespace joined to this host by a veth pair: yields ``(host, here)``, ``here`` this side's address."""
    remove_stale()
    name = new_namespace(role)
    link = f"{PREFIX}{os.getpid() % 10**7}x"[:15]
    try:
        x = free_subnet()
        here, there = f"10.200.{x}.1", f"10.200.{x}.2"
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("addr", "add", f"{here}/24", "dev", link)
        ip("link", "set", link, "up")
        ip("addr", "add", f"{there}/24", "dev", "eth0", namespace=name)
        ip("link", "set", "eth0", "up", namespace=name)
        yield Host(name, there), here
    finally:
        remove(name)                   # takes the veth pair with it, this side included
