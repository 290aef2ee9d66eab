#!/usr/bin/env bash
# scripts/setup.sh — make this machine ready to run nodemesh (root, idempotent).
#
# What it does, in order, each step skipped when already done:
#   1. checks: root, Linux, a kernel with BPF syscall support;
#   2. installs the Debian packages the project needs (one apt-get call);
#   3. kernel headers for BCC: the package matching `uname -r` when Debian has one,
#      otherwise the distribution's generic headers linked as
#      /lib/modules/$(uname -r)/build (the UAPI our cgroup hooks use is stable);
#   4. mounts bpffs at /sys/fs/bpf if it is not mounted;
#   5. finds the cgroup v2 mount (unified or hybrid) and records it;
#   6. creates .venv (Debian's python3), makes Debian's BCC importable from it,
#      installs the project with its test and bench extras;
#   7. compiles the data path's synchronous hot modules with mypyc
#      (scripts/build_native.py; NODEMESH_NATIVE=0 skips it: pure Python).
# A second run with nothing to do finishes in a few seconds.
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(uname -s)" = "Linux" ] || die "nodemesh needs Linux (this is $(uname -s))."
[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages, mounts bpffs and writes cgroups): sudo $0"
# Kernel config: /proc/config.gz or /boot/config-$(uname -r); NODEMESH_KCONFIG
# points elsewhere (the tests use it to show the refusal on a kernel without BPF).
KCONFIG=${NODEMESH_KCONFIG:-}
if [ -z "$KCONFIG" ]; then
  for c in /proc/config.gz "/boot/config-$(uname -r)"; do [ -r "$c" ] && { KCONFIG=$c; break; }; done
fi
if [ -n "$KCONFIG" ] && ! zgrep -q '^CONFIG_BPF_SYSCALL=y' "$KCONFIG"; then
  die "this kernel ($(uname -r)) was built without CONFIG_BPF_SYSCALL, and nodemesh needs a kernel with BPF."
fi
command -v apt-get >/dev/null || die "this script installs Debian packages with apt-get; on another distribution, install the equivalents of the PACKAGES list in $0 by hand."

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KREL=$(uname -r)

# Debian packages. Runtime: BCC (python3-bpfcc), bpftool, iproute2 (tc for strict
# inbound), kernel headers. Tests and demo: real clients and servers. Ops checks:
# gcc and Python's headers: mypyc's C (scripts/build_native.py). systemd-analyze (unit), Prometheus + promtool (scrape test), vagrant (validate),
# headless Chromium + chromedriver (the dashboard's browser test, driven by selenium).
PACKAGES=(
  python3 python3-venv python3-bpfcc bpftool iproute2 procps
  gcc python3-dev
  curl dnsutils tcpdump socat
  haproxy nginx-light wrk iperf3 nghttp2-client
  etcd-server etcd-client
  systemd prometheus vagrant
  chromium chromium-driver
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# Kernel headers: exact match if Debian has it, else the generic meta package.
HEADERS_PKG="linux-headers-$KREL"
if [ -e "/lib/modules/$KREL/build/include/linux/kconfig.h" ] || [ -e "/lib/modules/$KREL/build/include/generated/autoconf.h" ]; then
  HEADERS_PKG=""
else
  if ! dpkg-query -W -f='${Status}' "$HEADERS_PKG" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("__headers__")
  fi
fi

if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]/__headers__/kernel headers}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if [[ " ${missing[*]} " == *" __headers__ "* ]]; then
    missing=("${missing[@]/__headers__/}")
    if apt-cache show "$HEADERS_PKG" >/dev/null 2>&1; then
      missing+=("$HEADERS_PKG")
    else
      say "Debian has no $HEADERS_PKG for this kernel; installing the distribution's generic headers (linux-headers-amd64) instead"
      missing+=("linux-headers-$(dpkg --print-architecture)")
      HEADERS_PKG=""
    fi
  fi
  # shellcheck disable=SC2068
  apt-get install -y -qq --no-install-recommends ${missing[@]} >/dev/null
else
  say "Debian packages already installed"
fi

# Wire generic headers where BCC looks for them (/lib/modules/$KREL/{build,source}).
if [ ! -e "/lib/modules/$KREL/build/include/generated/autoconf.h" ]; then
  generic=$(ls -d /lib/modules/*/build 2>/dev/null | grep -v "^/lib/modules/$KREL/" | sort -V | tail -n 1 || true)
  [ -n "$generic" ] || die "no kernel headers under /lib/modules; install linux-headers-$(dpkg --print-architecture) and run again."
  gdir=$(dirname "$generic")
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$(readlink -f "$gdir/build")" "/lib/modules/$KREL/build"
  [ -e "$gdir/source" ] && ln -sfn "$(readlink -f "$gdir/source")" "/lib/modules/$KREL/source"
  say "kernel $KREL has no matching headers package: linked /lib/modules/$KREL/build -> $(readlink -f "$gdir/build") (the distribution's generic headers; the cgroup and sock_ops UAPI nodemesh uses is stable across these versions)"
else
  say "kernel headers in place: /lib/modules/$KREL/build -> $(readlink -f "/lib/modules/$KREL/build")"
fi

# bpffs.
if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpffs /sys/fs/bpf
  say "mounted bpffs at /sys/fs/bpf"
fi

# cgroup v2 mount: unified (/sys/fs/cgroup) or hybrid (/sys/fs/cgroup/unified).
CGROUP2=$(awk '$3 == "cgroup2" {print $2; exit}' /proc/mounts)
[ -n "$CGROUP2" ] || die "no cgroup v2 hierarchy is mounted; nodemesh attaches its eBPF programs to cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified)."
mkdir -p /run/nodemesh
printf '%s\n' "$CGROUP2" > /run/nodemesh/cgroup2
say "cgroup v2 at $CGROUP2"

# Virtualenv with Debian's python3 (3.11 on bookworm) and Debian's BCC.
PY=/usr/bin/python3
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "nodemesh needs Python >= 3.11 ($PY is $("$PY" -V))"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  say "created $VENV"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BCC_DIR=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))')
ln -sfn "$BCC_DIR" "$SITE/bcc"
"$VENV/bin/python" -c 'import bcc' || die "BCC from python3-bpfcc is not importable from $VENV"

# Reinstall only when pyproject.toml (dependencies) changed since the last install.
STAMP="$VENV/.nodemesh-installed"
WANT=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  say "installing nodemesh and its test and bench extras into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,bench]"
  printf '%s\n' "$WANT" > "$STAMP"
else
  say "nodemesh already installed in $VENV"
fi
if [ "${NODEMESH_NATIVE:-1}" = "0" ]; then
  "$VENV/bin/python" "$ROOT/scripts/build_native.py" --clean >/dev/null
  say "NODEMESH_NATIVE=0: the data path runs as pure Python"
else
  # compiled once per change of its sources (about 40 s); a failed build leaves pure Python
  NLOG=$(mktemp)
  if "$VENV/bin/python" "$ROOT/scripts/build_native.py" >"$NLOG" 2>&1; then
    tail -n 1 "$NLOG" | sed 's/^/setup: /'
    rm -f "$NLOG"
  else
    cat "$NLOG" >&2
    rm -f "$NLOG"
    die "scripts/build_native.py failed (output above); NODEMESH_NATIVE=0 $0 sets up pure Python"
  fi
fi
say "ready: $VENV/bin/nodemesh"
