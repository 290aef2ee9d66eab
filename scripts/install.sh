#!/usr/bin/env bash
# scripts/install.sh — install nodemesh on a host as a systemd service (root, idempotent).
#
#   sudo scripts/install.sh            # then: edit /etc/nodemesh/agent.yaml,
#                                      #       systemctl enable --now nodemesh-agent
#
# What it does, in order:
#   1. the Debian packages the agent needs at run time (BCC, bpftool, iproute2),
#      unless NODEMESH_SKIP_APT=1 (the caller has installed them);
#   2. a virtualenv at /opt/nodemesh/venv (Debian's python3, Debian's BCC made
#      importable in it) with this checkout installed into it (not editable),
#      its data path's hot modules compiled (scripts/build_native.py: gcc,
#      python3-dev, mypy and Cython; NODEMESH_NATIVE=0 installs pure Python);
#   3. /etc/nodemesh/agent.yaml from deploy/agent.yaml.in, only if there is none:
#      an existing configuration is never overwritten;
#   4. the units deploy/nodemesh-agent.service and deploy/nodemesh-ca.service (the CA
#      service, for the one host that holds the CA) into /etc/systemd/system,
#      then `systemctl daemon-reload` — only when systemd is the running init
#      (/run/systemd/system exists). In a container or CI job without systemd it says
#      so and goes on. It never enables or starts the unit: that is the operator's step
#      (or scripts/provision/node.sh's, on a VM).
#
# DESTDIR=/some/dir installs below that directory instead of / (packaging, tests):
# nothing outside it is written, systemctl is not called. The unit keeps its
# /opt/nodemesh and /etc/nodemesh paths, as a package's would.
# Configuration template values: NODEMESH_NODE (default: short hostname),
# NODEMESH_NODE_IP (the node's address for HBONE and metrics; default 127.0.0.1,
# edit before starting), NODEMESH_POD_GATEWAY (the proxy address pods reach;
# default 10.244.0.1).
set -euo pipefail

say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0"
[ -z "$DESTDIR" ] || [ "${DESTDIR:0:1}" = / ] || die "DESTDIR must be an absolute path, got '$DESTDIR'"

OPT=$DESTDIR/opt/nodemesh
VENV=$OPT/venv
ETC=$DESTDIR/etc/nodemesh
UNIT_DIR=$DESTDIR/etc/systemd/system
PY=/usr/bin/python3

# 1. Run-time packages.
RUNTIME_PACKAGES=(python3 python3-venv python3-bpfcc bpftool iproute2)
[ "${NODEMESH_NATIVE:-1}" = "0" ] || RUNTIME_PACKAGES+=(gcc python3-dev)  # (to compile the hot modules)
if [ "${NODEMESH_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${RUNTIME_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "install these packages first: ${missing[*]}"
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "nodemesh needs Python >= 3.11 ($PY is $("$PY" -V))"

# 2. The virtualenv. Reinstalled when the checkout's version of the code changed.
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$OPT"
  "$PY" -m venv "$VENV"
  say "created $VENV"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BCC_DIR=$("$PY" -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null) \
  || die "Debian's BCC is not importable by $PY: apt-get install python3-bpfcc"
ln -sfn "$BCC_DIR" "$SITE/bcc"
STAMP=$VENV/.nodemesh-source
WANT=$(cd "$ROOT" && find pyproject.toml agent bpf netns -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name '*.toml' \) \
  -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  say "installing nodemesh into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$ROOT"
  printf '%s\n' "$WANT" > "$STAMP"
else
  say "nodemesh in $VENV is up to date"
fi
if [ "${NODEMESH_NATIVE:-1}" = "0" ]; then
  "$VENV/bin/python" "$ROOT/scripts/build_native.py" --root "$SITE" --clean >/dev/null
  say "NODEMESH_NATIVE=0: the data path runs as pure Python"
else
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "mypy>=1.10" "cython>=3.0" setuptools \
    types-PyYAML types-psutil
  NLOG=$(mktemp)
  if "$VENV/bin/python" "$ROOT/scripts/build_native.py" --root "$SITE" >"$NLOG" 2>&1; then
    tail -n 1 "$NLOG" | sed 's/^/install: /'
    rm -f "$NLOG"
  else
    cat "$NLOG" >&2
    rm -f "$NLOG"
    die "compiling the hot modules failed (output above); NODEMESH_NATIVE=0 $0 installs pure Python"
  fi
fi
install -m 0644 "$ROOT/README.md" "$OPT/README.md"
"$VENV/bin/nodemesh" --version >/dev/null || die "$VENV/bin/nodemesh does not run"

# 3. Configuration: written once, never overwritten.
install -d -m 0755 "$ETC"
if [ -e "$ETC/agent.yaml" ]; then
  say "keeping the existing $ETC/agent.yaml"
else
  node=${NODEMESH_NODE:-$(hostname -s)}
  sed -e "s|@NODE@|$node|g" \
      -e "s|@NODE_IP@|${NODEMESH_NODE_IP:-127.0.0.1}|g" \
      -e "s|@POD_GATEWAY@|${NODEMESH_POD_GATEWAY:-10.244.0.1}|g" \
      "$ROOT/deploy/agent.yaml.in" > "$ETC/agent.yaml.new"
  chmod 0644 "$ETC/agent.yaml.new"
  "$VENV/bin/nodemesh" agent --check-config -c "$ETC/agent.yaml.new" >/dev/null \
    || die "the configuration rendered from deploy/agent.yaml.in is not valid (see above)"
  mv "$ETC/agent.yaml.new" "$ETC/agent.yaml"
  say "wrote $ETC/agent.yaml (node $node): check addresses and registry before starting"
fi

# 4. The unit.
install -d -m 0755 "$UNIT_DIR"
install -m 0644 "$ROOT/deploy/nodemesh-agent.service" "$UNIT_DIR/nodemesh-agent.service"
install -m 0644 "$ROOT/deploy/nodemesh-ca.service" "$UNIT_DIR/nodemesh-ca.service"
say "installed $UNIT_DIR/nodemesh-agent.service and nodemesh-ca.service (the CA: one host only)"
if [ -n "$DESTDIR" ]; then
  say "DESTDIR install: not calling systemctl"
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  say "systemd reloaded; start with: systemctl enable --now nodemesh-agent"
else
  say "systemd is not the running init here (container or CI?): skipped daemon-reload; the unit is in place for the next boot"
fi
