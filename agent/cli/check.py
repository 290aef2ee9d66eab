"""`nodemesh check`: pre-flight checks of this host."""

from __future__ import annotations

import sys

import click

from agent import preflight
from agent.cli.errors import EXIT_CHECK_FAILED, handled
from agent.cli.output import OUTPUT_OPTION, emit_json


@click.command()
@OUTPUT_OPTION
@handled
def check(output: str) -> None:
    """Pre-flight: can this host run the mesh? (root, cgroup v2, bpffs, BPF hooks, BCC)."""
    results = preflight.run_all()
    if output == "json":
        emit_json([{"name": r.name, "ok": r.ok, "detail": r.detail, "hint": r.hint} for r in results])
    else:
        for r in results:
            mark = "ok  " if r.ok else "FAIL"
            click.echo(f"[{mark}] {r.name}: {r.detail}")
            if not r.ok and r.hint:
                click.echo(f"       hint: {r.hint}")
        failed = sum(not r.ok for r in results)
        click.echo(f"\n{len(results) - failed} ok, {failed} failed")
    if any(not r.ok for r in results):
        sys.exit(EXIT_CHECK_FAILED)
