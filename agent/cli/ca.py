"""`nodemesh ca`: create, inspect and rotate the mesh CA; issue node certs for the CA service."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import click

from agent.cli.errors import UserError, handled
from agent.cli.etcd_options import etcd_tls_options
from agent.cli.output import OUTPUT_OPTION, emit_json, table
from agent.identity.bundle import TrustBundle, write_atomic
from agent.identity.ca import BUNDLE_FILE, CERT_FILE, DEFAULT_NODE_TTL_S, KEY_FILE, MeshCA, load_bundle
from agent.identity.certs import CertFacts, facts, load_certs_pem, read_bytes
from agent.identity.errors import CaFileError, CaNotFoundError
from agent.identity.spiffe import NodeId

_DIR = click.Path(file_okay=False, dir_okay=True, path_type=str)
_EXISTING_DIR = click.Path(exists=True, file_okay=False, dir_okay=True, path_type=str)


def _now() -> datetime:
    return datetime.now(UTC)


def countdown(seconds: float) -> str:
    """'expired 3h ago' or 'in 9y 364d' (people read this, scripts use expires_in_s)."""
    s = abs(int(seconds))
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    years, days = divmod(days, 365)
    parts = [f"{years}y"] if years else []
    if days:
        parts.append(f"{days}d")
    if hours and not years:
        parts.append(f"{hours}h")
    if not parts:
        parts.append(f"{rem // 60}m")
    text = " ".join(parts)
    return f"in {text}" if seconds >= 0 else f"expired {text} ago"


def _show(rows: list[tuple[str, CertFacts]], output: str) -> None:
    if output == "json":
        emit_json([{"role": role, **f.to_doc()} for role, f in rows])
        return
    for i, (role, f) in enumerate(rows):
        if i:
            click.echo("")
        spiffe = f.uri_sans[0] if len(f.uri_sans) == 1 else (", ".join(f.uri_sans) or "-")
        click.echo(table(["field", "value"], [
            ("role", role),
            ("subject", f.subject),
            ("issuer", f.issuer),
            ("spiffe id" if len(f.uri_sans) <= 1 else "uri sans", spiffe),
            ("ca", "yes" if f.is_ca else "no"),
            ("not before", f.not_before.isoformat()),
            ("not after", f.not_after.isoformat()),
            ("expires", countdown(f.expires_in_s)),
            ("serial", f.serial_hex),
            ("sha256", f.sha256_fingerprint),
            ("spki sha256", f.spki_sha256_b64),
        ]))


@click.group()
def ca() -> None:
    """The mesh CA: root key (0600), trust bundle, node certs."""


@ca.command("init")
@click.option("--dir", "directory", required=True, type=_DIR, help="directory for ca.key, ca.crt, bundle.pem")
@click.option("--trust-domain", required=True, help="e.g. cluster.local")
@click.option("--force", is_flag=True, help="replace an existing CA (its certs stop verifying)")
@OUTPUT_OPTION
@handled
def init_cmd(directory: str, trust_domain: str, force: bool, output: str) -> None:
    """Create a mesh CA: ECDSA P-256 root, valid 10 years, key written 0600."""
    new = MeshCA.init(directory, trust_domain, now=_now(), force=force)
    f = facts(new.root, now=_now())
    if output == "json":
        emit_json({"dir": os.path.abspath(directory), "trust_domain": new.trust_domain, **f.to_doc()})
        return
    click.echo(f"created mesh CA for trust domain {new.trust_domain!r} in {directory}")
    click.echo(f"  key:    {os.path.join(directory, KEY_FILE)} (0600; keep it offline if you can)")
    click.echo(f"  root:   {os.path.join(directory, CERT_FILE)}, sha256 {f.sha256_fingerprint}")
    click.echo(f"  bundle: {os.path.join(directory, BUNDLE_FILE)} (give this to every node)")


@ca.command("inspect")
@click.option("--dir", "directory", type=_EXISTING_DIR, help="a CA directory: show its roots")
@click.option("--cert", "cert_file", type=click.Path(dir_okay=False, path_type=str),
              help="a PEM file: show every cert in it")
@OUTPUT_OPTION
@handled
def inspect_cmd(directory: str | None, cert_file: str | None, output: str) -> None:
    """Subject, SPIFFE ID, validity, expiry countdown and fingerprints (the key is not needed)."""
    if (directory is None) == (cert_file is None):
        raise UserError("expected exactly one of --dir or --cert",
                        hint="nodemesh ca inspect --dir /etc/nodemesh/ca")
    now = _now()
    rows: list[tuple[str, CertFacts]] = []
    if cert_file is not None:
        certs = load_certs_pem(read_bytes(cert_file, what="a PEM certificate"), source=cert_file)
        rows = [("cert", facts(c, now=now)) for c in certs]
    elif directory is not None:
        cert_path = os.path.join(directory, CERT_FILE)
        if not os.path.exists(cert_path):
            raise CaNotFoundError(cert_path, "expected the CA root cert, the file does not exist",
                                  hint="create one with: nodemesh ca init --dir DIR --trust-domain TD")
        current = load_certs_pem(read_bytes(cert_path, what="a PEM root cert"), source=cert_path)[0]
        bundle = load_bundle(directory, fallback=current)
        rows = [("current root", facts(current, now=now))]
        rows += [("bundle root", facts(r, now=now)) for r in bundle if r != current]
    _show(rows, output)


@ca.command("rotate")
@click.option("--dir", "directory", required=True, type=_EXISTING_DIR)
@OUTPUT_OPTION
@handled
def rotate_cmd(directory: str, output: str) -> None:
    """New root for new certs; the old root stays in bundle.pem until you drop it."""
    new = MeshCA.load(directory).rotate_on_disk(directory, now=_now())
    rows = [("bundle root", facts(r, now=_now())) for r in new.bundle]
    if output == "json":
        emit_json({"current": facts(new.root, now=_now()).to_doc(), "bundle": [f.to_doc() for _, f in rows]})
        return
    click.echo(f"new root sha256 {facts(new.root, now=_now()).sha256_fingerprint}; "
               f"bundle.pem now holds {len(new.bundle)} roots: distribute it to every node")


@ca.command("issue-node")
@click.option("--dir", "directory", required=True, type=_EXISTING_DIR, help="the CA directory")
@click.option("--node", "node_name", required=True, help="node name, as the registry knows it")
@click.option("--out", "out_dir", required=True, type=_DIR,
              help="where to write node.crt, node.key, bundle.pem")
@click.option("--ttl-days", type=click.IntRange(1, 366), default=DEFAULT_NODE_TTL_S // 86400,
              show_default=True)
@handled
def issue_node_cmd(directory: str, node_name: str, out_dir: str, ttl_days: int) -> None:
    """A node cert (spiffe://<td>/node/<name>) for a node agent to talk to the CA service."""
    mesh = MeshCA.load(directory)
    cert, key = mesh.issue_node(NodeId(mesh.trust_domain, node_name), now=_now(), ttl_s=ttl_days * 86400)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CaFileError(out_dir, "expected a directory, found a file")
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    write_atomic(os.path.join(out_dir, "node.key"), key, mode=0o600)
    write_atomic(os.path.join(out_dir, "node.crt"), cert, mode=0o644)
    TrustBundle(mesh.bundle.roots).save(os.path.join(out_dir, BUNDLE_FILE))
    click.echo(f"wrote node cert for {NodeId(mesh.trust_domain, node_name)} to {out_dir}")


@ca.command("serve")
@click.option("--dir", "directory", required=True, type=_EXISTING_DIR, help="the CA directory")
@click.option("--listen", default="0.0.0.0:15012", show_default=True, help="address:port to serve on")
@click.option("--registry-dir", default="/var/lib/nodemesh/registry", show_default=True,
              envvar="NODEMESH_REGISTRY_DIR", help="embedded registry (placement of workloads)")
@click.option("--etcd", "etcd_url", default=None, envvar="NODEMESH_ETCD",
              help="etcd registry instead (members comma-separated)")
@etcd_tls_options
@handled
def serve_cmd(directory: str, listen: str, registry_dir: str, etcd_url: str | None) -> None:
    """The CA service for several hosts: signs a workload identity for a node agent only if
    the registry places such a workload (namespace and service account) on that node."""
    import asyncio
    import signal

    from agent.cli.etcd_options import open_registry
    from agent.control.registry import Registry
    from agent.identity.clock import SystemClock
    from agent.identity.service import CaService
    from agent.identity.spiffe import SpiffeId

    host, sep, port_s = listen.rpartition(":")
    if not sep or not port_s.isdigit():
        raise UserError(f"--listen: expected address:port, got {listen!r}")
    mesh = MeshCA.load(directory)
    registry = Registry(open_registry(registry_dir, etcd_url))
    registry.start()

    def placement(node: str, sid: SpiffeId) -> bool:
        return sid.trust_domain == mesh.trust_domain and any(
            w.node == node and w.namespace == sid.namespace and w.service_account == sid.service_account
            for w in registry.snapshot.workloads.values()
        )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        svc = CaService(mesh, placement, SystemClock())
        async with svc.serving(host, int(port_s)) as (h, p):
            click.echo(f"CA service for {mesh.trust_domain} on {h}:{p}", err=True)
            click.echo("ready", nl=True)
            await stop.wait()

    try:
        asyncio.run(main())
    finally:
        registry.stop()
