#!/usr/bin/env bash
# Prepares one host of a `ray up` cluster (its setup_commands); safe to rerun:
#   - a venv at ~/tandem-venv with the torch build this host needs: the CUDA build on GPU hosts,
#     the CPU build elsewhere (on aarch64 the default torch wheel is the CPU one, on x86-64 the
#     CUDA one). TORCH_INDEX_URL points pip at one of PyTorch's own wheel indexes where the
#     default does not fit: its CUDA index on ARM GPU hosts (Grace), its CPU index to keep CUDA
#     libraries off x86-64 CPU hosts.
#   - tandem from ~/tandem (the repo ray up syncs), installed editable, so a new `ray up`
#     brings new code; reinstalled when pyproject.toml changed. A venv that has tandem and
#     was not made by this script is left as it is.
#   - login shells that find `ray` (ray down runs a bare `ray stop` on the head).
#   - with --labels head|worker: ~/.tandem/labels.yaml, unless the operator wrote one; a
#     worker's labels are guessed from the host: GPU -> node-role=model, gpu-type=<model>;
#     HiSilicon ARM CPU -> cpu-arch=kunpeng, node-role=preprocess.
set -euo pipefail

venv=${TANDEM_VENV:-$HOME/tandem-venv}
src=${TANDEM_SRC:-$HOME/tandem}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
stamp=~/.tandem/installed-pyproject.toml
mkdir -p ~/.tandem

gpu_name() { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true; }

# ~/tandem-venv may be a link to a venv kept elsewhere (shared storage, a checkout's .venv):
# used as it is while it leads to one. `python3 -m venv` refuses any link, so a link to a
# folder without one gets its venv made in that folder, and a link that leads nowhere (its
# target deleted, or on storage not mounted) gives way to a venv of this host's own.
if [ -L "$venv" ] && [ ! -e "$venv" ]; then
    echo "host-setup: $venv links to $(readlink "$venv"), which does not exist:" \
        "replacing the link with a venv here" >&2
    rm "$venv"
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$(readlink -f "$venv")"
pip=("$venv/bin/python" -m pip install -q)
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    if [ -n "$(gpu_name)" ] && [ "$(uname -m)" = aarch64 ] && [ -z "${TORCH_INDEX_URL:-}" ]; then
        echo "host-setup: ARM GPU host: set TORCH_INDEX_URL to PyTorch's CUDA wheel index" >&2
        exit 1
    fi
    "${pip[@]}" --upgrade pip
    "${pip[@]}" "$torch_spec" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
if ! "$venv/bin/python" -m pip show -q tandem 2>/dev/null \
        || { [ -f "$stamp" ] && ! cmp -s "$src/pyproject.toml" "$stamp"; }; then
    # the engine extra (torch is there already); transfer: the KV pool's fetches by Mooncake's
    # transfer engine (it needs libibverbs1 from the OS: without it they go by Ray)
    "${pip[@]}" -e "$src[engine,transfer]"
    cp "$src/pyproject.toml" "$stamp"
fi

# Ray's ssh commands run `bash --login -i` and source ~/.bashrc
line="[ -f $venv/bin/activate ] && . $venv/bin/activate && export RAY_AUTH_MODE=token  # tandem"
grep -qxF "$line" ~/.bashrc 2>/dev/null || echo "$line" >> ~/.bashrc

if [ "${1:-}" = --labels ] && [ ! -f ~/.tandem/labels.yaml ]; then
    gpu=$(gpu_name)
    if [ "${2:-}" = head ]; then
        labels="node-role: head"
    elif [ -n "$gpu" ]; then
        # label values: letters, digits, '-', '_', '.'; "NVIDIA H100 80GB HBM3" -> H100-80GB-HBM3
        type=$(echo "${gpu#NVIDIA }" | tr -cs 'A-Za-z0-9._' '-' | sed 's/^-*//; s/-*$//' | cut -c1-63)
        labels=$'node-role: model\ngpu-type: '"$type"$'\ncpu-arch: '"$(uname -m)"
    elif [ "$(uname -m)" = aarch64 ] && grep -qi '^CPU implementer.*0x48' /proc/cpuinfo; then
        labels=$'cpu-arch: kunpeng\nnode-role: preprocess'
    else
        labels=$'cpu-arch: '"$(uname -m)"$'\nnode-role: preprocess'
    fi
    echo "$labels" > ~/.tandem/labels.yaml
    echo "host-setup: wrote ~/.tandem/labels.yaml:"; cat ~/.tandem/labels.yaml
fi
