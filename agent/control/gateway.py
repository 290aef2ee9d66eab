"""Istio's Gateway kind as nodemesh holds it, and the pure host rules of gateway routing.

How this works: :mod:`agent.control.validate_gateway` turns a ``Gateway``
(``networking.istio.io/v1``, ``v1beta1``, ``v1alpha3``) into these frozen values,
refusing by name what nodemesh does not implement; they are stored as JSON
(:func:`gateway_doc` / :func:`gateway_from_doc`) and reach the agents in
snapshots. An agent whose ``agent.yaml`` has a ``gateway:`` section serves every
Gateway whose ``selector`` its labels match (:func:`selects`); which
VirtualService takes a request is :func:`bound` (the VirtualService names the
Gateway in ``gateways:``) plus :func:`host_match` (the request's host against the
server's ``hosts`` and the VirtualService's ``hosts``). The listeners and the
request path are :mod:`agent.dataplane.gateway`'s.

Server ``hosts`` are Istio's ``[namespace/]host``: ``*/`` (or no prefix) lets
VirtualServices of every namespace bind, ``./`` only those of the Gateway's
namespace, ``ns/`` only those of ``ns``; the host is a name or a wildcard
(``*``, ``*.example.com``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVER_PROTOCOLS = ("HTTP", "HTTPS", "TCP", "TLS")
TLS_MODES = ("SIMPLE", "MUTUAL", "PASSTHROUGH")
TLS_VERSIONS = ("TLSV1_2", "TLSV1_3")


@dataclass(frozen=True, slots=True)
class ServerTls:
    mode: str = ""  # SIMPLE | MUTUAL | PASSTHROUGH ("": only httpsRedirect on an HTTP server)
    credential_name: str = ""  # the files <dir>/<name>.crt, .key (and <name>-ca.crt for MUTUAL)
    https_redirect: bool = False
    min_protocol_version: str = ""  # TLSV1_2 | TLSV1_3 ("": TLS 1.2, Envoy's server default)


@dataclass(frozen=True, slots=True)
class GatewayHost:
    namespace: str  # "*" any, "." the Gateway's, else that namespace
    host: str  # lower-case name, "*" or "*.suffix"


@dataclass(frozen=True, slots=True)
class GatewayServer:
    port: int
    port_name: str
    protocol: str  # one of SERVER_PROTOCOLS
    hosts: tuple[GatewayHost, ...]
    tls: ServerTls | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]
    servers: tuple[GatewayServer, ...]
    source: str = ""


def credential_files(tls: ServerTls) -> tuple[str, ...]:
    """The files a server's credential is read from, in the gateway's credentials_dir."""
    n = tls.credential_name
    return (f"{n}.crt", f"{n}.key") + ((f"{n}-ca.crt",) if tls.mode == "MUTUAL" else ())


def selects(gw: Gateway, labels: Mapping[str, str]) -> bool:
    """Does the Gateway apply to a gateway agent with ``labels``? (Istio: every selector label
    must match; an empty selector applies to every gateway.)"""
    return all(labels.get(k) == v for k, v in gw.selector)


def name_match(pattern: str, host: str) -> bool:
    """A host pattern (``*``, ``*.example.com``, a name) against a lower-case host name."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def namespace_allows(h: GatewayHost, gateway_ns: str, vs_ns: str) -> bool:
    return h.namespace == "*" or vs_ns == (gateway_ns if h.namespace == "." else h.namespace)


def gateway_ref(ref: str, vs_namespace: str) -> tuple[str, str]:
    """A VirtualService's ``gateways`` entry as (namespace, name): ``name`` is in the
    VirtualService's namespace, ``ns/name`` in ``ns`` (``mesh`` is not a reference)."""
    ns, sep, name = ref.partition("/")
    return (ns, name) if sep else (vs_namespace, ref)


def bound(vs_gateways: tuple[str, ...], vs_namespace: str, gw: Gateway) -> bool:
    """Does a VirtualService with these ``gateways`` bind to ``gw``?"""
    return any(g != "mesh" and gateway_ref(g, vs_namespace) == (gw.namespace, gw.name)
               for g in vs_gateways)


def host_of(authority: str) -> str:
    """The host of a Host header / :authority / SNI: port and trailing dot gone, lower case."""
    h = authority.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1]
    h = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    return h.rstrip(".")


def host_match(pattern: str, host: str, namespace: str) -> bool:
    """A VirtualService host (as written, short names allowed) against a request's host:
    literally or by wildcard, or by the FQDN both name in ``namespace``
    (``my-service`` takes ``my-service``, ``my-service.default`` and
    ``my-service.default.svc.cluster.local``)."""
    p = pattern.lower().rstrip(".")
    if name_match(p, host):
        return True
    if p.startswith("*"):
        return False
    from agent.control.istio import host_fqdn  # (the one place that expands short names)

    return host_fqdn(p, namespace) == host_fqdn(host, namespace)


# -- JSON documents (what the registry stores) -----------------------------------------------

def gateway_doc(gw: Gateway) -> dict[str, Any]:
    servers = []
    for s in gw.servers:
        d: dict[str, Any] = {"port": {"number": s.port, "name": s.port_name, "protocol": s.protocol},
                             "hosts": [f"{h.namespace}/{h.host}" for h in s.hosts]}
        if s.name:
            d["name"] = s.name
        if s.tls is not None:
            t = s.tls
            d["tls"] = {k: v for k, v in (("mode", t.mode), ("credentialName", t.credential_name),
                                          ("httpsRedirect", t.https_redirect),
                                          ("minProtocolVersion", t.min_protocol_version)) if v}
        servers.append(d)
    return {"name": gw.name, "namespace": gw.namespace, "selector": dict(gw.selector),
            "servers": servers, "source": gw.source}


def gateway_from_doc(d: Mapping[str, Any]) -> Gateway:
    servers = []
    for s in d["servers"]:
        t = s.get("tls")
        hosts = []
        for h in s["hosts"]:
            ns, _, host = str(h).partition("/")
            hosts.append(GatewayHost(ns, host))
        servers.append(GatewayServer(
            int(s["port"]["number"]), str(s["port"].get("name", "")), str(s["port"]["protocol"]),
            tuple(hosts),
            ServerTls(t.get("mode", ""), t.get("credentialName", ""), bool(t.get("httpsRedirect", False)),
                      t.get("minProtocolVersion", "")) if t is not None else None,
            s.get("name", ""),
        ))
    return Gateway(d["name"], d["namespace"], tuple(sorted(d.get("selector", {}).items())), tuple(servers),
                   d.get("source", ""))
