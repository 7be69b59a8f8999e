"""`ray up` on real hosts: `make cluster-up`, `cluster-deploy` and `cluster-down` against a head,
a Kunpeng host and a GPU host (it declares one GPU; the engine runs on the CPU), with a cluster
YAML made from infra/onprem.yaml and a Serve config made from infra/serve.yaml.

Each host is a network namespace of this machine with its own address on a private bridge, its
own sshd, PID namespace (so the `ray stop` of `ray down` sees only that host's processes), /tmp
and /root. Other files are shared, so each home links ~/tandem-venv to this checkout's venv
(wherever the checkout is: one under /tmp or /root is bound into the host's own):
host-setup.sh finds tandem installed and installs nothing. Needs root; ~45 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster.config import DEFAULT_MODEL_DIR
from tests.skips import skip_or_fail

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
LABELS = {
    "head": {"node-role": "head"},
    "kunpeng": {"cpu-arch": "kunpeng", "node-role": "preprocess"},
    "gpu": {"node-role": "model", "gpu-type": "declared"},
}
# the whole cluster shares 2 cores: one logical CPU per host and a small object store each
START_ARGS = {
    "head": "--num-cpus=1",
    "kunpeng": "--num-cpus=1",
    "gpu": "--num-cpus=1 --num-gpus=1",
}


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def require_tools() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root: network namespaces and one sshd per host")
    need = {"/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client", "rsync": "rsync",
            "ip": "iproute2", "unshare": "util-linux"}
    missing = sorted({pkg for tool, pkg in need.items() if not shutil.which(tool)})
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        ok = shutil.which("apt-get") and sh("apt-get", "update", "-qq", check=False,
                                            env=env).returncode == 0 and sh(
            "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing,
            check=False, env=env).returncode == 0
        if not ok:
            skip_or_fail(f"cannot install {', '.join(missing)}")
    probe = f"tdm-probe-{os.getpid()}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        skip_or_fail("`ip netns add` does not work here")
    sh("ip", "netns", "del", probe)


def free_subnet() -> str:
    routes = sh("ip", "-4", "route").stdout
    for third in range(211, 251):
        net = f"10.{third}.0"
        if f"{net}.0/24" not in routes:
            return net
    skip_or_fail("no free 10.x.0.0/24 for the test hosts")


class Hosts:
    """Three hosts on a bridge: head .10, kunpeng .11, gpu .12."""

    def __init__(self, base: Path):
        self.base, self.tag = base, secrets.token_hex(2)
        self.net = free_subnet()
        self.bridge = f"tdm{self.tag}br"
        self.ip = {role: f"{self.net}.{10 + i}" for i, role in enumerate(LABELS)}
        self.ns = {role: f"tdm{self.tag}-{role}" for role in LABELS}
        self.sshd: dict[str, subprocess.Popen] = {}
        self.key = base / "id_ed25519"
        self.made_run_sshd = False

    def start(self) -> None:
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        if not Path("/run/sshd").exists():  # sshd's privilege separation directory
            Path("/run/sshd").mkdir(mode=0o755)
            self.made_run_sshd = True
        for role in LABELS:
            self._add_host(role)
        deadline = time.monotonic() + 30
        for role, ip in self.ip.items():
            while True:
                try:
                    socket.create_connection((ip, 22), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or self.sshd[role].poll() is not None:
                        log = (self.base / role / "sshd.log").read_text()
                        raise RuntimeError(f"sshd of {role} did not start: {log}") from None
                    time.sleep(0.2)

    def _add_host(self, role: str) -> None:
        ns, ip, veth, d = self.ns[role], self.ip[role], f"tdm{self.tag}{role[0]}", self.base / role
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", self.bridge, "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # a fresh home, as on a new host (mounted over /root: ssh reads ~ from the password
        # file, not $HOME), and a fresh /tmp, with the checkout's venv as ~/tandem-venv
        shutil.copytree("/etc/skel", d / "home")
        (d / "tmp").mkdir(mode=0o1777)
        (d / "tmp").chmod(0o1777)
        own = {Path("/tmp"): d / "tmp", Path("/root"): d / "home"}
        # the checkout (a clone in /tmp, say) and the venv's interpreter (may be under /root)
        # would be hidden by the host's own /tmp and /root, and the link would dangle: each is
        # bound at its own path inside them first (outer paths first), then they are mounted
        # with what is bound in them
        binds = []
        for path in sorted({Path(sys.base_prefix), ROOT}, key=lambda p: len(p.parts)):
            for top, mine in own.items():
                if path.is_relative_to(top):
                    (mine / path.relative_to(top)).mkdir(parents=True, exist_ok=True)
                    binds.append(f"mount --bind {path} {mine / path.relative_to(top)}")
        binds += [f"mount --rbind {mine} {top}" for top, mine in own.items()]
        (d / "home" / "tandem-venv").symlink_to(ROOT / ".venv")
        (d / "home" / ".tandem").mkdir()
        (d / "home" / ".tandem" / "labels.yaml").write_text(yaml.safe_dump(LABELS[role]))
        (d / "home" / ".tandem" / "node.env").write_text(
            f'RAY_START_ARGS="{START_ARGS[role]} --object-store-memory=100000000"\n')
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
        (d / "sshd_config").write_text(f"""\
ListenAddress {ip}
HostKey {d}/host_key
PidFile {d}/sshd.pid
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile {self.key}.pub
StrictModes no
PrintMotd no
""")
        # sshd is PID 1 of the host's PID namespace: when it goes, the kernel ends every
        # process of the host; --kill-child ends it when unshare is killed
        self.sshd[role] = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--pid", "--fork", "--kill-child",
             "--mount-proc", "sh", "-c",
             " && ".join([*binds, f"exec /usr/sbin/sshd -D -e -f {d}/sshd_config"])],
            stdout=open(d / "sshd.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def processes(self, role: str) -> list[str]:
        """Every process of a host but its sshd: `pid comm`."""
        out = []
        for pid in sh("ip", "netns", "pids", self.ns[role], check=False).stdout.split():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm != "sshd" and int(pid) != self.sshd[role].pid:  # the latter: unshare
                out.append(f"{pid} {comm}")
        return out

    def environ(self, role: str, cmdline: str) -> dict[str, str]:
        """The environment of the host's process whose command line contains `cmdline`."""
        for pid in sh("ip", "netns", "pids", self.ns[role], check=False).stdout.split():
            try:
                if cmdline in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    raw = Path(f"/proc/{pid}/environ").read_text(errors="replace")
                    return dict(v.split("=", 1) for v in raw.split("\0") if "=" in v)
            except OSError:
                continue
        raise AssertionError(f"no process {cmdline!r} on {role}")

    def stop(self) -> None:
        for proc in self.sshd.values():
            proc.kill()
            proc.wait(timeout=30)
        for role in LABELS:
            for line in self.processes(role):  # whatever escaped the PID namespace's end
                try:
                    os.kill(int(line.split()[0]), 9)
                except OSError:
                    pass
            sh("ip", "netns", "del", self.ns[role], check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        if self.made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)


def cluster_yaml(hosts: Hosts, run: Path) -> dict:
    """infra/onprem.yaml with these hosts, root's throwaway key and the test's launcher files;
    setup and start commands as shipped."""
    cfg = yaml.safe_load((ROOT / "infra" / "onprem.yaml").read_text())
    cfg["cluster_name"] = f"tandem-test-{hosts.tag}"
    cfg["provider"].update(head_ip=hosts.ip["head"],
                           worker_ips=[hosts.ip["kunpeng"], hosts.ip["gpu"]])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(hosts.key)}
    mounts = {}
    for remote, local in cfg["file_mounts"].items():
        if local.startswith(".run/cluster/"):
            local = str(run / local.removeprefix(".run/cluster/"))
        elif local.endswith("/tandem-tiny"):
            local = str(DEFAULT_MODEL_DIR)
        mounts[remote] = local
    cfg["file_mounts"] = mounts
    return cfg


def serve_yaml() -> dict:
    """infra/serve.yaml sized for this machine; the model pool keeps num_gpus: 1."""
    doc = yaml.safe_load((ROOT / "infra" / "serve.yaml").read_text())
    args = doc["applications"][0]["args"]
    # no C++ attention kernel: a fresh host's home builds it on the replica's first start
    # (~51 s of this test's 2 cores, tests/test_cpu_kernels.py covers it); batched SDPA here
    args["engine"].update(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=256,
                          cpu_kv_cache_gib=0.02, torch_threads=1, cpu_attention_kernel=False)
    args["frontend_pool"].update(num_replicas=1, num_cpus=0.5)
    args["model_pool"].update(num_cpus=0.5)
    return doc


PLACEMENT = """
import json, sys
from ray.util.state import list_actors, list_nodes
addr = sys.argv[1]
nodes = {n.node_id: n for n in list_nodes(address=addr, detail=True)}
replicas = {}
for a in list_actors(address=addr, filters=[("state", "=", "ALIVE")], detail=True):
    if a.class_name.startswith("ServeReplica:"):
        replicas.setdefault(a.class_name.rsplit(":", 1)[1], []).append(nodes[a.node_id].node_ip)
print(json.dumps({"replicas": replicas, "nodes": {
    n.node_ip: {"labels": n.labels, "gpus": n.resources_total.get("GPU", 0)}
    for n in nodes.values() if n.state == "ALIVE"}}))
"""


@pytest.fixture
def hosts():
    require_tools()
    base = Path(tempfile.mkdtemp(prefix="tandem-rayup-", dir="/var/tmp"))  # not /tmp: each
    hosts = Hosts(base)                                   # host mounts its own over /tmp
    try:
        hosts.start()
        yield hosts
    finally:
        hosts.stop()
        shutil.rmtree(base, ignore_errors=True)


def short_hash(s: str) -> str:  # as Ray names its ssh control paths
    return hashlib.sha256(s.encode()).hexdigest()[:10]


def forget_cluster(name: str) -> None:
    """What ray up, exec and down leave in the launcher's /tmp for a cluster."""
    for f in (f"cluster-{name}.state", f"cluster-{name}.lock"):
        Path("/tmp/ray", f).unlink(missing_ok=True)
    for cached in Path("/tmp").glob("ray-config-*"):
        if f'"{name}"' in cached.read_text(errors="replace"):
            cached.unlink()
    ssh = Path(f"/tmp/ray_ssh_{short_hash('root')}")
    shutil.rmtree(ssh / short_hash(name), ignore_errors=True)
    if ssh.is_dir() and not any(ssh.iterdir()):
        ssh.rmdir()


def test_ray_up_places_tokenizer_on_kunpeng_and_model_on_gpu(hosts, model_dir, tmp_path):
    from openai import OpenAI

    run = hosts.base / "launcher"  # CLUSTER_RUN: the token and the repo copy
    cfg = cluster_yaml(hosts, run)
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_yaml()))
    # the CLIs must use this cluster's token, not one another test left in the environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    head = hosts.ip["head"]

    def make(target: str, timeout: float) -> str:
        t0 = time.monotonic()
        res = subprocess.run(
            ["make", "-C", str(ROOT), target, f"CLUSTER_YAML={tmp_path / 'cluster.yaml'}",
             f"SERVE_CONFIG={tmp_path / 'serve.yaml'}", f"CLUSTER_RUN={run}"],
            capture_output=True, text=True, timeout=timeout, env=env)
        print(f"make {target}: {time.monotonic() - t0:.0f} s")
        assert res.returncode == 0, f"make {target}:\n{res.stdout[-6000:]}\n{res.stderr[-6000:]}"
        return res.stdout

    try:
        make("cluster-up", timeout=240)
        out = make("cluster-deploy", timeout=300)
        assert f"tandem is serving at http://{head}:8000/v1" in out

        client = OpenAI(base_url=f"http://{head}:8000/v1", api_key="unused", max_retries=0,
                        timeout=120)
        assert [m.id for m in client.models.list().data] == ["tandem-tiny"]
        chat = client.chat.completions.create(
            model="tandem-tiny", max_tokens=8, messages=[{"role": "user", "content": "Hello"}])
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens >= 1

        state = json.loads(sh(
            str(BIN / "python"), "-c", PLACEMENT, f"http://{head}:8265",
            env={**env, "RAY_AUTH_MODE": "token",
                 "RAY_AUTH_TOKEN_PATH": str(run / "ray_auth_token")}).stdout)
        nodes = state["nodes"]
        assert set(nodes) == set(hosts.ip.values())
        for role, ip in hosts.ip.items():  # labels from each host's own labels file
            assert LABELS[role].items() <= nodes[ip]["labels"].items(), (role, nodes[ip])
        assert nodes[hosts.ip["gpu"]]["gpus"] == 1
        assert state["replicas"]["Ingress"] == [hosts.ip["kunpeng"]]
        assert state["replicas"]["ModelReplica"] == [hosts.ip["gpu"]]
        # the YAML's NCCL settings reach the model replica's process
        nccl = dict(re.findall(r"(NCCL_\w+)=(\S*)", cfg["worker_start_ray_commands"][0]))
        replica = hosts.environ("gpu", "ServeReplica:tandem:ModelReplica")
        assert nccl and {k: replica.get(k) for k in nccl} == nccl
    finally:
        try:
            make("cluster-down", timeout=120)
        finally:
            forget_cluster(cfg["cluster_name"])
    # `ray down` (the workers stopped first) leaves no process but sshd on any host
    deadline = time.monotonic() + 30
    while (left := {r: hosts.processes(r) for r in LABELS if hosts.processes(r)}) \
            and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"still running after cluster-down: {left}"
    assert not (run / "ray_auth_token").exists()  # the token goes with the cluster
