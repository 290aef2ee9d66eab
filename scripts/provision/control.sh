#!/usr/bin/env bash
# scripts/provision/control.sh — the Vagrant control VM: etcd (the registry) and the mesh CA.
#
#   CONTROL_IP=192.168.56.10 SHARE=/vagrant/.nodemesh bash scripts/provision/control.sh
#
# 1. scripts/install.sh (nodemesh in /opt/nodemesh/venv; the agent is not started here);
# 2. Debian's etcd listening on CONTROL_IP:2379 (and 127.0.0.1), restarted with that config;
# 3. the mesh CA (`nodemesh ca init`) in /etc/nodemesh/ca, copied to SHARE/ca for the nodes
#    (SHARE is in the synced folder). nodemesh has no networked CA service yet: each node
#    agent runs the CA in-process from that directory, so the CA key travels to the nodes;
# 4. the demo's services and workloads (deploy/demo/mesh.yaml) applied to etcd.
set -euo pipefail
say() { printf 'control: %s\n' "$*"; }
# the checkout (Vagrant uploads this script elsewhere and passes NODEMESH_SRC=/vagrant)
ROOT=${NODEMESH_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
: "${CONTROL_IP:?set CONTROL_IP}"
SHARE=${SHARE:-/vagrant/.nodemesh}

bash "$ROOT/scripts/install.sh"
NODEMESH=/opt/nodemesh/venv/bin/nodemesh

export DEBIAN_FRONTEND=noninteractive
dpkg-query -W -f='${Status}' etcd-server 2>/dev/null | grep -q 'install ok installed' \
  || { apt-get update -qq; apt-get install -y -qq --no-install-recommends etcd-server etcd-client >/dev/null; }
cat > /etc/default/etcd <<CONF
# written by scripts/provision/control.sh
ETCD_NAME=control
ETCD_DATA_DIR=/var/lib/etcd/default
ETCD_LISTEN_CLIENT_URLS=http://127.0.0.1:2379,http://$CONTROL_IP:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$CONTROL_IP:2379
CONF
systemctl restart etcd
for _ in $(seq 1 50); do
  curl -fsS "http://$CONTROL_IP:2379/health" 2>/dev/null | grep -q true && break
  sleep 0.2
done
curl -fsS "http://$CONTROL_IP:2379/health" | grep -q true || { echo "control: etcd is not healthy" >&2; exit 1; }
say "etcd at http://$CONTROL_IP:2379"

[ -e /etc/nodemesh/ca/ca.crt ] || "$NODEMESH" ca init --dir /etc/nodemesh/ca --trust-domain cluster.local
install -d -m 0700 "$SHARE/ca"
cp -a /etc/nodemesh/ca/. "$SHARE/ca/"
say "mesh CA in /etc/nodemesh/ca, shared with the nodes in $SHARE/ca"

"$NODEMESH" apply -f "$ROOT/deploy/demo/mesh.yaml" --etcd "http://$CONTROL_IP:2379"
say "demo services and workloads applied"
