"""The physical cores a CPU-pool replica's engine runs on, and pinning it to them.

A replica takes `num_cpus` whole cores of its host, inside one NUMA node where they fit (its
KV cache and weights stay in that node's memory), one logical CPU per physical core (ARM
hosts such as Kunpeng have no SMT; elsewhere two engine threads must not share a core). The
cores are claimed with a lock file per core on the host, so that replicas of several Ray
nodes or apps on one host take different ones; the lock goes with the replica's process.
Where the host has fewer free cores than replicas, a replica shares (and says so).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("ray.serve")

SYS = Path("/sys/devices/system")
LOCKS = Path(tempfile.gettempdir()) / "tandem-cores"
# every OpenMP thread (torch's intra-op pool) on a core of its own, in order
OMP_PINNING = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}


def parse_cpulist(text: str) -> list[int]:
    """`0-3,8,10-11` -> [0, 1, 2, 3, 8, 10, 11] (the kernel's list format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            out += range(int(lo), int(hi or lo) + 1)
    return out


def host_cores(allowed: set[int] | None = None) -> list[list[int]]:
    """Per NUMA node, one logical CPU per physical core (the lowest of its SMT siblings),
    of the CPUs this process may use. One node when the host does not say."""
    allowed = allowed if allowed is not None else os.sched_getaffinity(0)
    nodes = [parse_cpulist((n / "cpulist").read_text())
             for n in sorted(SYS.glob("node/node[0-9]*"))] or [sorted(allowed)]
    out = []
    for cpus in nodes:
        seen: set[frozenset[int]] = set()
        cores = []
        for cpu in (c for c in cpus if c in allowed):
            siblings = SYS / f"cpu/cpu{cpu}/topology/thread_siblings_list"
            group = frozenset(parse_cpulist(siblings.read_text())) if siblings.exists() \
                else frozenset({cpu})
            if group not in seen:
                seen.add(group)
                cores.append(cpu)
        if cores:
            out.append(cores)
    return out


def plan_shares(nodes: list[list[int]], size: int) -> list[list[int]]:
    """The host's cores cut into shares of `size` (at most all of them): whole shares inside
    each NUMA node first, then the nodes' leftovers together."""
    size = max(1, min(size, sum(map(len, nodes))))
    shares, rest = [], []
    for cores in nodes:
        whole = len(cores) // size * size
        shares += [cores[i:i + size] for i in range(0, whole, size)]
        rest += cores[whole:]
    shares += [rest[i:i + size] for i in range(0, len(rest) // size * size, size)]
    return shares


@dataclass
class CoreShare:
    cpus: list[int]
    threads: int
    pinned: bool  # cpus are this replica's alone and its engine runs only there
    _locks: list[int] = field(default_factory=list, repr=False)  # held open: the claim

    @classmethod
    def claim(cls, num_cpus: float, pin: bool) -> CoreShare:
        nodes = host_cores()
        shares = plan_shares(nodes, int(num_cpus))
        threads = len(shares[0])
        if not pin or not hasattr(os, "sched_setaffinity"):
            return cls(sorted(c for n in nodes for c in n), threads, False)
        for share in shares:
            locks = _lock_all(share)
            if locks is not None:
                return cls(share, threads, True, locks)
        share = shares[os.getpid() % len(shares)]
        log.warning("every share of %d cores on this host is taken: sharing cores %s",
                    threads, share)
        return cls(share, threads, True)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Processes started inside run on these cores only, one OpenMP thread per core: a
        child inherits the CPU mask of the thread that starts it, and the environment."""
        if not self.pinned:
            yield
            return
        before = os.sched_getaffinity(0)
        saved = {k: os.environ.get(k) for k in OMP_PINNING}
        os.environ.update(OMP_PINNING)
        os.sched_setaffinity(0, self.cpus)  # this thread only, until the child is started
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _lock_all(cpus: list[int]) -> list[int] | None:
    """Open file locks on each core of a share, or None (and none held) if one is taken."""
    LOCKS.mkdir(exist_ok=True)
    held: list[int] = []
    for cpu in cpus:
        try:
            fd = os.open(LOCKS / f"cpu{cpu}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        except OSError:  # another user's lock file: that core is someone's
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(fd)
                continue
            except OSError:
                os.close(fd)
        for f in held:
            os.close(f)
        return None
    return held
