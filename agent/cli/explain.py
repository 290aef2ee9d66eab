"""`nodemesh explain`: the walk of one request through the mesh, without sending anything.

How this works: the registry's snapshot is read as the agents read it; the
request's destination is resolved as the pod would reach it (a VIP, or a mesh DNS
name), then the source node's proxy's own pure decisions run on it:
:func:`agent.dataplane.route.decide` (service, port, protocol) and
:func:`agent.dataplane.http.routing.decide` (the VirtualService route, the
destination and subset, the policy, what is in force), and the balancer's
choice from a fresh balancer (the first pick of a new proxy; a running proxy's
round-robin position is its own). So what this prints is what the proxy does,
by construction, not a second model of it.

Outlier detection is the one piece of live state: when a DestinationRule's
``outlierDetection`` is in force, the source node's agent is asked for its
ejection state (``/outliers`` on its admin port, or with ``--node`` its health
port), each candidate endpoint is shown ejected or ok, and the pick skips the
ejected ones and applies locality load balancing exactly as the proxy does
(:func:`agent.dataplane.http.outlier.keep_available`, then
:func:`agent.dataplane.http.routing.by_locality`). An agent that cannot be
asked, or that is another node's, is said so: the state is then unknown, never "ok".
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import click

from agent import config as config_mod
from agent.cli.dataplane import ADMIN_OPTION, NETNS_OPTION, NODE_OPTION, agent_address, fetch_json
from agent.cli.errors import UserError, handled
from agent.cli.output import OUTPUT_OPTION, emit_json
from agent.cli.registry import _read, registry_options
from agent.config import AgentConfig, PeerAuthConfig
from agent.control import authz, reqauthn
from agent.control.istio import Retry
from agent.control.model import Protocol, Service, Workload, l7_protocol
from agent.control.ratelimit import rate_limit_summary
from agent.control.snapshot import Endpoint, Snapshot
from agent.dataplane.authorize import DENIED_BODY, DENIED_FLAG
from agent.dataplane.http import routing
from agent.dataplane.http.exchange import LocalReply
from agent.dataplane.http.hashing import Hashers
from agent.dataplane.http.normalize import (
    NormalizationError,
    PathNormalization,
    check_method,
    join_headers,
    normalize_path,
)
from agent.dataplane.http.outlier import EndpointKey, keep_available
from agent.dataplane.lb import Balancer
from agent.dataplane.ratelimit import pod_ports
from agent.dataplane.route import Directory, RouteError, decide
from agent.node import peer_auth_decision
from netns.errors import NetnsError


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """What the source node's agent said at ``/outliers``, or why it could not be asked."""

    where: str  # host:port, and the netns it was asked from
    doc: dict[str, Any] | None = None
    error: str = ""


AskAgent = Callable[[], AgentAnswer]
LiveState = dict[EndpointKey, dict[str, Any]]  # an agent's /outliers entries of one cluster


def ask_agent(admin: str, node: str | None, netns: str | None, timeout_s: float = 2.0) -> AgentAnswer:
    """GET /outliers from an agent, as ``nodemesh status`` reaches it."""
    host, port = agent_address(admin, node)
    where = f"{host}:{port}" + (f" in netns {netns}" if netns else "")
    try:
        doc = fetch_json(host, port, netns, "/outliers", timeout_s)
    except (OSError, ValueError, NetnsError, click.ClickException) as e:
        return AgentAnswer(where, error=f"no answer from an agent at {where}: {e}")
    if not isinstance(doc, dict) or not isinstance(doc.get("clusters"), dict):
        return AgentAnswer(where, error=f"the agent at {where} answered /outliers without clusters")
    return AgentAnswer(where, doc)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _live_state(answer: AgentAnswer, node: str, cluster: str) -> tuple[LiveState | None, str]:
    """The agent's state of ``cluster`` by endpoint (None: unknown) and where it came from."""
    if answer.doc is None:
        return None, answer.error
    if answer.doc.get("node") != node:
        return None, (f"the agent at {answer.where} is node {answer.doc.get('node')!r}'s, "
                      f"not the source's node {node!r}")
    state: LiveState = {}
    for d in answer.doc["clusters"].get(cluster, ()):
        addr, _, port = str(d.get("endpoint", "")).rpartition(":")
        if port.isdigit():
            state[(addr, int(port))] = d
    return state, f"the agent of node {node} at {answer.where}"


def _ejection_doc(st: dict[str, Any] | None) -> dict[str, Any]:
    if st is not None and st.get("ejected"):
        return {"state": "ejected", "until": st.get("ejected_until"), "for_s": st.get("ejected_for_s"),
                "ejections": st.get("ejections", 0)}
    return {"state": "ok", "ejections": st.get("ejections", 0) if st else 0,
            "consecutive_5xx": st.get("consecutive_5xx", 0) if st else 0}


def _source(snap: Snapshot, name: str) -> Workload:
    ns, _, wname = name.rpartition("/")
    matches = [w for (wns, n), w in snap.workloads.items() if n == wname and (not ns or wns == ns)]
    if not matches:
        raise UserError(f"no workload {name!r} in the registry", hint="nodemesh get workloads -A")
    if len(matches) > 1:
        raise UserError(f"workload name {name!r} is in several namespaces",
                        hint="write <namespace>/<name>")
    return matches[0]


def _service_of_host(snap: Snapshot, host: str, src: Workload) -> Service:
    entry = snap.entry_services.get(host.lower().rstrip(".")) or snap.entry_by_address.get(host)
    if entry is not None:  # a ServiceEntry host (or one of its addresses)
        return entry
    try:
        ipaddress.ip_address(host)
        svc = snap.service_by_vip(host)
        if svc is None:
            raise UserError(f"{host} is not a service VIP")
        return svc
    except ValueError:
        pass
    h = host.lower().rstrip(".")
    parts = h.split(".")
    if h.endswith(".service.consul"):
        key = ("default", parts[0])
    elif len(parts) == 1:
        key = (src.namespace, h)
    else:
        key = (parts[1], parts[0])
    svc = snap.service(key[0], key[1])
    if svc is None:
        raise UserError(f"{host} does not name a service (looked for {key[0]}/{key[1]})")
    return svc


def explain(snap: Snapshot, source: str, method: str, url: str, headers: dict[str, str],
            ask: AskAgent | None = None, trust_domain: str = "cluster.local",
            normalization: PathNormalization = PathNormalization.BASE,
            agent_config: AgentConfig | None = None) -> dict[str, Any]:
    """The walk as a JSON document; ``ask`` reads the source node's agent's outlier state (asked
    only when outlierDetection is in force; None: not asked, the state is unknown);
    ``agent_config``: the destination node's agent.yaml (peer authentication's default and the
    root namespace; None: their defaults)."""
    src = _source(snap, source)
    u = urlsplit(url if "://" in url else f"http://{url}")
    if not u.hostname:
        raise UserError(f"{url!r} has no host")
    port = u.port or (443 if u.scheme == "https" else 80)
    svc = _service_of_host(snap, u.hostname, src)
    walk: dict[str, Any] = {
        "request": {"method": method, "url": url, "headers": headers},
        "source": {"workload": f"{src.namespace}/{src.name}", "address": src.address, "node": src.node},
        "capture": f"{svc.vip}:{port} is service {svc.namespace}/{svc.name}: the connection is captured "
                   f"by eBPF and handed to node {src.node}'s proxy",
    }
    directory = Directory.build(snap)
    try:
        decide(directory, svc.vip, port)
    except RouteError as e:
        walk["outcome"] = {"answer": "connection reset", "response_flags": e.flag, "why": str(e)}
        return walk
    sp = next(p for p in svc.ports if p.port == port)
    proto = l7_protocol(sp)
    walk["protocol"] = (proto.value if proto is not None
                        else "undeclared: sniffed (HTTP when the client's first bytes are)")
    table = routing.RouteTable.build(snap)
    facts = routing.RequestFacts(method, (u.path or "/") + (f"?{u.query}" if u.query else ""),
                                 u.netloc, u.scheme or "http",
                                 {k.lower(): v for k, v in headers.items()}, port, src)
    vs = table.virtual_service(svc)
    try:
        plan = routing.decide(table, svc, facts, random.Random(0))
    except LocalReply as reply:
        hit = table.match(vs, facts) if vs is not None else None
        walk["virtual_service"] = _vs_doc(vs, hit)
        walk["outcome"] = {"answer": reply.status, "response_flags": reply.flag, "why": str(reply)}
        return walk
    walk["virtual_service"] = _vs_doc(vs, (plan.route_index, plan.route, None) if plan.route else None)
    if plan.route is not None:
        walk["destinations"] = [
            {"host": d.destination.host, "subset": d.destination.subset or None,
             "port": d.destination.port or None, "weight": d.weight}
            for d in plan.route.route
        ]
    walk["destination"] = {
        "service": f"{plan.service.namespace}/{plan.service.name}", "port": plan.port,
        "subset": plan.destination.destination.subset or None if plan.destination else None,
        "picked": ("by weight, at random per request" if plan.route and len(plan.route.route) > 1
                   else "the only one"),
    }
    in_force: dict[str, Any] = {}
    if plan.timeout_s is not None:
        in_force["timeout_s"] = plan.timeout_s
    r = plan.route.retries if plan.route else None
    if isinstance(r, Retry):
        in_force["retries"] = {"attempts": r.attempts, "per_try_timeout_s": r.per_try_timeout_s,
                               "retry_on": list(r.retry_on), "status_codes": list(r.status_codes)}
    f = plan.route.fault if plan.route else None
    if f is not None:
        in_force["fault"] = {"delay_s": f.delay_s, "delay_percent": f.delay_percent,
                             "abort_status": f.abort_status,
                             "abort_grpc_status": f.abort_grpc_status or None,
                             "abort_percent": f.abort_percent}
    m = plan.route.mirror if plan.route else None
    if m is not None:
        in_force["mirror"] = {"host": m.host, "subset": m.subset or None, "port": m.port or None,
                              "percent": plan.route.mirror_percent if plan.route else 100.0}
    if plan.route is not None and plan.route.cors is not None:
        in_force["cors"] = {"allow_origins": [o.to_doc() for o in plan.route.cors.allow_origins]}
    if plan.path is not None:
        in_force["rewrite_path"] = plan.path
    if plan.authority is not None:
        in_force["rewrite_authority"] = plan.authority
    walk["in_force"] = in_force
    eps = plan.endpoints
    od = plan.outlier
    state: LiveState | None = {}
    candidates = eps
    if od is not None:
        answer = ask() if ask is not None else AgentAnswer("", error="the agent was not asked")
        state, state_from = _live_state(answer, src.node, plan.balancer_key)
        walk["outlier_detection"] = {
            "consecutive_5xx": od.consecutive_5xx, "consecutive_gateway": od.consecutive_gateway,
            "base_ejection_s": od.base_ejection_s, "max_ejection_percent": od.max_ejection_percent,
            "state_known": state is not None,
            "state_from": state_from if state is not None else None,
            "error": state_from if state is None else None,
        }
        live = state or {}
        candidates = keep_available(eps, lambda k: bool(live.get(k, {}).get("ejected")), od)
        if plan.locality_lb:
            candidates = routing.by_locality(candidates, src.locality)
            walk["locality"] = {"source": src.locality or None,
                                "candidates": sorted({e.locality for e in candidates})}
    walk["endpoints"] = [
        {"workload": e.workload, "address": f"{e.address}:{e.port}", "node": e.node,
         "health": e.health.value, "weight": e.weight, "locality": e.locality or None,
         "ejection": (None if od is None else {"state": "unknown"} if state is None
                      else _ejection_doc(state.get((e.address, e.port)))),
         "candidate": e in candidates}
        for e in eps]
    if not eps:
        walk["outcome"] = {"answer": 503, "response_flags": "UH", "why": "no healthy endpoint"}
        return walk
    if not candidates:
        walk["outcome"] = {"answer": 503, "response_flags": "UH",
                           "why": "every endpoint is ejected by outlier detection"}
        return walk
    ch = plan.consistent_hash
    key = routing.hash_key(ch, facts, src.address) if ch is not None else None
    if ch is not None and key is not None:
        pick = Hashers().pick(plan.balancer_key, candidates, ch.algorithm, ch.size, key)
        policy, note = f"consistentHash ({ch.algorithm}, {ch.key} {ch.name})".replace(" )", ")"), \
            "the same key always goes here while the endpoints stay the same"
    else:
        pick = Balancer(random.Random(0)).pick(plan.balancer_key, plan.policy, candidates)
        policy = plan.policy.value
        note = "a new proxy's first pick; a running proxy continues its own sequence"
        if ch is not None:
            note = "no hash key in the request: " + note
    if state is None:
        note += "; the ejection state is unknown: this pick assumes no endpoint is ejected"
    assert pick is not None
    walk["balancer"] = {"policy": policy, "pick": f"{pick.workload} ({pick.address}:{pick.port})",
                        "note": note}
    _peer_authentication(walk, snap, pick, agent_config)
    _request_authentication(walk, snap, pick, proto is not Protocol.TCP, _root(agent_config))
    denied = _authorization(walk, snap, src, pick, method, plan.path or facts.path, u.netloc, headers,
                            proto is not Protocol.TCP, trust_domain, normalization, _root(agent_config))
    if denied is not None:
        walk["outcome"] = denied
        return walk
    _rate_limits(walk, snap, pick)
    walk["outcome"] = {"answer": "forwarded", "to": pick.workload,
                       "via": ("plain TCP from the node (a ServiceEntry's MESH_EXTERNAL endpoint: no agent "
                               "there)" if pick.external
                               else "HBONE mTLS tunnel" if pick.node != src.node
                               else "a direct connection (same node)")}
    return walk


def _root(cfg: AgentConfig | None) -> str:
    return cfg.mesh.root_namespace if cfg is not None else authz.DEFAULT_ROOT_NAMESPACE


_PLAINTEXT = {"STRICT": "refused (dropped by the tc filter before the pod sees it)",
              "PERMISSIVE": "delivered (counted as plaintext)", "DISABLE": "delivered (not counted)"}


def _peer_authentication(walk: dict[str, Any], snap: Snapshot, pick: Endpoint,
                         cfg: AgentConfig | None) -> None:
    """The mode in force for the picked endpoint's port (:func:`agent.node.peer_auth_decision`,
    as its node decides it) and which resource set it. It judges what reaches the pod from
    outside the mesh; this request comes from the node proxy and passes in every mode."""
    w = snap.workloads.get((pick.namespace, pick.workload))
    if w is None:
        return
    pa = cfg.peer_authentication if cfg is not None else PeerAuthConfig()
    root = _root(cfg)
    mode, set_by = peer_auth_decision(snap.peer_authentications.values(), w, pa, root).mode_of(pick.port)
    walk["peer_authentication"] = {
        "workload": f"{w.namespace}/{w.name}", "port": pick.port, "mode": mode, "set_by": set_by,
        "agent_yaml": "read" if cfg is not None else "not given (--agent-config): its defaults assumed",
        "plaintext": _PLAINTEXT[mode], "this_request": "passes: delivered by the node proxy",
        "warnings": sorted(f"{p.ref}: a selector in the root namespace ({root}) is ignored"
                           for p in snap.peer_authentications.values() if p.namespace == root and p.selector),
    }


def _request_authentication(walk: dict[str, Any], snap: Snapshot, pick: Endpoint, http: bool,
                            root: str = authz.DEFAULT_ROOT_NAMESPACE) -> None:
    """The picked endpoint's RequestAuthentications: the issuers its node accepts, and whether
    a request without a token gets through (its AuthorizationPolicies decide: a policy reading
    the request principal or ``request.auth.*`` needs one). Tokens are not verified here."""
    w = snap.workloads.get((pick.namespace, pick.workload))
    if w is None or not http:
        return
    ras = authz.applicable(sorted(snap.request_authentications.values(), key=lambda r: (r.namespace, r.name)),
                           w.namespace, w.labels, root)
    if not ras:
        return
    policies = authz.applicable(snap.authorization_policies.values(), w.namespace, w.labels, root)
    needs = sorted(f"{p.namespace}/{p.name}" for p in policies if any(
        any(s.request_principals or s.not_request_principals for s in r.sources or ())
        or any(c.key.startswith("request.auth.") for c in r.when) for r in p.rules))
    walk["jwt"] = {
        "workload": f"{w.namespace}/{w.name}",
        "request_authentications": [f"{r.namespace}/{r.name}" for r in ras],
        "issuers": [j.issuer for j in reqauthn.rules_of(ras)],
        "token": "required" if needs else "optional",
        "required_by": needs,
    }


def _rate_limits(walk: dict[str, Any], snap: Snapshot, pick: Endpoint) -> None:
    """The RateLimitPolicies in force at the picked endpoint's port (judged by its node after
    authorization; whether a token is left is the agents' state: ``nodemesh status``)."""
    w = snap.workloads.get((pick.namespace, pick.workload))
    if w is None:
        return
    found = [p for _, p in sorted(snap.rate_limit_policies.items()) if pick.port in pod_ports(snap, p, w)]
    if found:
        walk["ratelimit"] = {"workload": f"{w.namespace}/{w.name}", "policies": [
            {"name": f"{p.namespace}/{p.name}", "scope": p.scope, "limits": rate_limit_summary(p),
             "source": p.source or None} for p in found]}


def _authorization(
    walk: dict[str, Any], snap: Snapshot, src: Workload, pick: Endpoint, method: str, path: str, host: str,
    headers: dict[str, str], http: bool, trust_domain: str, normalization: PathNormalization,
    root: str = authz.DEFAULT_ROOT_NAMESPACE,
) -> dict[str, Any] | None:
    """The picked endpoint's AuthorizationPolicies on this request, as its node judges it
    (:mod:`agent.dataplane.authorize`); the outcome if denied, else None."""
    w = snap.workloads.get((pick.namespace, pick.workload))
    if w is None:
        return None
    policies = authz.applicable(sorted(snap.authorization_policies.values(),
                                       key=lambda p: (p.namespace, p.name)), w.namespace, w.labels, root)
    doc: dict[str, Any] = {"workload": f"{w.namespace}/{w.name}",
                           "policies": [f"{p.namespace}/{p.name} ({p.action})" for p in policies]}
    walk["authorization"] = doc
    if not policies:
        doc["decision"] = "allowed: no AuthorizationPolicy applies"
        return None
    if http:
        try:
            check_method(method)
            path = normalize_path(path, normalization, allow_asterisk=method == "OPTIONS")
        except NormalizationError as e:
            doc["decision"] = f"refused before authorization: {e.reason}"
            return {"answer": 400, "response_flags": "-", "why": e.reason}
        doc["path_matched"] = path.partition("?")[0]
    else:
        doc["warnings"] = [f"{p.namespace}/{p.name}: {f} cannot be judged on a TCP port"
                           for p in policies for f in authz.l7_only_fields(p)]
    facts = authz.Facts(
        principal=f"{trust_domain}/ns/{src.namespace}/sa/{src.service_account}", namespace=src.namespace,
        source_ip=src.address, remote_ip=src.address, destination_ip=pick.address,
        destination_port=pick.port, http=http, method=method, path=path.partition("?")[0], host=host,
        headers=join_headers(headers.items()),
    )
    v = authz.evaluate(policies, facts)
    doc["decision"] = ("allowed" if v.allowed else "denied") + f": {v.why}"
    if v.audited:
        doc["audited"] = list(v.audited)
    if v.allowed:
        return None
    if http:
        return {"answer": 403, "response_flags": DENIED_FLAG, "why": f"{DENIED_BODY} ({v.why})"}
    return {"answer": "connection reset", "response_flags": DENIED_FLAG, "why": v.why}


def _vs_doc(vs: Any, hit: Any) -> dict[str, Any] | None:
    if vs is None:
        return None
    doc: dict[str, Any] = {"name": f"{vs.namespace}/{vs.name}", "source": vs.source or None}
    if hit is None:
        doc["route"] = None
        doc["why"] = "no route matched"
    else:
        i, route, _ = hit
        doc["route"] = {"index": i, "name": route.name or None}
    return doc


def _text(walk: dict[str, Any]) -> str:
    lines = [f"request:    {walk['request']['method']} {walk['request']['url']}"
             + "".join(f" -H '{k}: {v}'" for k, v in walk["request"]["headers"].items()),
             f"from:       {walk['source']['workload']} ({walk['source']['address']}, "
             f"node {walk['source']['node']})",
             f"capture:    {walk['capture']}"]
    if "protocol" in walk:
        lines.append(f"protocol:   {walk['protocol']}")
    if "virtual_service" in walk:
        vs = walk["virtual_service"]
        if vs is None:
            lines.append("route:      no VirtualService for this service: to the service itself")
        elif vs["route"] is None:
            lines.append(f"route:      VirtualService {vs['name']} ({vs['source']}): {vs['why']}")
        else:
            lines.append(f"route:      VirtualService {vs['name']} ({vs['source']}) "
                         f"http[{vs['route']['index']}] {vs['route']['name'] or ''}".rstrip())
    for d in walk.get("destinations", ()):
        sub = f" subset {d['subset']}" if d["subset"] else ""
        lines.append(f"  weight {d['weight']:>3}: {d['host']}{sub}")
    if "destination" in walk:
        d = walk["destination"]
        subset = f" subset {d['subset']}" if d["subset"] else ""
        lines.append(f"destination: {d['service']} port {d['port']}{subset} ({d['picked']})")
    if walk.get("in_force"):
        lines.append("in force:   " + "; ".join(f"{k} {v}" for k, v in walk["in_force"].items()))
    if "outlier_detection" in walk:
        od = walk["outlier_detection"]
        rule = (f"consecutive5xxErrors {od['consecutive_5xx']}, baseEjectionTime {od['base_ejection_s']}s, "
                f"maxEjectionPercent {od['max_ejection_percent']}")
        lines.append(f"outliers:   {rule}; "
                     + (f"state from {od['state_from']}" if od["state_known"]
                        else f"state UNKNOWN: {od['error']}"))
    if "locality" in walk:
        loc = walk["locality"]
        lines.append(f"locality:   from {loc['source'] or '(none)'}: candidates in "
                     f"{', '.join(x or '(none)' for x in loc['candidates']) or '(none)'}")
    for e in walk.get("endpoints", ()):
        loc = f" locality {e['locality']}" if e["locality"] else ""
        lines.append(f"  endpoint: {e['workload']} {e['address']} node {e['node']} {e['health']} "
                     f"weight {e['weight']}{loc}{_ejection_text(e['ejection'])}{_not_candidate(e)}")
    if "balancer" in walk:
        b = walk["balancer"]
        lines.append(f"balancer:   {b['policy']} -> {b['pick']} ({b['note']})")
    if "peer_authentication" in walk:
        m = walk["peer_authentication"]
        lines.append(f"mtls:       at {m['workload']} port {m['port']}: {m['mode']} (set by {m['set_by']}"
                     + ("" if m["agent_yaml"] == "read" else "; agent.yaml not read: its defaults assumed")
                     + f"); plaintext from outside the mesh: {m['plaintext']}; "
                     f"this request {m['this_request']}")
        lines += [f"  WARNING: {x}" for x in m["warnings"]]
    if "jwt" in walk:
        j = walk["jwt"]
        names = ", ".join(j["request_authentications"])
        lines.append(f"jwt:        at {j['workload']}: RequestAuthentication {names} "
                     f"(issuers {', '.join(j['issuers'])}): an invalid token is 401; "
                     + (f"a token is required (AuthorizationPolicy {', '.join(j['required_by'])} reads the "
                        "request principal)" if j["token"] == "required"
                        else "a token is optional (without one: no request principal)"))
    if "authorization" in walk:
        a = walk["authorization"]
        lines.append(f"authz:      at {a['workload']}: {', '.join(a['policies']) or 'no policy'}; "
                     f"{a.get('decision', '')}")
        lines += [f"  WARNING: {x}" for x in a.get("warnings", ())]
    if "ratelimit" in walk:
        r = walk["ratelimit"]
        lines.append(f"ratelimit:  at {r['workload']}: " + "; ".join(
            f"{p['name']} ({p['scope']}: {p['limits']})" for p in r["policies"])
            + ": over a limit the answer is 429 (RL); tokens left: nodemesh status")
    o = walk["outcome"]
    lines.append("outcome:    " + ", ".join(f"{k} {v}" for k, v in o.items()))
    return "\n".join(lines)


def _ejection_text(ej: dict[str, Any] | None) -> str:
    if ej is None:
        return ""
    if ej["state"] == "unknown":
        return " ejection state unknown"
    if ej["state"] == "ejected":
        until = str(ej["until"]).replace("T", " ")
        return f" ejected (until {until}, {_ordinal(ej['ejections'])} ejection)"
    n = ej["consecutive_5xx"]
    return " ok" + (f" ({n} consecutive 5xx)" if n else "")


def _not_candidate(e: dict[str, Any]) -> str:
    if e["candidate"]:
        return ""
    ejected = e["ejection"] is not None and e["ejection"]["state"] == "ejected"
    return " (not a candidate)" if ejected else " (not a candidate: a nearer locality has endpoints)"


@click.command("explain")
@click.option("--from", "source", required=True, help="source workload: NAME or NAMESPACE/NAME")
@click.argument("method")
@click.argument("url")
@click.option("-H", "--header", "headers", multiple=True, help="'Name: value' (repeatable)")
@registry_options
@ADMIN_OPTION
@NODE_OPTION
@NETNS_OPTION
@click.option("--trust-domain", default="cluster.local", show_default=True,
              help="the mesh's trust domain (principals in AuthorizationPolicies)")
@click.option("--path-normalization", type=click.Choice([m.value for m in PathNormalization]),
              default=PathNormalization.BASE.value, show_default=True,
              help="the destination agents' http.path_normalization")
@click.option("--agent-config", "agent_config_path", default=None, type=click.Path(dir_okay=False),
              help="the destination node's agent.yaml: its peer_authentication default and "
                   "mesh.root_namespace")
@OUTPUT_OPTION
@handled
def explain_cmd(source: str, method: str, url: str, headers: tuple[str, ...], registry_dir: str,
                etcd_url: str | None, admin: str, node: str | None, netns: str | None, trust_domain: str,
                path_normalization: str, agent_config_path: str | None, output: str) -> None:
    """Print the walk of one request (capture, route, destination, endpoints, pick), sending nothing.

    With outlierDetection in force, the source workload's node agent is asked for its ejection
    state (--admin, or --node for a remote node's health port; --netns to ask from a namespace)."""
    hs: dict[str, str] = {}
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise UserError(f"header {h!r} is not 'Name: value'")
        hs[name.strip().lower()] = value.strip()
    snap, _ = _read(registry_dir, etcd_url)
    agent_config = config_mod.load(agent_config_path) if agent_config_path else None
    walk = explain(snap, source, method.upper(), url, hs, lambda: ask_agent(admin, node, netns), trust_domain,
                   PathNormalization(path_normalization), agent_config)
    if output == "json":
        emit_json(walk)
    else:
        click.echo(_text(walk))
