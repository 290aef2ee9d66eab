"""`nodemesh agent`: run the node agent in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import click

from agent import config as config_mod
from agent.cli.errors import handled


@click.command(name="agent")
@click.option(
    "--config",
    "-c",
    "config_path",
    default="/etc/nodemesh/agent.yaml",
    show_default=True,
    envvar="NODEMESH_CONFIG",
    help="agent configuration file (YAML)",
)
@click.option("--check-config", is_flag=True, help="validate the configuration and exit")
@click.option(
    "--no-interception",
    is_flag=True,
    hidden=True,
    help="serve without eBPF interception (tests of the proxy alone)",
)
@click.option(
    "--successor",
    is_flag=True,
    help="restart without refusing a connection: start a new agent in the background that takes "
    "the running agent's sockets over; return once it serves (systemd's ExecReload runs this)",
)
@handled
def agent_cmd(config_path: str, check_config: bool, no_interception: bool, successor: bool) -> None:
    """Run the node agent: interception, registry, identity, proxy, DNS, metrics."""
    from agent import lifecycle

    cfg = config_mod.load(config_path)
    if check_config:
        click.echo(f"{config_path}: ok (node {cfg.node})")
        return
    if successor:
        pid = lifecycle.spawn_successor(config_path, with_interception=not no_interception)
        click.echo(f"a new agent (pid {pid}) serves node {cfg.node}; the previous one drains and exits")
        return
    lifecycle.run(cfg, config_path=config_path, with_interception=not no_interception)
