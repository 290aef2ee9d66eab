"""The `nodemesh` command: a thin click shell over the packages.

Errors are turned into messages and exit codes in one place
(:mod:`agent.cli.errors`); every command that prints data has ``--output json``.
"""

from __future__ import annotations

import importlib

import click

# name -> (module, attribute). Commands are imported only when run (or listed by
# --help): `nodemesh apply` should not pay for pyroute2, BPF or the CA code.
_COMMANDS: dict[str, tuple[str, str]] = {
    "testbed": ("agent.cli.testbed", "testbed"),
    "check": ("agent.cli.check", "check"),
    "ca": ("agent.cli.ca", "ca"),
    "status": ("agent.cli.dataplane", "status"),
    "uninstall": ("agent.cli.dataplane", "uninstall"),
    "agent": ("agent.cli.agent_cmd", "agent_cmd"),
    "apply": ("agent.cli.registry", "apply_cmd"),
    "register": ("agent.cli.registry", "register"),
    "get": ("agent.cli.registry", "get"),
    "describe": ("agent.cli.registry", "describe"),
    "delete": ("agent.cli.registry", "delete"),
    "explain": ("agent.cli.explain", "explain_cmd"),
    "dashboard": ("agent.cli.dashboard", "dashboard_cmd"),
    "top": ("agent.cli.dashboard", "top_cmd"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = _COMMANDS.get(cmd_name)
        if spec is None:
            return None
        cmd = getattr(importlib.import_module(spec[0]), spec[1])
        assert isinstance(cmd, click.Command)
        return cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nodemesh")
def cli() -> None:
    """nodemesh: a sidecarless service mesh for Linux hosts."""


def main() -> None:
    cli(prog_name="nodemesh")


if __name__ == "__main__":
    main()
