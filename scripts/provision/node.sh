#!/usr/bin/env bash
# scripts/provision/node.sh — a Vagrant node VM: the agent, two demo pods, traffic, status.
#
#   NODE_NAME=node1 NODE_INDEX=1 NODE_IP=192.168.56.11 ETCD_URL=http://192.168.56.10:2379 \
#   CA_ADDR=192.168.56.10:15012 PEERS="node2=192.168.56.12" SHARE=/vagrant/.nodemesh \
#   bash scripts/provision/node.sh
#
# 1. scripts/install.sh (unless NODEMESH_SKIP_INSTALL=1: then NODEMESH_BIN is used);
# 2. this node's credential for the CA service, from SHARE/nodes/NODE_NAME (written there
#    by control.sh) into $ETC/node; the CA key itself never comes here;
# 3. pods as network namespaces: a bridge nm-br0 holding the pods' gateway
#    10.244.NODE_INDEX.1/24 and one veth per pod — "web" (.2, serves :8080) and
#    "client" (.3) — in the network namespace this script runs in;
# 4. $ETC/agent.yaml: etcd registry, the peers, the pods enrolled, interception
#    attached to a cgroup made for the pods; checked with `nodemesh agent --check-config`;
# 5. unless NODEMESH_NO_START=1: the agent under systemd, the web server in its pod,
#    requests from the client pod to the web service (whose pods are on both nodes, so
#    traffic crosses to the other node once it is up), and `nodemesh status`.
#
# Test knobs (tests/integration/test_ops_vagrant.py runs this inside a network namespace
# it made, never in the host's): DESTDIR (install and $ETC below it), POD_PREFIX (prefix of
# the pods' netns names), CGROUP (the pods' cgroup), BPFFS_ROOT.
set -euo pipefail
say() { printf 'node %s: %s\n' "$NODE_NAME" "$*"; }
die() { printf 'node %s: error: %s\n' "${NODE_NAME:-?}" "$*" >&2; exit 1; }
# the checkout (Vagrant uploads this script elsewhere and passes NODEMESH_SRC=/vagrant)
ROOT=${NODEMESH_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
: "${NODE_NAME:?set NODE_NAME}" "${NODE_INDEX:?set NODE_INDEX}" "${NODE_IP:?set NODE_IP}" "${ETCD_URL:?set ETCD_URL}"
: "${CA_ADDR:?set CA_ADDR (host:port of the CA service, nodemesh ca serve)}"
PEERS=${PEERS:-}
SHARE=${SHARE:-/vagrant/.nodemesh}
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
ETC=$DESTDIR/etc/nodemesh
POD_PREFIX=${POD_PREFIX:-}
CG2=$(cat /run/nodemesh/cgroup2 2>/dev/null || awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
CGROUP=${CGROUP:-$CG2/nodemesh-pods}
BPFFS_ROOT=${BPFFS_ROOT:-/sys/fs/bpf/nodemesh}
[[ "$NODE_INDEX" =~ ^[0-9]+$ ]] && [ "$NODE_INDEX" -ge 1 ] && [ "$NODE_INDEX" -le 254 ] \
  || die "NODE_INDEX must be 1-254, got '$NODE_INDEX'"
GATEWAY=10.244.$NODE_INDEX.1
PODS=(web client)
declare -A POD_IP=([web]=10.244.$NODE_INDEX.2 [client]=10.244.$NODE_INDEX.3)

# 1. install
if [ "${NODEMESH_SKIP_INSTALL:-0}" = 1 ]; then
  NODEMESH=${NODEMESH_BIN:?NODEMESH_SKIP_INSTALL=1 needs NODEMESH_BIN}
else
  DESTDIR=$DESTDIR NODEMESH_NODE=$NODE_NAME NODEMESH_NODE_IP=$NODE_IP NODEMESH_POD_GATEWAY=$GATEWAY \
    bash "$ROOT/scripts/install.sh"
  NODEMESH=$DESTDIR/opt/nodemesh/venv/bin/nodemesh
fi

# 2. the node credential
[ -e "$SHARE/nodes/$NODE_NAME/node.crt" ] \
  || die "no node credential in $SHARE/nodes/$NODE_NAME: provision the control VM first"
install -d -m 0700 "$ETC/node"
cp -a "$SHARE/nodes/$NODE_NAME/." "$ETC/node/"

# 3. pods
if ! ip link show nm-br0 >/dev/null 2>&1; then
  ip link add nm-br0 type bridge
  ip addr add "$GATEWAY/24" dev nm-br0
fi
ip link set nm-br0 up
for pod in "${PODS[@]}"; do
  ns=$POD_PREFIX$NODE_NAME-$pod
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  if ! ip link show "nm-$pod" >/dev/null 2>&1; then
    ip link add "nm-$pod" type veth peer name eth0 netns "$ns"
    ip link set "nm-$pod" master nm-br0 up
    ip -n "$ns" addr add "${POD_IP[$pod]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" route add default via "$GATEWAY"
  fi
done
mkdir -p "$CGROUP"
say "pods: ${PODS[*]} (netns $POD_PREFIX$NODE_NAME-*, gateway $GATEWAY, cgroup $CGROUP)"

# 4. configuration
peers_yaml=""
for p in $PEERS; do peers_yaml+="  ${p%%=*}: ${p#*=}"$'\n'; done
install -d -m 0755 "$ETC"
cat > "$ETC/agent.yaml.new" <<CONF
# written by scripts/provision/node.sh
node: $NODE_NAME
trust_domain: cluster.local
addresses: {proxy: $GATEWAY, hbone: $NODE_IP, metrics: $NODE_IP}
registry: {backend: etcd, endpoints: [$ETCD_URL]}
ca: {service: $CA_ADDR, node_dir: $ETC/node}
interception:
  cgroup: $CGROUP
  bpffs_root: $BPFFS_ROOT
  capture_cidrs: [10.96.0.0/16, 10.244.0.0/16]
  excluded_ports: [15000, 15001, 15008, 15020, 15021, 15053]
  enroll: [/run/netns/$POD_PREFIX$NODE_NAME-web, /run/netns/$POD_PREFIX$NODE_NAME-client]
peers:
${peers_yaml:-  {\}}
log_level: info
CONF
"$NODEMESH" agent --check-config -c "$ETC/agent.yaml.new" || die "the generated $ETC/agent.yaml is not valid"
mv "$ETC/agent.yaml.new" "$ETC/agent.yaml"
say "wrote $ETC/agent.yaml"

[ "${NODEMESH_NO_START:-0}" = 1 ] && { say "NODEMESH_NO_START=1: configured, not started"; exit 0; }

# 5. run: the agent, the web pod, traffic, status
in_pod() {  # in_pod POD CMD...: run CMD in the pod's netns and cgroup (so it is captured)
  local ns=$POD_PREFIX$NODE_NAME-$1; shift
  sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CGROUP" ip netns exec "$ns" "$@"
}
[ -d /run/systemd/system ] || die "systemd is not running: start the agent by hand (nodemesh agent -c $ETC/agent.yaml)"
systemctl enable nodemesh-agent
systemctl restart nodemesh-agent   # Type=notify: returns once the agent is ready
mkdir -p /srv/nodemesh-demo && printf '%s\n' "$NODE_NAME" > /srv/nodemesh-demo/whoami
if ! in_pod web curl -fsS -o /dev/null "http://${POD_IP[web]}:8080/whoami" 2>/dev/null; then
  in_pod web setsid python3 -m http.server 8080 --bind "${POD_IP[web]}" --directory /srv/nodemesh-demo \
    >/var/log/nodemesh-demo-web.log 2>&1 < /dev/null &
  sleep 1
fi
seen=""
for _ in $(seq 1 20); do
  seen+=" $(in_pod client curl -fsS --max-time 5 http://10.96.0.10/whoami || echo FAILED)"
done
say "20 requests to web (10.96.0.10) from $NODE_NAME-client were answered by:$(tr ' ' '\n' <<<"$seen" | sort | uniq -c | tr '\n' ' ')"
[[ "$seen" != *FAILED* ]] || die "requests through the mesh failed"
"$NODEMESH" status || die "nodemesh status is not green"
say "nodemesh status: green"
