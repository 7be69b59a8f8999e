"""How fast a pool fetch crosses between two nodes of one machine: by Mooncake's
transfer engine, the store writing into the engine's memory (cluster/kv_transfer.py, TCP;
`kv_pool.transport: auto`), and by Ray, with the stores' answers inline
(`kv_store.INLINE_ENV`, what `start_pool` sets; `transport: ray`) and through Ray's object
stores (its default over 100 KiB).

    python -m cluster.bench.kv_link [--blocks 4 16] [--repeat 40] [--block-bytes N]
                                    [--stores N] [--json]

A local cluster (Ray's own test cluster: a head and `--stores` `cpu-arch: kunpeng` nodes);
on each Kunpeng node one store started by `start_pool` and one started the same way without
the inline setting, each holding the same blocks (the default model's block size, fp32,
or --block-bytes). With several stores a fetch is striped over them as an engine's is
(a block is asked of the store its key's digest picks, all stores at once).
Each fetch goes through `PoolClient.get` / `collect`, as an engine's does. Per mode and
size: the fetch's latency (p50, from this process) and the CPU the whole machine spent per
fetch (every process: the store, both nodes' object stores and raylets, this one), from
/proc/stat.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from cluster.bench.kv_tier_served import machine_cpu_s
from cluster.bench.progress import stdout_to_stderr

BLOCK_BYTES = 2 * 4 * 16 * 4 * 32 * 4  # the default model: 4 layers, 4 KV heads of 32, fp32


def measure(client, keys: list[bytes], repeat: int) -> dict:
    client.collect(client.get(keys), 5.0)  # warm: the call path and the store's worker
    times = []
    cpu0 = machine_cpu_s()[0]
    for _ in range(repeat):
        t = time.perf_counter()
        got = client.collect(client.get(keys), 5.0)
        times.append(time.perf_counter() - t)
        if any(b is None for b in got):
            raise RuntimeError("a block went missing: the measurement is void")
    cpu = (machine_cpu_s()[0] - cpu0) / repeat
    return {"latency_ms_p50": round(float(np.median(times)) * 1000, 2),
            "cpu_ms_per_fetch": round(cpu * 1000, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.kv_link", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--repeat", type=int, default=40)
    p.add_argument("--block-bytes", type=int, default=BLOCK_BYTES,
                   help="2097152: the Llama-3.1-8B shape's block (bf16, 16 tokens)")
    p.add_argument("--stores", type=int, default=1, help="Kunpeng nodes, one store each")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with stdout_to_stderr():  # Ray's processes print to stdout: keep it for --json
        out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for mode, rows in out["modes"].items():
            for n, r in rows.items():
                print(f"{mode:8} {n:>3} blocks: {r['latency_ms_p50']:7.2f} ms p50, "
                      f"{r['cpu_ms_per_fetch']:6.2f} ms of CPU a fetch")
    return 0


def run(args) -> dict:
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.kv_pool import PoolClient
    from cluster.kv_store import KEY_BYTES, PoolActor, start_pool

    n_max = max(args.blocks)
    # object stores with room for a few of the largest fetches (Ray's test cluster gives
    # each node 150 MiB: a 128 MiB fetch through them took 1.2 s, spilling)
    store_bytes = max(150 << 20, 4 * n_max * (args.block_bytes + KEY_BYTES))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": store_bytes})
    nodes = [cluster.add_node(num_cpus=1, labels={"cpu-arch": "kunpeng"},
                              object_store_memory=store_bytes)
             for _ in range(args.stores)]
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        capacity = 4 * n_max * (args.block_bytes + KEY_BYTES)
        inline = start_pool(capacity, {"cpu-arch": "kunpeng"}, prefix="kv-link-",
                            detached=False)
        default = [PoolActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node.node_id, soft=False)).remote(capacity, f"kv-link-default-{i}", "ray")
            for i, node in enumerate(nodes)]
        rng = np.random.default_rng(0)
        items = [(bytes(16) + rng.bytes(32), rng.bytes(KEY_BYTES + args.block_bytes))
                 for _ in range(n_max)]
        ray.get([a.put.remote(items) for a in inline + default])
        modes = {}
        for mode, actors, transport in (("transfer", inline, "auto"), ("inline", inline, "ray"),
                                        ("default", default, "ray")):
            client = PoolClient(actors, timeout_s=5.0, transport=transport)
            if mode == "transfer":  # every fetch by it, the small ones too
                if client.transfer is None or not client.wait_connected():
                    raise RuntimeError("the transfer engine did not start (see the log)")
                client.TRANSFER_MIN_BYTES = 0
            modes[mode] = {n: measure(client, [k for k, _ in items[:n]], args.repeat)
                           for n in args.blocks}
        return {"block_bytes": args.block_bytes, "repeat": args.repeat,
                "stores": args.stores, "modes": modes}
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
