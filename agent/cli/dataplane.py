"""`nodemesh status` and `nodemesh uninstall`: the eBPF data path as pinned in bpffs.

For now status reads the pinned state directly (a later issue asks the
running agent instead). The data path is "in place" when every hook's link is
pinned and the kernel lists its program on the cgroup it points at.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from agent.cli.errors import (
    EXIT_CHECK_FAILED,
    EXIT_NOT_FOUND,
    handled,
    require_root,
)
from agent.cli.output import OUTPUT_OPTION, emit_json, table
from bpf import loader
from bpf.config import DEFAULT_BPFFS_ROOT
from bpf.errors import NotInstalledError
from bpf.maps import datapath_status

BPFFS_OPTION = click.option(
    "--bpffs-root",
    default=DEFAULT_BPFFS_ROOT,
    show_default=True,
    help="bpffs directory holding the pinned data path versions",
)


def _datapath_status(bpffs_root: str, output: str) -> None:
    require_root()
    try:
        doc = datapath_status(bpffs_root)
    except NotInstalledError as e:
        if output == "json":
            emit_json({"ok": False, "bpffs_root": bpffs_root, "error": e.message})
        else:
            click.echo(f"data path: NOT INSTALLED ({e.message})")
            if e.hint:
                click.echo(f"hint: {e.hint}")
        sys.exit(EXIT_CHECK_FAILED)
    if output == "json":
        emit_json(doc)
    else:
        _print_datapath(doc)
    if not doc["ok"]:
        sys.exit(EXIT_CHECK_FAILED)


def _print_datapath(doc: dict[str, Any]) -> None:
    click.echo(f"data path: {'ok' if doc['ok'] else 'NOT IN PLACE'}  ({doc['pin_dir']})")
    click.echo(
        table(
            ["HOOK", "ATTACHED", "CGROUP", "PROG", "PROGS ON CGROUP"],
            [
                [
                    h["hook"],
                    "yes" if h["attached"] else "NO",
                    h["cgroup"] or "-",
                    h["prog_id"],
                    h["programs_on_cgroup"],
                ]
                for h in doc["hooks"]
            ],
        )
    )
    click.echo(f"\nenrolled netns: {doc['enrolled']}\n")
    click.echo(
        table(
            ["MAP", "ENTRIES", "MAX"], [[n, m["entries"], m["max_entries"]] for n, m in doc["maps"].items()]
        )
    )
    click.echo("")
    click.echo(table(["COUNTER", "VALUE"], sorted(doc["counters"].items())))


def fetch_json(host: str, port: int, netns: str | None, path: str, timeout_s: float = 5.0) -> Any:
    """GET ``path`` (JSON) from an agent (inside ``netns`` if given, e.g. a testbed node)."""
    import json

    from netns import kernel

    with kernel.connect_tcp(host, port, timeout_s, netns) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        first = head.split(b"\r\n")[0]
        raise click.ClickException(f"agent at {host}:{port} answered {first!r} to {path}")
    return json.loads(body)


def fetch_status(host: str, port: int, netns: str | None, timeout_s: float = 5.0) -> dict[str, Any]:
    """GET /status from an agent (inside ``netns`` if given, e.g. a testbed node)."""
    doc: dict[str, Any] = fetch_json(host, port, netns, "/status", timeout_s)
    return doc


def agent_address(admin: str, node: str | None) -> tuple[str, int]:
    """Where to ask an agent: ``--node HOST[:PORT]`` (its health port, 15021 by default), else the
    local admin API ``--admin HOST:PORT``."""
    if node:
        host, _, port_s = node.rpartition(":") if node.count(":") == 1 else (node, "", "")
        return (host, int(port_s)) if port_s else (node, 15021)
    host, _, port_s = admin.rpartition(":")
    return host, int(port_s)


ADMIN_OPTION = click.option(
    "--admin", "admin", default="127.0.0.1:15000", show_default=True, help="the local agent's admin API"
)
NODE_OPTION = click.option(
    "--node", default=None, help="a remote node's address: asks its health port (15021) instead"
)
NETNS_OPTION = click.option(
    "--netns", default=None, help="ask from inside this network namespace (e.g. a testbed node)"
)


def _print_agent(doc: dict[str, Any]) -> None:
    ok = "ok" if doc["ok"] else "DEGRADED"
    click.echo(
        f"agent {doc['node']}: {ok}  (pid {doc['pid']}, up {doc['uptime_s']}s"
        f"{', draining' if doc['draining'] else ''})"
    )
    ic = doc["interception"]
    if "hooks" in ic:
        hooks = ic["hooks"]
        attached = sum(1 for h in hooks if h["attached"])
        click.echo(
            f"  interception: {'ok' if ic['ok'] else 'NOT IN PLACE'}  {attached}/{len(hooks)} hooks on "
            f"{hooks[0]['cgroup'] if hooks else '-'}, {ic['enrolled']} pods enrolled, "
            f"captured {ic['counters'].get('captured', 0)}"
            + (f"; host cgroups: {', '.join(ic['host_cgroups'])}" if ic.get("host_cgroups") else "")
        )
    else:
        click.echo(f"  interception: NOT IN PLACE ({ic.get('error', '')})")
    r = doc["registry"]
    stale = f"STALE for {r['stale_for_s']}s: {r['last_error']}" if r["stale"] else "current"
    click.echo(f"  registry: {r['backend']} {r['location']} revision {r['revision']}, {stale}")
    click.echo("  listeners: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["listeners"].items())))
    for problem in doc.get("degraded", []):
        click.echo(f"  DEGRADED: {problem}")
    p = doc["proxy"]
    click.echo(f"  proxy: {p['workloads_on_node']} local workloads, {p['tunnel_connections']} pooled tunnels"
               + (f", outbound {p['outbound_traffic_policy']}, {p['service_entry_hosts']} ServiceEntry hosts"
                  if "outbound_traffic_policy" in p else ""))
    if doc["certificates"]:
        click.echo(
            table(
                ["CERTIFICATE", "EXPIRES IN", "RENEW AT"],
                [[c["spiffe_id"], f"{c['expires_in_s']}s", c["renew_at"]] for c in doc["certificates"]],
            )
        )
    for rl in doc.get("rate_limits", []):
        rate = f"{rl['local_per_s']:g}/s of {rl['total_per_s']:g}/s" if "total_per_s" in rl else "-"
        peers = ", ".join(f"{n} {s}" for n, s in rl.get("peers", {}).items())
        route = f", route {rl['route']}" if rl.get("route") else ""
        click.echo(f"  rate limit {rl['policy']} ({rl['scope']}{route}): {rate}, share {rl['share']:g}, "
                   f"admitted {rl['admitted']}, limited {rl['limited']}"
                   + (f", sharing {rl['sharing']}" if "sharing" in rl else "")
                   + (f" [{peers}]" if peers else ""))
        if "fallback" in rl:
            click.echo(f"    FALLBACK: {rl['fallback']}")
    pa = doc.get("peer_authentication", {})
    for ns, err in pa.get("errors", {}).items():
        click.echo(f"  peer authentication NOT ENFORCED for {ns}: {err}")
    if doc["config"]["restart_needed"]:
        click.echo(f"  config: changed keys need a restart: {', '.join(doc['config']['restart_needed'])}")


@click.command()
@ADMIN_OPTION
@NODE_OPTION
@NETNS_OPTION
@click.option("--bpffs-root", default=None, help="show only the eBPF data path pinned here (no agent needed)")
@OUTPUT_OPTION
@handled
def status(admin: str, node: str | None, netns: str | None, bpffs_root: str | None, output: str) -> None:
    """Is the mesh working on this node? Interception, registry, certificates, listeners.

    Exit codes: 0 healthy; 1 degraded (data path not in place, registry stale,
    certificate expired, a listener that cannot accept, not ready); 3 no agent answered.
    """
    if bpffs_root is not None:
        _datapath_status(bpffs_root, output)
        return
    host, port = agent_address(admin, node)
    try:
        doc = fetch_status(host, port, netns)
    except (OSError, ValueError) as e:
        if output == "json":
            emit_json({"ok": False, "error": f"no agent answered at {host}:{port}: {e}"})
        else:
            click.echo(f"agent: NOT REACHABLE at {host}:{port} ({e})")
            click.echo(
                "hint: is it running? systemctl status nodemesh-agent; "
                "for the data path alone: nodemesh status --bpffs-root /sys/fs/bpf/nodemesh"
            )
        sys.exit(EXIT_NOT_FOUND)
    if output == "json":
        emit_json(doc)
    else:
        _print_agent(doc)
    if not doc["ok"]:
        sys.exit(EXIT_CHECK_FAILED)


@click.command()
@BPFFS_OPTION
@OUTPUT_OPTION
@handled
def uninstall(bpffs_root: str, output: str) -> None:
    """Detach every nodemesh program and remove its pins (running pods are released)."""
    require_root()
    removed = loader.uninstall(bpffs_root)
    if output == "json":
        emit_json({"bpffs_root": bpffs_root, "removed": removed})
    else:
        click.echo(
            f"removed {len(removed)} pins under {bpffs_root}"
            if removed
            else f"nothing pinned under {bpffs_root}"
        )
