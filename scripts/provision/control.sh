#!/usr/bin/env bash
# scripts/provision/control.sh — the Vagrant control VM: etcd (the registry) and the mesh CA.
#
#   CONTROL_IP=192.168.56.10 NODES="node1 node2" SHARE=/vagrant/.nodemesh \
#     bash scripts/provision/control.sh
#
# 1. scripts/install.sh (nodemesh in /opt/nodemesh/venv; the agent is not started here);
# 2. Debian's etcd listening on CONTROL_IP:2379 (and 127.0.0.1), restarted with that config;
# 3. the mesh CA (`nodemesh ca init`) in /etc/nodemesh/ca: its key never leaves this VM.
#    Each node in NODES gets only a node credential (`nodemesh ca issue-node`) in
#    SHARE/nodes/<node> (SHARE is in the synced folder), and the CA service
#    (deploy/nodemesh-ca.service, `nodemesh ca serve`) listens on CONTROL_IP:15012: it
#    signs a workload identity for a node only if the registry places it there;
# 4. the demo's services and workloads (deploy/demo/mesh.yaml) applied to etcd.
set -euo pipefail
say() { printf 'control: %s\n' "$*"; }
# the checkout (Vagrant uploads this script elsewhere and passes NODEMESH_SRC=/vagrant)
ROOT=${NODEMESH_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
: "${CONTROL_IP:?set CONTROL_IP}" "${NODES:?set NODES (the node names, space-separated)}"
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
rm -rf "$SHARE/ca"  # an older provisioning shared the whole CA directory, key included
for node in $NODES; do
  [ -e "$SHARE/nodes/$node/node.crt" ] \
    || "$NODEMESH" ca issue-node --dir /etc/nodemesh/ca --node "$node" --out "$SHARE/nodes/$node"
done
cat > /etc/default/nodemesh-ca <<CONF
# written by scripts/provision/control.sh
NODEMESH_CA_LISTEN=$CONTROL_IP:15012
NODEMESH_ETCD=http://$CONTROL_IP:2379
CONF
systemctl daemon-reload
systemctl enable nodemesh-ca
systemctl restart nodemesh-ca
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/$CONTROL_IP/15012") 2>/dev/null && break
  sleep 0.2
done
(exec 3<>"/dev/tcp/$CONTROL_IP/15012") 2>/dev/null || { echo "control: the CA service is not listening" >&2; exit 1; }
say "mesh CA in /etc/nodemesh/ca (key stays here); CA service on $CONTROL_IP:15012;" \
    "node credentials for $NODES in $SHARE/nodes"

"$NODEMESH" apply -f "$ROOT/deploy/demo/mesh.yaml" --etcd "http://$CONTROL_IP:2379"
say "demo services and workloads applied"
