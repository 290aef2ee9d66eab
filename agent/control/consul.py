"""Consul service definitions (HCL or JSON) into registry resources. Pure, no I/O.

How this works: the text is parsed as JSON when it starts with ``{``, else as
HCL (Consul's HCL1 dialect, via pyhcl). Each ``service`` (or entry of
``services``) becomes a :class:`Workload` named after its ``id`` (else its
``name``) with label ``nodemesh.io/service: <name>``, its ``address``, ``port``,
``meta`` as labels, and its ``check``/``checks``. A definition without ``address``
is a service running on the host itself (as Consul agents on VMs run them): its
workload gets the registering node's host address (``node_address``, the node's
HBONE address) and its checks run from that host, so ``http://127.0.0.1:8080/``
means the node's own loopback. When no Service of that name
exists yet, a Service selecting that label is created too (port = the Consul
port; ``meta.protocol`` picks the protocol), so Consul users get a VIP and a
DNS name without writing YAML.

pyhcl does not report where a value came from, so field errors point at the
first line that mentions the field (syntax errors carry the parser's line).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import hcl  # type: ignore[import-untyped]

from agent.control.errors import InputError
from agent.control.model import DEFAULT_NAMESPACE, Protocol, Service, ServicePort, Workload
from agent.control.screening import HOST_LABEL
from agent.control.validate import (
    IpNetwork,
    Located,
    _Doc,
    _int,
    _labels,
    _map,
    _name,
    _only,
    _str,
    check_from_fields,
    workload_ip,
)

SERVICE_LABEL = "nodemesh.io/service"

_SERVICE_FIELDS = ("name", "id", "address", "port", "tags", "meta", "check", "checks",
                   "namespace", "kind", "enable_tag_override", "weights", "token")


class _TextDoc(_Doc):
    """Line numbers found by looking for the field's name in the text."""

    def __init__(self, file: str, text: str):
        super().__init__(file, 1)
        self._text_lines = text.splitlines()

    def fail(self, path: str, reason: str, hint: str | None = None) -> InputError:
        leaf = re.sub(r"\[\d+\]$", "", path.rsplit(".", 1)[-1])
        line = None
        if leaf:
            pat = re.compile(rf"[\s\"{{,]{re.escape(leaf)}[\"\s]*[=:{{]", re.ASCII)
            line = next((i + 1 for i, t in enumerate(self._text_lines) if pat.search(" " + t)),
                        None)
        return InputError(reason, file=self.file, line=line, path=path, hint=hint)


def _load(text: str, file: str) -> Any:
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON: {e.msg}", file=file, line=e.lineno) from e
    try:
        return hcl.loads(text)
    except ValueError as e:  # pyhcl: "Line 3, column 19: unexpected RIGHTBRACE; ..."
        m = re.match(r"Line (\d+), column \d+: (.*)", str(e), re.S)
        raise InputError(f"invalid HCL: {m.group(2) if m else e}", file=file,
                         line=int(m.group(1)) if m else None) from e


def parse_consul(text: str, file: str, *, existing_services: Mapping[tuple[str, str], Service],
                 node: str, vip_range: IpNetwork, node_address: str | None = None) -> list[Located]:
    """Resources for every service definition in one file (first error raises).
    ``node_address``: the host address of ``node``, for definitions without ``address``
    (None: unknown, such a definition is refused)."""
    del vip_range  # VIPs are allocated by apply; kept for symmetry with parse_yaml
    doc = _TextDoc(file, text)
    root = _map(doc, _load(text, file), "")
    _only(doc, root, "", ("service", "services"))
    defs: list[tuple[str, Any]] = []
    for key in ("service", "services"):
        v = root.get(key)
        if isinstance(v, list):
            defs += [(f"{key}[{i}]", d) for i, d in enumerate(v)]
        elif v is not None:
            defs.append((key, v))
    if not defs:
        raise InputError("no 'service' or 'services' block found", file=file,
                         hint='write: service { name = "web" port = 8080 ... }')
    out: list[Located] = []
    for path, d in defs:
        out += _one(doc, _map(doc, d, path), path, existing_services, node, node_address)
    return out


def _one(doc: _TextDoc, m: dict[str, Any], path: str,
         existing: Mapping[tuple[str, str], Service], node: str,
         node_address: str | None) -> list[Located]:
    _only(doc, m, path, _SERVICE_FIELDS)
    name = _name(doc, _str(doc, m, "name", path, required=True), f"{path}.name")
    wid = _name(doc, _str(doc, m, "id", path, default=name), f"{path}.id")
    ns = _name(doc, _str(doc, m, "namespace", path, default=DEFAULT_NAMESPACE),
               f"{path}.namespace")
    given = _str(doc, m, "address", path)  # "" as in Consul: the node's address
    if not given and node_address is None:
        raise doc.fail(f"{path}.address", f"no address, and the address of node {node!r} is "
                       "unknown (a service without address runs on the registering host)",
                       hint="pass --node-address, or --config with the agent config of that "
                            "node (its addresses.hbone, or its peers for another --node)")
    address = workload_ip(doc, given or node_address or "", f"{path}.address")
    port = _int(doc, m, "port", path, 1, 65535, required=True)
    meta = _labels(doc, m.get("meta"), f"{path}.meta")
    checks_raw: list[tuple[str, Any]] = []
    if m.get("check") is not None:
        checks_raw.append((f"{path}.check", m["check"]))
    cv = m.get("checks")
    if cv is not None:
        if isinstance(cv, dict):  # HCL: repeated `checks { }` blocks may parse as one map
            cv = [cv]
        if not isinstance(cv, list):
            raise doc.fail(f"{path}.checks", "expected a list of checks")
        checks_raw += [(f"{path}.checks[{i}]", c) for i, c in enumerate(cv)]
    checks = tuple(
        check_from_fields(doc, _map(doc, c, p), p, f"service:{wid}" if len(checks_raw) == 1
                          else f"service:{wid}:{i + 1}")
        for i, (p, c) in enumerate(checks_raw))
    proto_s = meta.get("protocol", "tcp")
    try:
        proto = Protocol(proto_s)
    except ValueError:
        raise doc.fail(f"{path}.meta.protocol", f"unknown protocol {proto_s!r}") from None
    host = not given or address == node_address  # on the node itself (its address written out)
    labels = {**meta, SERVICE_LABEL: name, **({HOST_LABEL: "true"} if host else {})}
    w = Workload(name=wid, namespace=ns, address=address, node=node, labels=labels,
                 ports={"port": port}, checks=checks)
    out = [Located(w, doc.file, 1, doc, f"{path}.address")]
    if (ns, name) not in existing:
        s = Service(name=name, namespace=ns, vip="", selector={SERVICE_LABEL: name},
                    ports=(ServicePort(f"{proto.value}-{port}", port, "port", proto),))
        out.append(Located(s, doc.file, 1))
    return out
