#!/bin/sh
# Installs what building TeleTUN and running its tests and testbench need on a
# fresh Debian/Ubuntu machine. Run as root. Safe to run again.
set -eu
packages="libssl-dev pkg-config iperf3 dnsmasq-base nftables iputils-ping conntrack"
missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "ci/setup-debian.sh: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
fi
# The testbench's Kubernetes control plane: kube-apiserver and etcd, built once
# from their pinned Go modules (testbench/controlplane/go.mod) into the
# testbench cache outside the clone; later runs find them there.
cd "$(dirname "$0")/.."
cargo run -q --locked -p testbench -- setup
