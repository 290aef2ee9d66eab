"""`nodemesh testbed …`: nodes and pods as network namespaces on this host."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
import yaml

from agent.cli.errors import UserError, handled, require_root
from agent.cli.output import OUTPUT_OPTION, emit_json, table
from netns import testbed as tb
from netns import topology
from netns.errors import TopologyError

PREFIX_OPTION = click.option(
    "--prefix",
    "-p",
    default=None,
    envvar="NODEMESH_TESTBED_PREFIX",
    help=f"name prefix of the testbed's namespaces, links and cgroups [default: {topology.DEFAULT_PREFIX}]",
)


def _load_spec_file(path: str) -> topology.TopologySpec:
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    return topology.spec_from_mapping(doc, source=path)


@click.group()
def testbed() -> None:
    """A single-host testbed: nodes and pods as network namespaces."""


@testbed.command()
@click.option("--nodes", "-n", type=click.IntRange(1, 250), default=2, show_default=True)
@click.option("--pods-per-node", "-m", type=click.IntRange(0, 253), default=2, show_default=True)
@click.option(
    "--file",
    "-f",
    "spec_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="topology YAML (nodes with names, pod CIDRs and pods) instead of --nodes/--pods-per-node",
)
@PREFIX_OPTION
@handled
def up(nodes: int, pods_per_node: int, spec_file: str | None, prefix: str | None) -> None:
    """Create the testbed (nothing is created if the topology is invalid)."""
    if spec_file:
        spec = _load_spec_file(spec_file)
        if prefix:
            spec = topology.TopologySpec(prefix=prefix, nodes=spec.nodes, fabric_cidr=spec.fabric_cidr)
    else:
        spec = topology.default_spec(prefix or topology.DEFAULT_PREFIX, nodes, pods_per_node)
    try:
        topo = topology.plan(spec)  # validates before anything exists
    except TopologyError as e:
        raise e.located(spec_file) if spec_file else e from None
    require_root()
    t0 = time.monotonic()
    tb.up(topo)
    took = time.monotonic() - t0
    n_pods = len(topo.pods())
    click.echo(f"testbed {topo.prefix!r} up: {len(topo.nodes)} nodes, {n_pods} pods in {took:.2f}s")
    click.echo(f"  try: nodemesh testbed status --prefix {topo.prefix}")


@testbed.command()
@PREFIX_OPTION
@OUTPUT_OPTION
@handled
def status(prefix: str | None, output: str) -> None:
    """Nodes and pods of the testbed, as the kernel shows them."""
    topo = tb.load(prefix or topology.DEFAULT_PREFIX)
    st = tb.status(topo)
    if output == "json":
        emit_json(st)
        return
    rows: list[list[Any]] = []
    for n in st["nodes"]:
        rows.append(
            [
                n["name"],
                "node",
                n["fabric_address"],
                n["pod_cidr"],
                n["netns"],
                "ok" if n["netns_present"] else "MISSING",
            ]
        )
        for p in n["pods"]:
            rows.append(
                [
                    p["name"],
                    f"pod on {n['name']}",
                    p["address"],
                    "",
                    p["netns"],
                    "ok" if p["netns_present"] else "MISSING",
                ]
            )
    click.echo(f"testbed {st['prefix']} (fabric {st['fabric_cidr']})")
    click.echo(table(["NAME", "KIND", "ADDRESS", "POD CIDR", "NETNS", "STATE"], rows))


@testbed.command(name="exec", context_settings={"ignore_unknown_options": True})
@PREFIX_OPTION
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handled
def exec_(prefix: str | None, pod: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in POD's network namespace and cgroup: testbed exec POD -- CMD…"""
    require_root()
    p = tb.pod_of(prefix or topology.DEFAULT_PREFIX, pod)
    proc = tb.popen_in_pod(p, command)
    try:
        sys.exit(proc.wait())
    except KeyboardInterrupt:
        proc.terminate()
        sys.exit(proc.wait())


@testbed.command()
@PREFIX_OPTION
@click.option("--all", "all_", is_flag=True, help="every testbed recorded on this host")
@handled
def down(prefix: str | None, all_: bool) -> None:
    """Remove the testbed: processes in its pods, namespaces, cgroups (also leftovers of a crash)."""
    require_root()
    prefixes = tb.list_testbeds() if all_ else [prefix or topology.DEFAULT_PREFIX]
    for p in prefixes:
        t0 = time.monotonic()
        rep = tb.down(p)
        took = time.monotonic() - t0
        if not (rep.netns_removed or rep.cgroup_removed or rep.state_removed):
            click.echo(f"testbed {p!r}: nothing to remove")
        else:
            click.echo(
                f"testbed {p!r} down: removed {len(rep.netns_removed)} namespaces"
                f"{', its cgroups' if rep.cgroup_removed else ''} in {took:.2f}s"
            )
