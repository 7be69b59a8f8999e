"""The model replica's handle on its engine core: starts it, reads its stats, stops it.

The core runs in a child process (`python -m cluster.engine.core`), except for a
tensor-parallel replica: its peer ranks are Ray actors in the replica's placement group,
which only a Ray worker can create, so that core runs on a thread of the replica itself,
behind the same socket protocol.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

import msgpack
import zmq

from cluster.config import AppConfig

log = logging.getLogger("ray.serve")


def core_env() -> dict[str, str]:
    """The engine core's environment. OpenMP threads that wait passively: torch's threads
    spin between parallel regions by default, and on a host whose cores other processes
    also use (the frontends, Serve's proxy) the spinning starves the thread with the work:
    measured on a loaded 2-core host, 2 threads spinning gave 34-161 tok/s against 500-934
    waiting passively. An OMP_WAIT_POLICY set by the operator wins."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


class CoreProcess:
    def __init__(self, cfg: AppConfig, host: str, step_delay_s: float = 0.0):
        r = cfg.router
        spec = {"model_dir": cfg.model.path, "engine": cfg.engine.model_dump(), "host": host,
                "parent_pid": os.getpid(), "step_delay_s": step_delay_s,
                # Serve's own router: no hand-backs (it would not route them elsewhere)
                "move_after_s": r.move_after_s if r.policy != "serve_default" else None,
                "kv_hot": r.kv_hot, "score_hot": r.score_hot}
        if cfg.kv_pool is not None and cfg.engine.tensor_parallel_size == 1:
            import ray

            spec["kv_pool"] = cfg.kv_pool.model_dump()
            # the core joins this replica's Ray cluster to reach the pool's store actors
            spec["ray_address"] = ray.get_runtime_context().gcs_address \
                if ray.is_initialized() else None
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.core = None
        if cfg.engine.tensor_parallel_size > 1:
            self.addr = self._start_in_thread(spec)
        else:
            self.addr = self._start_process(spec)
        self.stats: dict = {}
        self.stats_at = time.monotonic()
        self.on_stats = None  # called with each report, on the reader thread
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.addr)
        self._send(["watch"])
        self._reader = threading.Thread(target=self._read, name="core-stats", daemon=True)
        self._reader.start()

    def _start_process(self, spec: dict) -> str:
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.engine.core"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=core_env())
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        # the model loads first: this waits for it (Serve bounds a replica's start itself)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            code = self.proc.wait(timeout=5) if self.proc.poll() is None else self.proc.poll()
            raise RuntimeError(f"the engine core failed to start (exit {code}); see its log")
        return line.split()[1]

    def _start_in_thread(self, spec: dict) -> str:
        from cluster.config import EngineConfig
        from cluster.engine.core import EngineCore
        from cluster.engine.engine import LLMEngine

        engine = LLMEngine(spec["model_dir"], EngineConfig.model_validate(spec["engine"]))
        engine.step_delay_s = spec["step_delay_s"]
        self.core = EngineCore(engine, spec["host"], spec["move_after_s"], spec["kv_hot"],
                               spec["score_hot"])
        self.thread = threading.Thread(target=self.core.run, name="engine-core", daemon=True)
        self.thread.start()
        return self.core.addr

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else os.getpid()

    def _send(self, msg) -> None:
        self._sock.send(msgpack.packb(msg, use_bin_type=True))

    def _read(self) -> None:
        while True:
            try:
                msg = msgpack.unpackb(self._sock.recv(), raw=False)
            except zmq.ZMQError:
                return
            if msg[0] == "stats":
                self.stats, self.stats_at = msg[1], time.monotonic()
                if self.on_stats is not None:
                    try:
                        self.on_stats(msg[1])
                    except Exception:  # a metrics hiccup must not stop the reader
                        log.exception("engine stats handler failed")

    def health(self, stale_after_s: float) -> str | None:
        """None while the core runs and reports; else what is wrong."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"the engine core process exited ({self.proc.returncode})"
        if self.thread is not None and not self.thread.is_alive():
            return "the engine core thread stopped"
        if self.stats.get("failure"):
            return self.stats["failure"]
        if time.monotonic() - self.stats_at > stale_after_s:
            return f"the engine core sent no stats for {stale_after_s:.0f} s"
        return None

    def inject_fault(self) -> None:
        self._send(["fault"])

    def stop(self) -> None:
        try:
            self._send(["stop"])
        except zmq.ZMQError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
