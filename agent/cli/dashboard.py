"""`nodemesh dashboard` (a local web UI) and `nodemesh top` (the same numbers in a terminal).

Both read every agent's /metrics and /status (or a Prometheus server) through
:mod:`agent.dashboard.scrape`; the numbers come from :mod:`agent.dashboard.model`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from agent.cli.errors import EXIT_NOT_FOUND, UserError, handled
from agent.cli.output import OUTPUT_OPTION, emit_json, table

SORT_KEYS = ("rps", "success", "p50_ms", "p99_ms", "source", "destination", "service", "bytes_per_s")


def _source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--agent", "agents", multiple=True, metavar="HOST[:PORT]|http://HOST:PORT",
                     help="an agent to read (repeat for every node): metrics on PORT (default 15020), "
                     "status on --status-port; http://HOST:PORT serves both"),
        click.option("--testbed", "testbed", default=None, metavar="PREFIX",
                     help="read every node of this nodemesh testbed, from inside its netns (root)"),
        click.option("--prometheus", default=None, metavar="URL",
                     help="read the agents' series from this Prometheus server instead"),
        click.option("--admin", default="127.0.0.1:15000", show_default=True, metavar="HOST:PORT",
                     help="with no --agent, --testbed or --prometheus: this node's agent, whose "
                     "config names its peers (every node is read at its peer address)"),
        click.option("--netns", default=None, help="read from inside this network namespace"),
        click.option("--metrics-port", default=15020, show_default=True, type=click.IntRange(1, 65535)),
        click.option("--status-port", default=15021, show_default=True, type=click.IntRange(1, 65535),
                     help="the agents' health port, which serves /status"),
        click.option("--timeout", "timeout_s", default=2.0, show_default=True, type=click.FloatRange(0.1, 30),
                     help="seconds an agent has to answer; after that it shows as down"),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _poller(agents: tuple[str, ...], testbed: str | None, prometheus: str | None, admin: str,
            netns: str | None, metrics_port: int, status_port: int, timeout_s: float,
            refresh_s: float) -> Any:
    from agent.dashboard.scrape import Poller, TargetError, discover, parse_target, testbed_targets
    from agent.dashboard.state import MeshState

    try:
        targets = [parse_target(a, metrics_port, status_port, netns) for a in agents]
        if testbed:
            targets += testbed_targets(testbed, metrics_port, status_port)
        if not targets and not prometheus:
            try:
                targets = discover(admin, netns, timeout_s)
            except TargetError as e:
                raise UserError(
                    f"nothing to read: {e}", code=EXIT_NOT_FOUND,
                    hint="run it on a node with an agent, or name the agents: --agent NODE_ADDRESS "
                    "(once per node), --testbed PREFIX, or --prometheus http://PROMETHEUS:9090",
                ) from None
        names = [t.name for t in targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"agent named twice: {', '.join(dupes)}")
        return Poller(MeshState(refresh_s), targets, prometheus, timeout_s)
    except TargetError as e:
        raise UserError(str(e)) from None


@click.command("dashboard")
@_source_options
@click.option("--host", default="127.0.0.1", show_default=True, help="address to serve the UI on")
@click.option("--port", default=15100, show_default=True, type=click.IntRange(0, 65535))
@click.option("--refresh", "refresh_s", default=2.0, show_default=True, type=click.FloatRange(0.5, 60),
              help="seconds between reads of the agents (and page updates)")
@handled
def dashboard_cmd(agents: tuple[str, ...], testbed: str | None, prometheus: str | None, admin: str,
                  netns: str | None, metrics_port: int, status_port: int, timeout_s: float, host: str,
                  port: int, refresh_s: float) -> None:
    """A local web UI of the mesh: service graph, golden signals, each node's agent.

    Serves on 127.0.0.1 unless --host says otherwise (it shows workload names and
    certificate expiry: keep it off public addresses). Stops on Ctrl-C.
    """
    from agent.dashboard.server import Dashboard

    poller = _poller(agents, testbed, prometheus, admin, netns, metrics_port, status_port, timeout_s,
                     refresh_s)
    try:
        dash = Dashboard(poller, refresh_s, host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}", code=4,
                        hint="pick another --port") from None
    h, p = dash.address
    if not ipaddress.ip_address(h).is_loopback:
        click.echo(f"warning: serving on {h}, not loopback: anyone who reaches it sees the mesh "
                   "(no login)", err=True)
    click.echo(f"nodemesh dashboard on http://{'[' + h + ']' if ':' in h else h}:{p}/ "
               f"({len(poller.targets) or 'Prometheus'} agents, refresh {refresh_s:g} s); Ctrl-C stops",
               err=True)
    with contextlib.suppress(KeyboardInterrupt):
        dash.serve_forever()


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}ms" if x < 10 else f"{x:.1f}ms"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def _top_table(view: dict[str, Any], sort: str) -> str:
    from agent.dashboard.model import sort_rows

    down = [n for n in view["nodes"] if not n["up"]]
    lines = [f"{len(view['nodes'])} agents" + (
        "; DOWN: " + ", ".join(f"{n['name']} ({n['error']})" for n in down) if down else ", all answering")]
    rows = [
        [r["source"], r["service"], r["destination"], "+".join(r["protocols"]),
         "-" if r["protocols"] == ["tcp"] else f"{r['rps']:.2f}", _pct(r["success"]),
         _ms(r["p50_ms"]), _ms(r["p90_ms"]), _ms(r["p99_ms"]),
         "-" if r["mtls"] is None else ("yes" if r["mtls"] >= 0.9995 else "no" if r["mtls"] <= 0.0005
                                        else f"{r['mtls'] * 100:.0f}%"),
         f"{r['bytes_per_s']:.0f}" if "tcp" in r["protocols"] else "-"]
        for r in sort_rows(view["top"], sort)
    ]
    lines.append(table(["SOURCE", "SERVICE", "DESTINATION", "PROTO", "RPS", "SUCCESS", "P50", "P90", "P99",
                        "MTLS", "TCP B/S"], rows) if rows else "no traffic in the window")
    return "\n".join(lines)


@click.command("top")
@_source_options
@click.option("--interval", "interval_s", default=2.0, show_default=True, type=click.FloatRange(0.2, 60),
              help="seconds between reads; rates are over the last interval")
@click.option("--sort", default="rps", show_default=True, type=click.Choice(SORT_KEYS))
@click.option("--once", is_flag=True, help="read twice, --interval apart, print once and exit")
@OUTPUT_OPTION
@handled
def top_cmd(agents: tuple[str, ...], testbed: str | None, prometheus: str | None, admin: str,
            netns: str | None, metrics_port: int, status_port: int, timeout_s: float, interval_s: float,
            sort: str, once: bool, output: str) -> None:
    """Live traffic per source -> destination: requests/s, success rate, latency (like `linkerd viz top`).

    Exit codes: 0 ok; 3 no agent answered (with --once).
    """
    from agent.dashboard.model import sort_rows

    poller = _poller(agents, testbed, prometheus, admin, netns, metrics_port, status_port, timeout_s,
                     interval_s)
    poller.round()
    while True:
        time.sleep(interval_s)  # (rates use the reads' own times, so a slow read skews nothing)
        view = poller.round()
        if output == "json":
            doc = {"at_s": view["at_s"], "interval_s": interval_s,
                   "agents": [{k: n[k] for k in ("name", "address", "up", "error")} for n in view["nodes"]],
                   "rows": sort_rows(view["top"], sort)}
            emit_json(doc)
        else:
            if not once:
                click.echo("\x1b[H\x1b[2J", nl=False)
            click.echo(_top_table(view, sort))
        if once:
            if not any(n["up"] for n in view["nodes"]):
                sys.exit(EXIT_NOT_FOUND)
            return
