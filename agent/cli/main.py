"""The `nodemesh` command: a thin click shell over the packages.

Errors are turned into messages and exit codes in one place
(:mod:`agent.cli.errors`); every command that prints data has ``--output json``.
"""

from __future__ import annotations

import click

from agent.cli.agent_cmd import agent_cmd
from agent.cli.ca import ca
from agent.cli.check import check
from agent.cli.dataplane import status, uninstall
from agent.cli.registry import apply_cmd, delete, describe, get, register
from agent.cli.testbed import testbed


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nodemesh")
def cli() -> None:
    """nodemesh: a sidecarless service mesh for Linux hosts."""


cli.add_command(testbed)
cli.add_command(check)
cli.add_command(ca)
cli.add_command(status)
cli.add_command(uninstall)
cli.add_command(agent_cmd)
cli.add_command(apply_cmd)
cli.add_command(register)
cli.add_command(get)
cli.add_command(describe)
cli.add_command(delete)


def main() -> None:
    cli(prog_name="nodemesh")


if __name__ == "__main__":
    main()
