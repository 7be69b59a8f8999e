#!/usr/bin/env bash
# Ray on one host of a `ray up` cluster: node.sh head | worker | stop | stop-workers
#
# The local provider gives every worker the same start command, so whatever differs between
# hosts comes from the host itself, from two files it keeps:
#   ~/.tandem/labels.yaml  its Ray node labels (`ray start --labels-file`), e.g.
#                          {cpu-arch: kunpeng, node-role: preprocess} or {node-role: model,
#                          gpu-type: H100}; written by the operator or by `host-setup.sh --labels`
#   ~/.tandem/node.env     optional shell variables: NCCL_SOCKET_IFNAME, NCCL_IB_HCA,
#                          NCCL_IB_DISABLE, ...; TANDEM_NODE_IP; RAY_START_ARGS (--num-gpus=...)
# Cloud node types get their labels from the cluster YAML instead (Ray passes them to
# `ray start` in RAY_OVERRIDE_LABELS).
set -euo pipefail

venv=${TANDEM_VENV:-$HOME/tandem-venv}
# shellcheck disable=SC1091
source "$venv/bin/activate"
set -a
# shellcheck disable=SC1090
[ -f ~/.tandem/node.env ] && source ~/.tandem/node.env
set +a
# Ray Serve settings of every tandem node (the data plane's; cluster/data/serve.env says why)
set -a
# shellcheck disable=SC1091
source "$(dirname "$(readlink -f "$0")")/../cluster/data/serve.env"
set +a
# token authentication, with the token that ray up's file_mounts put in ~/.ray/auth_token
export RAY_AUTH_MODE=token
# ray up exports OMP_NUM_THREADS=1 to the commands it runs; Ray would pass it on to every
# worker, pinning torch to one thread on hosts with dozens of cores
unset OMP_NUM_THREADS

start_args() {
    # The address ray up reached this host by (its entry in head_ip / worker_ips), not the one
    # of the default route, which on hosts with several networks may be another one.
    local ip=${TANDEM_NODE_IP:-${SSH_CONNECTION:+$(echo "$SSH_CONNECTION" | cut -d' ' -f3)}}
    args=(--disable-usage-stats)
    [ -n "$ip" ] && args+=("--node-ip-address=$ip")
    [ -f ~/.tandem/labels.yaml ] && args+=("--labels-file=$HOME/.tandem/labels.yaml")
    # shellcheck disable=SC2206
    args+=(${RAY_START_ARGS:-})
}

case ${1:-} in
    head)
        start_args
        ray stop
        ulimit -n 65536 2>/dev/null || true
        ray start --head --port=6379 --dashboard-host=0.0.0.0 \
            --autoscaling-config="$HOME/ray_bootstrap_config.yaml" "${args[@]}"
        ;;
    worker)
        start_args
        ray stop
        ulimit -n 65536 2>/dev/null || true
        ray start --address="${RAY_HEAD_IP:?set by ray up}:6379" "${args[@]}"
        ;;
    stop)
        ray stop
        ;;
    stop-workers)
        # `ray down` stops Ray on the head only; with the local provider the worker hosts would
        # keep their raylets until they give up on the head. Run on the head (`ray exec`).
        python - <<'EOF'
import json, os, subprocess
cfg = json.load(open(os.path.expanduser("~/ray_bootstrap_config.yaml")))
if cfg["provider"]["type"] == "local":
    key = os.path.expanduser(cfg["auth"].get("ssh_private_key", "~/ray_bootstrap_key.pem"))
    for ip in cfg["provider"].get("worker_ips", []):
        subprocess.run(["ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o",
                        "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o",
                        "ConnectTimeout=10", f"{cfg['auth']['ssh_user']}@{ip}",
                        "bash ~/tandem/infra/node.sh stop"], check=False)
EOF
        ;;
    *)
        echo "usage: node.sh head|worker|stop|stop-workers" >&2
        exit 2
        ;;
esac
