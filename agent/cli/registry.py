"""`nodemesh apply|register|get|describe|delete`: the registry from the command line.

The registry is the embedded store in ``--registry-dir`` unless ``--etcd URL``
is given. Input is validated whole before anything is written.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from agent.cli.errors import (
    UserError,
    handled,
)
from agent.cli.etcd_options import etcd_tls_options, open_registry
from agent.cli.output import OUTPUT_OPTION, emit_json, table
from agent.control import apply as apply_mod
from agent.control.authz import AuthorizationPolicy, l7_only_fields, policy_doc
from agent.control.backends import read_snapshot
from agent.control.consul import parse_consul
from agent.control.errors import (
    InputError,
    NotFound,
)
from agent.control.gateway import Gateway, gateway_doc
from agent.control.istio import (
    DestinationRule,
    VirtualService,
    destination_rule_doc,
    virtual_service_doc,
)
from agent.control.model import DEFAULT_VIP_RANGE, Kind, l7_protocol
from agent.control.peerauthn import PeerAuthentication, peer_authentication_doc
from agent.control.ratelimit import RateLimitPolicy, rate_limit_doc, rate_limit_summary
from agent.control.reqauthn import RequestAuthentication, request_authentication_doc
from agent.control.serviceentry import ServiceEntry, service_entry_doc
from agent.control.snapshot import Snapshot, endpoints
from agent.control.validate import Located, parse_vip_range, parse_yaml
from agent.control.validate_gateway import check_credentials

DEFAULT_REGISTRY_DIR = "/var/lib/nodemesh/registry"
DEFAULT_AGENT_CONFIG = "/etc/nodemesh/agent.yaml"

F = TypeVar("F", bound=Callable[..., Any])


def registry_options(fn: F) -> F:
    fn = etcd_tls_options(fn)
    fn = click.option("--registry-dir", envvar="NODEMESH_REGISTRY_DIR",
                      default=DEFAULT_REGISTRY_DIR, show_default=True,
                      help="embedded registry directory (env NODEMESH_REGISTRY_DIR)")(fn)
    fn = click.option("--etcd", "etcd_url", envvar="NODEMESH_ETCD", default=None,
                      help="use etcd at this client URL instead, e.g. http://127.0.0.1:2379; "
                           "several members comma-separated (env NODEMESH_ETCD)")(fn)
    return fn


def _read(registry_dir: str, etcd_url: str | None) -> tuple[Snapshot, str]:
    """The registry's current snapshot and where it was read from."""
    backend = open_registry(registry_dir, etcd_url)
    try:
        return read_snapshot(backend), backend.location
    finally:
        backend.close()


VIP_RANGE_OPTION = click.option(
    "--vip-range", envvar="NODEMESH_VIP_RANGE", default=DEFAULT_VIP_RANGE, show_default=True,
    help="CIDR that service VIPs are allocated from (env NODEMESH_VIP_RANGE)")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.iterdir()
                       if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        if not found:
            raise UserError(f"{path} has no .yaml, .yml or .json files")
        return found
    if not path.exists():
        raise UserError(f"{path} does not exist")
    return [path]


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text: {e.reason} at byte {e.start}", file=str(p)) from e


def _report(plan: apply_mod.Plan, output: str) -> None:
    if output == "json":
        emit_json({"created": list(plan.created), "configured": list(plan.configured),
                   "unchanged": list(plan.unchanged)})
        return
    for verb, names in (("created", plan.created), ("configured", plan.configured),
                        ("unchanged", plan.unchanged)):
        for n in names:
            click.echo(f"{n} {verb}")


@click.command("apply")
@click.option("-f", "--filename", "path", required=True, type=click.Path(path_type=Path),
              help="a YAML file, or a directory of them")
@registry_options
@VIP_RANGE_OPTION
@click.option("--root-namespace", envvar="NODEMESH_ROOT_NAMESPACE", default="istio-system", show_default=True,
              help="the agents' mesh.root_namespace: a PeerAuthentication there with a selector is refused "
                   "(env NODEMESH_ROOT_NAMESPACE)")
@click.option("--gateway-credentials", envvar="NODEMESH_GATEWAY_CREDENTIALS", default=None,
              type=click.Path(file_okay=False, exists=True),
              help="the gateways' credentials_dir: a Gateway whose credentialName files are not there is "
                   "refused (env NODEMESH_GATEWAY_CREDENTIALS)")
@OUTPUT_OPTION
@handled
def apply_cmd(path: Path, registry_dir: str, etcd_url: str | None, vip_range: str, root_namespace: str,
              gateway_credentials: str | None, output: str) -> None:
    """Create or update Services, Workloads, VirtualServices, DestinationRules and
    AuthorizationPolicies from YAML (all or nothing)."""
    net = parse_vip_range(vip_range)
    resources: list[Located] = []
    for f in _files(path):
        resources += parse_yaml(_read_text(f), str(f), net, root_namespace=root_namespace)
    if gateway_credentials is not None:
        check_credentials(resources, gateway_credentials)
    backend = open_registry(registry_dir, etcd_url)
    try:
        _report(apply_mod.apply(backend, resources, net), output)
    finally:
        backend.close()


def node_of(node: str | None, node_address: str | None, config_path: str | None
            ) -> tuple[str, str | None]:
    """The node a Consul definition registers on and its host address (for definitions
    without ``address``): ``--node`` (else the agent config's node, else this host's name);
    ``--node-address``, else from the agent config: its own ``addresses.hbone`` for its own
    node, its ``peers`` entry for another. The registry keeps no node records."""
    from agent import config as config_mod

    cfg = None
    wanted = config_path is not None and (node_address is None or node is None)
    if wanted and config_path and (os.path.exists(config_path) or config_path != DEFAULT_AGENT_CONFIG):
        cfg = config_mod.load(config_path)  # the default file only if present
    name = node or (cfg.node if cfg is not None else socket.gethostname())
    if node_address is not None:
        try:
            return name, str(ipaddress.ip_address(node_address))
        except ValueError:
            raise UserError(f"--node-address: expected an IP address, got {node_address!r}") from None
    if cfg is None:
        return name, None
    return name, cfg.addresses.hbone if name == cfg.node else cfg.peers.get(name)


@click.command("register")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--node", default=None,
              help="node the service runs on (its health checks run there) [default: the agent "
                   "config's node, else this host's name]")
@click.option("--node-address", default=None,
              help="the node's host address, for definitions without 'address' [default: from "
                   "the agent config]")
@click.option("--config", "-c", "config_path", default=DEFAULT_AGENT_CONFIG, show_default=True,
              envvar="NODEMESH_CONFIG", help="agent configuration file (read if it exists)")
@registry_options
@VIP_RANGE_OPTION
@OUTPUT_OPTION
@handled
def register(path: Path, node: str | None, node_address: str | None, config_path: str,
             registry_dir: str, etcd_url: str | None, vip_range: str, output: str) -> None:
    """Register Consul service definitions (HCL or JSON, with checks). A definition without
    'address' is a service on the node's host itself: it gets the node's host address."""
    net = parse_vip_range(vip_range)
    node, address = node_of(node, node_address, config_path)
    files = _files(path)
    backend = open_registry(registry_dir, etcd_url)
    try:
        snap = read_snapshot(backend)
        resources: list[Located] = []
        for f in files:
            resources += parse_consul(_read_text(f), str(f), existing_services=snap.services,
                                      node=node, vip_range=net, node_address=address)
        _report(apply_mod.apply(backend, resources, net), output)
    finally:
        backend.close()


_KIND_NAMES = {
    Kind.SERVICE: ("service", "services", "svc"),
    Kind.WORKLOAD: ("workload", "workloads", "wl"),
    Kind.VIRTUAL_SERVICE: ("virtualservice", "virtualservices", "vs"),
    Kind.DESTINATION_RULE: ("destinationrule", "destinationrules", "dr"),
    Kind.AUTHORIZATION_POLICY: ("authorizationpolicy", "authorizationpolicies", "ap"),
    Kind.REQUEST_AUTHENTICATION: ("requestauthentication", "requestauthentications", "ra"),
    Kind.PEER_AUTHENTICATION: ("peerauthentication", "peerauthentications", "pa"),
    Kind.RATE_LIMIT_POLICY: ("ratelimitpolicy", "ratelimitpolicies", "rlp"),
    Kind.GATEWAY: ("gateway", "gateways", "gw"),
    Kind.SERVICE_ENTRY: ("serviceentry", "serviceentries", "se"),
}
_KINDS = {n: k for k, names in _KIND_NAMES.items() for n in names}
KIND_CHOICE = click.Choice(list(_KINDS), case_sensitive=False)


def _kind(s: str) -> Kind:
    return _KINDS[s.lower()]


def _table_of(snap: Snapshot, k: Kind) -> Mapping[tuple[str, str], Any]:
    return {Kind.SERVICE: snap.services, Kind.WORKLOAD: snap.workloads,
            Kind.VIRTUAL_SERVICE: snap.virtual_services,
            Kind.DESTINATION_RULE: snap.destination_rules,
            Kind.AUTHORIZATION_POLICY: snap.authorization_policies,
            Kind.REQUEST_AUTHENTICATION: snap.request_authentications,
            Kind.PEER_AUTHENTICATION: snap.peer_authentications,
            Kind.RATE_LIMIT_POLICY: snap.rate_limit_policies,
            Kind.GATEWAY: snap.gateways,
            Kind.SERVICE_ENTRY: snap.service_entries}[k]


def _doc(obj: Any) -> dict[str, Any]:
    if isinstance(obj, VirtualService):
        return virtual_service_doc(obj)
    if isinstance(obj, DestinationRule):
        return destination_rule_doc(obj)
    if isinstance(obj, AuthorizationPolicy):
        return policy_doc(obj)
    if isinstance(obj, RequestAuthentication):
        return request_authentication_doc(obj)
    if isinstance(obj, PeerAuthentication):
        return peer_authentication_doc(obj)
    if isinstance(obj, RateLimitPolicy):
        return rate_limit_doc(obj)
    if isinstance(obj, Gateway):
        return gateway_doc(obj)
    if isinstance(obj, ServiceEntry):
        return service_entry_doc(obj)
    doc: dict[str, Any] = obj.to_doc()
    return doc


def _destinations(vs: VirtualService) -> str:
    seen: dict[str, None] = {}
    for r in vs.http:
        if r.direct_status:
            seen[f"direct:{r.direct_status}"] = None
        for rd in r.route:
            d = rd.destination
            seen[d.host + (f"/{d.subset}" if d.subset else "")] = None
    return ",".join(seen) or "-"


def l4_warnings(p: AuthorizationPolicy) -> list[str]:
    """One line per field of ``p`` a TCP port cannot judge (ztunnel's L4 rule)."""
    return [f"WARNING: {f} cannot be judged on TCP ports: an ALLOW rule with them never matches "
            "there; a DENY rule denies on its other fields" for f in l7_only_fields(p)]


def _ports(s: Any) -> str:
    return ",".join(f"{p.port}/{(l7_protocol(p) or 'auto')}" for p in s.ports)


@click.command("get")
@click.argument("kind", type=KIND_CHOICE)
@click.argument("name", required=False)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-A", "--all-namespaces", is_flag=True)
@registry_options
@OUTPUT_OPTION
@handled
def get(kind: str, name: str | None, namespace: str, all_namespaces: bool, registry_dir: str,
        etcd_url: str | None, output: str) -> None:
    """List services, workloads, virtualservices (vs), destinationrules (dr) or
    authorizationpolicies (ap), requestauthentications (ra), peerauthentications (pa) or
    ratelimitpolicies (rlp); gateways (gw) and serviceentries (se) too."""
    snap, location = _read(registry_dir, etcd_url)
    k = _kind(kind)
    picked = [v for (ns, n), v in sorted(_table_of(snap, k).items())
              if (all_namespaces or ns == namespace) and (name is None or n == name)]
    if name is not None and not picked:
        raise NotFound(f"{k.value} {namespace}/{name} not found in {location}")
    if output == "json":
        emit_json([_doc(v) for v in picked])
        return
    if k == Kind.VIRTUAL_SERVICE:
        click.echo(table(["NAMESPACE", "NAME", "HOSTS", "ROUTES", "DESTINATIONS", "SOURCE"], [
            [v.namespace, v.name, ",".join(v.hosts), len(v.http), _destinations(v), v.source or "-"]
            for v in picked]))
    elif k == Kind.DESTINATION_RULE:
        click.echo(table(["NAMESPACE", "NAME", "HOST", "LOADBALANCER", "SUBSETS", "SOURCE"], [
            [d.namespace, d.name, d.host, d.load_balancer or "-",
             ",".join(s.name for s in d.subsets) or "-", d.source or "-"]
            for d in picked]))
    elif k == Kind.AUTHORIZATION_POLICY:
        click.echo(table(["NAMESPACE", "NAME", "ACTION", "SELECTOR", "RULES", "SOURCE"], [
            [p.namespace, p.name, p.action,
             "-" if p.selector is None else ",".join(f"{a}={b}" for a, b in p.selector) or "{}",
             len(p.rules), p.source or "-"]
            for p in picked]))
    elif k == Kind.REQUEST_AUTHENTICATION:
        click.echo(table(["NAMESPACE", "NAME", "SELECTOR", "ISSUERS", "KEYS", "SOURCE"], [
            [r.namespace, r.name,
             "-" if r.selector is None else ",".join(f"{a}={b}" for a, b in r.selector) or "{}",
             ",".join(j.issuer for j in r.jwt_rules) or "-",
             ",".join(j.jwks_uri or "inline" for j in r.jwt_rules) or "-", r.source or "-"]
            for r in picked]))
    elif k == Kind.PEER_AUTHENTICATION:
        click.echo(table(["NAMESPACE", "NAME", "SELECTOR", "MODE", "SOURCE"], [
            [r.namespace, r.name,
             "-" if r.selector is None else ",".join(f"{a}={b}" for a, b in r.selector) or "{}",
             r.mode, r.source or "-"]
            for r in picked]))
    elif k == Kind.RATE_LIMIT_POLICY:
        click.echo(table(["NAMESPACE", "NAME", "TARGET", "SCOPE", "LIMITS", "SOURCE"], [
            [r.namespace, r.name, r.service + (f":{r.port}" if r.port is not None else ""), r.scope,
             rate_limit_summary(r), r.source or "-"]
            for r in picked]))
    elif k == Kind.GATEWAY:
        click.echo(table(["NAMESPACE", "NAME", "SELECTOR", "SERVERS", "SOURCE"], [
            [g.namespace, g.name, ",".join(f"{a}={b}" for a, b in g.selector) or "{}",
             ",".join(f"{s.port}/{s.protocol}" + (f"/{s.tls.mode}" if s.tls and s.tls.mode else "")
                      for s in g.servers), g.source or "-"]
            for g in picked]))
    elif k == Kind.SERVICE_ENTRY:
        click.echo(table(["NAMESPACE", "NAME", "HOSTS", "ADDRESSES", "PORTS", "LOCATION", "RESOLUTION",
                          "SOURCE"], [
            [e.namespace, e.name, ",".join(e.hosts), ",".join(e.addresses or e.auto_addresses) or "-",
             ",".join(f"{p.number}/{p.protocol or p.name}" for p in e.ports), e.location, e.resolution,
             e.source or "-"]
            for e in picked]))
    elif k == Kind.SERVICE:
        rows = []
        for s in picked:
            eps = [e for p in s.ports for e in endpoints(snap, s, p.port)]
            ok = sum(e.health != "critical" for e in eps)
            rows.append([s.namespace, s.name, s.vip, _ports(s), f"{ok}/{len(eps)}"])
        click.echo(table(["NAMESPACE", "NAME", "VIP", "PORTS", "HEALTHY/ENDPOINTS"], rows))
    else:
        click.echo(table(["NAMESPACE", "NAME", "ADDRESS", "NODE", "HEALTH", "LABELS"], [
            [w.namespace, w.name, w.address, w.node or "-",
             snap.effective_health(w.namespace, w.name).value,
             ",".join(f"{a}={b}" for a, b in sorted(w.labels.items())) or "-"]
            for w in picked]))


@click.command("describe")
@click.argument("kind", type=KIND_CHOICE)
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@registry_options
@OUTPUT_OPTION
@handled
def describe(kind: str, name: str, namespace: str, registry_dir: str, etcd_url: str | None,
             output: str) -> None:
    """Show one service (with its endpoints), workload (with its checks), virtualservice,
    destinationrule, authorizationpolicy, requestauthentication, peerauthentication or
    ratelimitpolicy (with the file:line it was applied from; a policy with a WARNING per field
    that TCP ports cannot judge)."""
    snap, location = _read(registry_dir, etcd_url)
    k = _kind(kind)
    obj: Any = _table_of(snap, k).get((namespace, name))
    if obj is None:
        raise NotFound(f"{k.value} {namespace}/{name} not found in {location}",
                       hint=f"list them with: nodemesh get {_KIND_NAMES[k][1]} -A")
    doc = _doc(obj)
    # a VirtualService, DestinationRule or AuthorizationPolicy is its stored document (with its
    # source) alone; a policy's L4 warnings are added
    warnings = l4_warnings(obj) if k == Kind.AUTHORIZATION_POLICY else []
    if k == Kind.SERVICE:
        doc["endpoints"] = {str(p.port): [
            {"workload": e.workload, "address": f"{e.address}:{e.port}", "health": e.health.value,
             "weight": e.weight, "node": e.node} for e in endpoints(snap, obj, p.port)]
            for p in obj.ports}
    elif k == Kind.WORKLOAD:
        doc["effectiveHealth"] = snap.effective_health(namespace, name).value
        h = snap.health.get((namespace, name))
        if h is not None:
            doc["observed"] = h.to_doc()
    doc["revision"] = snap.revision
    if output == "json":
        emit_json({**doc, "warnings": warnings} if warnings else doc)
        return
    import yaml

    click.echo(yaml.safe_dump(doc, sort_keys=False).rstrip())
    for w in warnings:
        click.echo(w)


@click.command("delete")
@click.argument("kind", type=KIND_CHOICE)
@click.argument("name")
@click.option("-n", "--namespace", default="default", show_default=True)
@registry_options
@handled
def delete(kind: str, name: str, namespace: str, registry_dir: str,
           etcd_url: str | None) -> None:
    """Delete one service, workload, virtualservice, destinationrule, authorizationpolicy,
    requestauthentication, peerauthentication or ratelimitpolicy."""
    k = _kind(kind)
    backend = open_registry(registry_dir, etcd_url)
    try:
        apply_mod.delete(backend, k, namespace, name)
    finally:
        backend.close()
    click.echo(f"{k.value} {namespace}/{name} deleted")


__all__ = ["apply_cmd", "delete", "describe", "get", "register"]
