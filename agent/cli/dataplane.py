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
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_NOT_FOUND,
    EXIT_SYSTEM,
    EXTRA_CODES,
    handled,
    require_root,
)
from agent.cli.output import OUTPUT_OPTION, emit_json, table
from bpf import loader, pins
from bpf.config import DEFAULT_BPFFS_ROOT
from bpf.errors import BpfConfigError, BpfError, NotInstalledError
from bpf.maps import Dataplane

EXTRA_CODES.setdefault(BpfConfigError, EXIT_BAD_INPUT)
EXTRA_CODES.setdefault(NotInstalledError, EXIT_NOT_FOUND)
EXTRA_CODES.setdefault(BpfError, EXIT_SYSTEM)

BPFFS_OPTION = click.option(
    "--bpffs-root", default=DEFAULT_BPFFS_ROOT, show_default=True,
    help="bpffs directory holding the pinned data path versions",
)


def collect(bpffs_root: str) -> dict[str, Any]:
    """The status document (raises NotInstalledError if nothing is pinned)."""
    pin_dir = pins.installed_dir(bpffs_root)
    hooks = pins.hook_states(pin_dir)
    with Dataplane(pin_dir) as dp:
        enrolled = len(dp.enrolled())
        fill = {name: {"entries": f.entries, "max_entries": f.max_entries}
                for name, f in dp.fill().items()}
        counters = dp.counters()
    counters.pop("lookup_miss", None)  # a proxy-side count: not known here
    return {
        "ok": all(h.attached for h in hooks),
        "bpffs_root": bpffs_root,
        "pin_dir": pin_dir,
        "hooks": [
            {"hook": h.hook, "attached": h.attached, "cgroup": h.cgroup, "prog_id": h.prog_id,
             "link_id": h.link_id, "programs_on_cgroup": h.programs_on_cgroup}
            for h in hooks
        ],
        "enrolled": enrolled,
        "maps": fill,
        "counters": counters,
    }


@click.command()
@BPFFS_OPTION
@OUTPUT_OPTION
@handled
def status(bpffs_root: str, output: str) -> None:
    """Is the data path in place? Hooks and where they are attached, maps, counters."""
    require_root()
    try:
        doc = collect(bpffs_root)
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
        click.echo(f"data path: {'ok' if doc['ok'] else 'NOT IN PLACE'}  ({doc['pin_dir']})")
        click.echo(table(
            ["HOOK", "ATTACHED", "CGROUP", "PROG", "PROGS ON CGROUP"],
            [[h["hook"], "yes" if h["attached"] else "NO", h["cgroup"] or "-", h["prog_id"],
              h["programs_on_cgroup"]] for h in doc["hooks"]],
        ))
        click.echo(f"\nenrolled netns: {doc['enrolled']}\n")
        click.echo(table(["MAP", "ENTRIES", "MAX"],
                         [[n, m["entries"], m["max_entries"]] for n, m in doc["maps"].items()]))
        click.echo("")
        click.echo(table(["COUNTER", "VALUE"], sorted(doc["counters"].items())))
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
        click.echo(f"removed {len(removed)} pins under {bpffs_root}" if removed
                   else f"nothing pinned under {bpffs_root}")
