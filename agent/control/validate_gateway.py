"""Istio's Gateway from YAML, strictly.

How this works: :func:`agent.control.validate.validate_document` has checked
``apiVersion`` (``networking.istio.io/v1``, ``v1beta1``, ``v1alpha3``), ``kind``
and ``metadata``; :func:`gateway` reads the ``spec``. Every field Istio has and
nodemesh does not implement is refused by name with its ``file:line`` and field
path; the result is :class:`agent.control.gateway.Gateway`. Whether the
credential files exist is the serving agent's business (the CLI may run on
another host): it refuses the server and says why in its log. Where ``apply``
is told the gateways' ``credentials_dir`` (``--gateway-credentials``),
:func:`check_credentials` refuses a Gateway whose files are not there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from agent.control.gateway import (
    SERVER_PROTOCOLS,
    TLS_MODES,
    TLS_VERSIONS,
    Gateway,
    GatewayHost,
    GatewayServer,
    ServerTls,
    credential_files,
)
from agent.control.validate import Located, _Doc, _int, _labels, _map, _name, _str, _tname
from agent.control.validate_istio import _fields, _host, _list

_YET = "not supported yet"
# the agent's own ports (DESIGN §3): a gateway server there would take them over
RESERVED_PORTS = frozenset({15000, 15001, 15006, 15008, 15020, 15021, 15053})
_CREDENTIAL_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z", re.ASCII)

_SERVER_REFUSED = {"bind": f"is {_YET} (servers listen on the gateway's configured address)",
                   "defaultEndpoint": f"is {_YET}"}
_PORT_REFUSED = {"targetPort": "is not supported (deprecated in Istio; the gateway listens on number)"}
_TLS_REFUSED = {k: f"is {_YET} (give credentialName)" for k in (
    "serverCertificate", "privateKey", "caCertificates", "credentialNames", "tlsCertificates")}
_TLS_REFUSED |= {k: f"is {_YET}" for k in (
    "subjectAltNames", "verifyCertificateSpki", "verifyCertificateHash", "maxProtocolVersion",
    "cipherSuites", "caCrl")}
_PROTOCOL_HINT = "one of HTTP, HTTPS, TCP, TLS"


def gateway(doc: _Doc, spec: Mapping[str, Any], name: str, ns: str) -> Gateway:
    _fields(doc, spec, "spec", ("selector", "servers"))
    selector = _labels(doc, spec.get("selector"), "spec.selector")
    servers_v = _list(doc, spec, "servers", "spec", required=True)
    if not servers_v:
        raise doc.fail("spec.servers", "expected a non-empty list of servers")
    servers: list[GatewayServer] = []
    for i, sv in enumerate(servers_v):
        path = f"spec.servers[{i}]"
        s = _server(doc, _map(doc, sv, path), path)
        for j, other in enumerate(servers):
            if other.port != s.port:
                continue
            if other.protocol != s.protocol or _tls_kind(other) != _tls_kind(s):
                raise doc.fail(f"{path}.port.number", f"port {s.port} is already a {other.protocol} "
                               f"server (spec.servers[{j}]): one port serves one protocol")
            if {h.host for h in s.hosts} & {h.host for h in other.hosts}:
                raise doc.fail(f"{path}.hosts", f"a host of port {s.port} is already served by "
                               f"spec.servers[{j}]")
        servers.append(s)
    return Gateway(name, ns, tuple(sorted(selector.items())), tuple(servers),
                   f"{doc.file}:{doc.start_line}")


def _tls_kind(s: GatewayServer) -> str:
    """What a port's TLS handshake is: terminated, passed through, or none."""
    if s.tls is None or s.tls.mode == "":
        return "plain"
    return "passthrough" if s.tls.mode == "PASSTHROUGH" else "terminated"


def _server(doc: _Doc, m: Mapping[str, Any], path: str) -> GatewayServer:
    _fields(doc, m, path, ("port", "hosts", "tls", "name"), _SERVER_REFUSED)
    if m.get("port") is None:
        raise doc.fail(f"{path}.port", "missing required field 'port'")
    ppath = f"{path}.port"
    p = _map(doc, m["port"], ppath)
    _fields(doc, p, ppath, ("number", "name", "protocol"), _PORT_REFUSED)
    number = _int(doc, p, "number", ppath, 1, 65535, required=True)
    if number in RESERVED_PORTS:
        raise doc.fail(f"{ppath}.number", f"port {number} is one of the agent's own ports "
                       f"({', '.join(map(str, sorted(RESERVED_PORTS)))})",
                       hint="serve the gateway on another port (80, 443, 8443, ...)")
    protocol = _str(doc, p, "protocol", ppath, required=True).upper()
    if protocol not in SERVER_PROTOCOLS:
        why = f"protocol {protocol!r} is {_YET} on a gateway" if protocol in (
            "HTTP2", "GRPC", "MONGO", "REDIS", "MYSQL", "HTTP_PROXY") else f"unknown protocol {protocol!r}"
        raise doc.fail(f"{ppath}.protocol", why, hint=_PROTOCOL_HINT)
    hosts_v = _list(doc, m, "hosts", path, required=True)
    if not hosts_v:
        raise doc.fail(f"{path}.hosts", "expected a non-empty list of hosts")
    hosts = tuple(_gateway_host(doc, h, f"{path}.hosts[{i}]") for i, h in enumerate(hosts_v))
    tls = _tls(doc, m["tls"], f"{path}.tls") if m.get("tls") is not None else None
    tpath = f"{path}.tls"
    if protocol == "HTTPS":
        if tls is None or tls.mode not in ("SIMPLE", "MUTUAL"):
            raise doc.fail(tpath + (".mode" if tls is not None else ""),
                           "an HTTPS server terminates TLS: it needs tls.mode SIMPLE or MUTUAL",
                           hint="for TLS the gateway passes through by SNI, use protocol TLS with "
                                "mode PASSTHROUGH")
    elif protocol == "TLS":
        if tls is None or not tls.mode:
            raise doc.fail(tpath + (".mode" if tls is not None else ""),
                           "a TLS server needs tls.mode: PASSTHROUGH (routed by SNI with VirtualService "
                           "tls routes), or SIMPLE/MUTUAL (terminated, then VirtualService tcp routes)")
    elif tls is not None and tls.mode:
        raise doc.fail(f"{tpath}.mode", f"a {protocol} server takes no tls.mode"
                       + (" (only httpsRedirect)" if protocol == "HTTP" else ""))
    if tls is not None and tls.https_redirect and protocol != "HTTP":
        raise doc.fail(f"{tpath}.httpsRedirect", "httpsRedirect applies to HTTP servers")
    return GatewayServer(number, _str(doc, p, "name", ppath), protocol, hosts, tls,
                         _str(doc, m, "name", path))


def _gateway_host(doc: _Doc, v: Any, path: str) -> GatewayHost:
    """``[namespace/]host``: ``*/``, ``./`` or a namespace; a name, ``*`` or ``*.suffix``."""
    if not isinstance(v, str) or not v:
        raise doc.fail(path, f"expected a host, got {_tname(v)} {v!r}")
    ns, sep, host = v.partition("/")
    if not sep:
        ns, host = "*", v
    elif ns not in ("*", "."):
        _name(doc, ns, path)
    _host(doc, host, path, wildcard=True)
    return GatewayHost(ns, host.lower().rstrip("."))


def _tls(doc: _Doc, v: Any, path: str) -> ServerTls:
    m = _map(doc, v, path)
    _fields(doc, m, path, ("mode", "credentialName", "httpsRedirect", "minProtocolVersion"), _TLS_REFUSED)
    redirect = m.get("httpsRedirect", False)
    if not isinstance(redirect, bool):
        raise doc.fail(f"{path}.httpsRedirect", f"expected true or false, got {_tname(redirect)}")
    mode = _str(doc, m, "mode", path).upper()
    if mode and mode not in TLS_MODES:
        why = {"ISTIO_MUTUAL": "ISTIO_MUTUAL (mesh certificates toward clients) is not supported yet",
               "OPTIONAL_MUTUAL": "OPTIONAL_MUTUAL is not supported yet",
               "AUTO_PASSTHROUGH": "AUTO_PASSTHROUGH (east-west gateways) is not supported yet",
               }.get(mode, f"unknown tls mode {mode!r}")
        raise doc.fail(f"{path}.mode", why, hint="one of " + ", ".join(TLS_MODES))
    cred = _str(doc, m, "credentialName", path)
    if mode in ("SIMPLE", "MUTUAL"):
        if not cred:
            raise doc.fail(f"{path}.credentialName", f"tls mode {mode} needs credentialName",
                           hint="the name of the files <name>.crt and <name>.key in the gateway's "
                                "credentials_dir (and <name>-ca.crt for MUTUAL)")
        if not _CREDENTIAL_RE.match(cred):
            raise doc.fail(f"{path}.credentialName", f"{cred!r} is not a credential name (lowercase "
                           "letters, digits, '-' and '.')")
    elif cred:
        raise doc.fail(f"{path}.credentialName", f"credentialName needs tls.mode SIMPLE or MUTUAL, "
                       f"not {mode or 'unset'}")
    version = _str(doc, m, "minProtocolVersion", path).upper()
    if version and version not in TLS_VERSIONS:
        why = (f"{version} is not supported (TLS 1.2 is the least nodemesh serves)"
               if version in ("TLSV1_0", "TLSV1_1", "TLS_AUTO") else f"unknown TLS version {version!r}")
        raise doc.fail(f"{path}.minProtocolVersion", why, hint="TLSV1_2 or TLSV1_3")
    if version and mode not in ("SIMPLE", "MUTUAL"):
        raise doc.fail(f"{path}.minProtocolVersion", "minProtocolVersion applies where the gateway "
                       "terminates TLS (SIMPLE, MUTUAL)")
    return ServerTls(mode, cred, redirect, version)


def check_credentials(resources: Sequence[Located], directory: str) -> None:
    """Every credentialName of the input's Gateways has its files in ``directory`` (the gateways'
    ``credentials_dir``, as this host sees it): else InputError at that server's credentialName."""
    for loc in resources:
        gw = loc.resource
        if not isinstance(gw, Gateway):
            continue
        for i, s in enumerate(gw.servers):
            if s.tls is None or not s.tls.credential_name:
                continue
            missing = [f for f in credential_files(s.tls) if not os.path.isfile(os.path.join(directory, f))]
            if missing:
                name = s.tls.credential_name
                raise loc.fail(f"spec.servers[{i}].tls.credentialName",
                               f"credential {name!r}: no {', '.join(missing)} in {directory}",
                               hint="write the files first (<name>.crt, <name>.key, and <name>-ca.crt for "
                                    "MUTUAL), or give the directory the gateway agents read")
