"""`tandem` command line: build the default model, run/stop the local cluster."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RUN_DIR = Path(os.environ.get("TANDEM_RUN_DIR", ".run"))
STATE = RUN_DIR / "state.json"


def cmd_model_init(args) -> int:
    from cluster.config import DEFAULT_MODEL_DIR
    from cluster.model_init import build

    out = Path(args.out or DEFAULT_MODEL_DIR)
    existed = (out / "model.safetensors").exists()
    build(out, force=args.force, shape=args.shape)
    print(f"default model {'already at' if existed and not args.force else 'written to'} {out}")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def cmd_up(args) -> int:
    from cluster.config import ConfigError, load_serve_config
    from cluster.local_cluster import serve_config

    try:
        doc, cfg = load_serve_config(args.config)
        serve_config(doc, args.config)  # the rest of the file, as `serve deploy` reads it
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    for entry in cfg.served():
        if not Path(entry.model.path, "config.json").exists():
            print(f"model folder {entry.model.path} has no config.json "
                  "(run `tandem model init` for the default model)", file=sys.stderr)
            return 2
    if STATE.exists() and _alive(json.loads(STATE.read_text())["pid"]):
        print(f"already running: {json.loads(STATE.read_text())['url']} (`make stop` first)")
        return 1
    RUN_DIR.mkdir(exist_ok=True)
    if args.detach:
        return _detach(args)
    return _supervise(doc, cfg, args)


def _detach(args) -> int:
    STATE.unlink(missing_ok=True)
    log = open(RUN_DIR / "serve.log", "w")
    cmd = [sys.executable, "-m", "cluster.cli", "up", "--config", args.config,
           "--model-gpus", str(args.model_gpus)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if STATE.exists() and json.loads(STATE.read_text()).get("ready"):
            url = json.loads(STATE.read_text())["url"]
            print(f"tandem is serving at {url}/v1  (OpenAI API; logs: {RUN_DIR}/serve.log; "
                  "stop: make stop)")
            return 0
        if proc.poll() is not None:
            print(f"the cluster failed to start; see {RUN_DIR}/serve.log:", file=sys.stderr)
            print((RUN_DIR / "serve.log").read_text()[-3000:], file=sys.stderr)
            return 1
        time.sleep(1)
    print(f"not ready after {args.timeout}s; see {RUN_DIR}/serve.log", file=sys.stderr)
    return 1


def _supervise(doc: dict, cfg, args) -> int:
    import ray

    from cluster import local_cluster

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    spec = local_cluster.LocalClusterSpec(model_gpus=args.model_gpus)
    cluster = local_cluster.start(spec)
    try:
        ray.init(address=cluster.address)
        STATE.write_text(json.dumps({"pid": os.getpid(), "ready": False, "url": None,
                                     "ray_address": cluster.address,
                                     "config": str(Path(args.config).resolve())}))
        url = local_cluster.deploy(doc, cfg)
        token = RUN_DIR / "ray_auth_token"
        token.write_text(os.environ["RAY_AUTH_TOKEN"])
        token.chmod(0o600)
        STATE.write_text(json.dumps({"pid": os.getpid(), "ready": True, "url": url,
                                     "ray_address": cluster.address,
                                     "config": str(Path(args.config).resolve())}))
        print(f"serving at {url}/v1", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            STATE.unlink(missing_ok=True)
    return 0


def cmd_stop(args) -> int:
    if not STATE.exists():
        print("no local tandem cluster is running")
        return 0
    pid = json.loads(STATE.read_text())["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        try:  # its nodes are in its process group (start_new_session): agents that
            os.killpg(pid, signal.SIGKILL)  # ignored SIGTERM go with it too
        except OSError:
            pass
    STATE.unlink(missing_ok=True)
    print("stopped the local tandem cluster")
    return 0


def _connect() -> dict | None:
    """Joins the cluster of `tandem up` (its state file); None when none runs."""
    if not STATE.exists() or not json.loads(STATE.read_text()).get("ready"):
        print("no local tandem cluster is running (`tandem up` first)", file=sys.stderr)
        return None
    import ray

    state = json.loads(STATE.read_text())
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = (RUN_DIR / "ray_auth_token").read_text().strip()
    ray.init(address=state["ray_address"], logging_level="ERROR", log_to_driver=False)
    return state


def cmd_rollout(args) -> int:
    from cluster import rollout_controller as rc
    from cluster.config import ConfigError, load_serve_config
    from cluster.rollout import RolloutPlan, load_plan

    if args.action == "start":
        try:
            new_doc, _ = load_serve_config(args.config)
            plan = load_plan(args.plan) if args.plan else RolloutPlan()
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
    state = _connect()
    if state is None:
        return 1
    import ray

    doc = rc.running(load_serve_config(state["config"])[0])
    app = rc.tandem_app(doc)["name"]
    if args.action == "start":
        try:
            rc.begin(doc, new_doc, plan)
        except (ConfigError, ValueError) as err:
            print(err, file=sys.stderr)
            return 2
        print(f"rollout of {args.config} started ({len(plan.steps)} steps); "
              "`tandem rollout status` to follow it")
        return 0
    try:
        controller = rc.get(app)
    except ValueError:
        print(f"no rollout of app {app!r}", file=sys.stderr)
        return 1
    method = {"status": controller.status, "pause": controller.pause,
              "resume": controller.resume, "abort": controller.abort}[args.action]
    print(json.dumps(ray.get(method.remote()), indent=2))
    return 0


def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(f"cluster.bench.{args.which}").main(args.rest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    model = sub.add_parser("model", help="the built-in default model")
    msub = model.add_subparsers(dest="model_cmd", required=True)
    init = msub.add_parser("init", help="build the default model if missing")
    init.add_argument("--out", help="folder (default: ~/.cache/tandem/models/tandem-tiny)")
    init.add_argument("--force", action="store_true")
    init.add_argument("--shape", default="tiny",
                      choices=["tiny", "qwen2.5-0.5b", "deepseek-v3-tiny", "deepseek-v2-lite"],
                      help="layers of the generated model (random weights either way; "
                      "deepseek-v2-lite is ~31 GB)")
    init.set_defaults(fn=cmd_model_init)
    up = sub.add_parser("up", help="start the local cluster and deploy the app")
    up.add_argument("--config", default="deployments/local.yaml")
    up.add_argument("--detach", action="store_true", help="return once it serves")
    up.add_argument("--model-gpus", type=int, default=0,
                    help="GPUs the model node advertises (0: CPU engine)")
    up.add_argument("--timeout", type=float, default=600)
    up.set_defaults(fn=cmd_up)
    stop = sub.add_parser("stop", help="stop the cluster that `tandem up` started")
    stop.set_defaults(fn=cmd_stop)
    rollout = sub.add_parser("rollout", help="a canary rollout on the `tandem up` cluster")
    rsub = rollout.add_subparsers(dest="action", required=True)
    rstart = rsub.add_parser("start", help="deploy the new config's model as the canary and "
                             "start the rollout controller")
    rstart.add_argument("--config", required=True, help="the new version's Serve config")
    rstart.add_argument("--plan", help="rollout plan YAML (default: 0.05, 0.25, 0.5, 1.0, "
                        "300 s each)")
    for action in ("status", "pause", "resume", "abort"):
        rsub.add_parser(action)
    rollout.set_defaults(fn=cmd_rollout)
    bench = sub.add_parser("bench", help="benchmarks: serve | engine | routing (args follow)")
    bench.add_argument("which", choices=["serve", "engine", "routing"])
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
