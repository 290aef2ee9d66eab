"""The node agent's configuration file (YAML), validated once at start.

How this works: :func:`load` reads the file and :func:`from_mapping` turns the
document into frozen dataclasses, checking every key: an unknown key, a wrong
type, an address that is not an address or a port out of range raises
:class:`ConfigError` naming the file, the key path and what was expected.
Nothing is started before the whole file is valid.

Example (every key but ``node`` has a default)::

    node: n1
    trust_domain: cluster.local
    addresses:
      proxy: 10.244.1.1        # pods are redirected here (outbound 15001, DNS 15053)
      hbone: 10.250.0.1        # other nodes reach this node's tunnel port (15008) here
      metrics: 10.250.0.1      # Prometheus /metrics on 15020 (default: hbone)
    ports: {outbound: 15001, hbone: 15008, dns: 15053, metrics: 15020, admin: 15000, health: 15021}
    registry:
      backend: embedded        # or etcd
      dir: /var/lib/nodemesh/registry
      # endpoints: [http://10.0.0.5:2379]   (etcd)
    ca:
      dir: /etc/nodemesh/ca    # single host: the agent runs the CA in-process
      # several hosts: service: 10.0.0.5:15012 (nodemesh ca serve) and
      # node_dir: /etc/nodemesh/node (nodemesh ca issue-node); dir is then unused
    interception:
      cgroup: /sys/fs/cgroup/unified/nodemesh   # pods live below this cgroup
      bpffs_root: /sys/fs/bpf/nodemesh
      capture_cidrs: [10.96.0.0/16, 10.244.0.0/16]
      excluded_ports: []
      enroll: [/run/netns/pod-a]               # pod network namespaces to capture
      host_cgroups: [system.slice/my-service.service]  # host services to capture, by the
                               # cgroup they run in (never the agent's own or an ancestor); the
                               # workload of the same name on this node is their identity
    peers: {n2: 10.250.0.2}    # other nodes' HBONE addresses
    peer_authentication:       # inbound plaintext to pods: PERMISSIVE (delivered, counted),
      mode: PERMISSIVE         # STRICT (refused unless it comes from the node proxy), DISABLE
      namespaces: {}           # namespace -> mode
      workloads: {}            # "namespace/name" -> mode (most specific wins)
      udp: allow               # UDP to a STRICT pod: allow (as Istio) or deny
      proxy_mark: 0x4d         # SO_MARK on the proxy's pod-facing sockets: its proof
    mesh:
      root_namespace: istio-system   # Istio's meshConfig.rootNamespace: AuthorizationPolicy,
                                     # PeerAuthentication, RequestAuthentication here are mesh-wide
    cert_ttl_s: 86400          # workload certificate lifetime; renewed at half life
    drain_s: 10                # on stop or restart: how long open connections may finish
    runtime_dir: /run/nodemesh # the restart handoff socket lives here
    dns_upstream: null          # host:port for non-mesh names; none: REFUSED
    outbound_traffic_policy:    # Istio's meshConfig.outboundTrafficPolicy (README: Egress)
      mode: ALLOW_ANY           # or REGISTRY_ONLY: pods reach only mesh services, workloads and
                                # ServiceEntry hosts (others: HTTP 502 NR, TCP reset, counted)
    log_level: info
    limits:                     # what one peer, or all of them, can hold open (see README: limits)
      hbone_handshake_timeout_s: 3   # a TLS handshake on 15008 not done by then: closed
      dns_tcp_idle_timeout_s: 5      # a DNS-over-TCP connection silent this long: closed
      listeners:                # per listener; over a limit a new connection is reset and counted
        hbone: {max_connections: 16384, max_connections_per_peer: 2048}
        # outbound, dns_tcp, admin, metrics, health: the same two keys
    http:                       # the node proxy's HTTP (README: "Which connections are HTTP")
      sniff_timeout_s: 0.1      # undeclared port: a client silent this long is TCP (server-first)
      max_request_line_bytes: 8192    # over: 414
      max_header_bytes: 65536         # over: 431
      max_headers: 100                # over: 431
      idle_timeout_s: 3600            # a keep-alive client connection silent this long: closed
      upstream_idle_timeout_s: 60     # a pooled upstream connection unused this long: closed
      upstream_max_idle_per_endpoint: 64
      retry_buffer_bytes: 1048576     # a request body is copied for a route's retries up to this
                                      # per client connection (over it: forwarded, not retried)
      path_normalization: BASE        # Istio's meshConfig.pathNormalization: NONE, BASE,
                                      # MERGE_SLASHES, DECODE_AND_MERGE_SLASHES (what authorization
                                      # matches and what is forwarded; agent/dataplane/http/normalize.py)
      jwks_refresh_s: 1200            # a RequestAuthentication's jwksUri fetched again this often
                                      # (Istio's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL, 20m)
      access_log:               # one JSON line per request and per TCP connection; off by default
        path: ""                # a file, or "-" for stdout; "" = off
        sampling: 1.0           # fraction of lines kept (errors are always kept)
    gateway:                    # optional: this agent is also an ingress gateway (README: Ingress gateway)
      labels: {istio: ingressgateway}   # Gateways whose selector matches these are served
      address: 10.250.0.1       # the servers' ports listen here
      credentials_dir: /etc/nodemesh/gateway-certs   # <credentialName>.crt, .key, -ca.crt
      name: istio-ingressgateway                     # its workload (metrics, access log) and
      namespace: istio-system                        # identity: spiffe://<td>/ns/<namespace>/sa/
      service_account: istio-ingressgateway-service-account   # <service_account>
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from agent.control.authz import DEFAULT_ROOT_NAMESPACE
from agent.dataplane.gatewayplan import GatewayConfig
from agent.dataplane.http.normalize import PathNormalization
from agent.dataplane.listener import ListenerLimits


class ConfigError(Exception):
    def __init__(self, message: str, *, where: str = "", source: str = "", hint: str | None = None) -> None:
        loc = ": ".join(x for x in (source, where) if x)
        super().__init__(f"{loc}: {message}" if loc else message)
        self.message = str(self)
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Ports:
    outbound: int = 15001
    hbone: int = 15008
    dns: int = 15053
    metrics: int = 15020
    admin: int = 15000
    health: int = 15021


@dataclass(frozen=True, slots=True)
class Addresses:
    proxy: str
    hbone: str
    metrics: str


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    backend: str = "embedded"
    dir: str = "/var/lib/nodemesh/registry"
    endpoints: tuple[str, ...] = ()
    tls_ca: str = ""  # https:// endpoints: the CA of etcd's server cert ("" = system CAs)
    tls_cert: str = ""  # etcd --client-cert-auth: our client certificate and key
    tls_key: str = ""


@dataclass(frozen=True, slots=True)
class InterceptionConfig:
    cgroup: str = ""
    bpffs_root: str = "/sys/fs/bpf/nodemesh"
    capture_cidrs: tuple[str, ...] = ("10.96.0.0/16",)
    excluded_ports: tuple[int, ...] = ()
    enroll: tuple[str, ...] = ()
    host_cgroups: tuple[str, ...] = ()  # relative to the cgroup v2 mount, or absolute


PEER_AUTH_MODES = ("PERMISSIVE", "STRICT", "DISABLE")


@dataclass(frozen=True, slots=True)
class PeerAuthConfig:
    mode: str = "PERMISSIVE"
    namespaces: Mapping[str, str] = field(default_factory=dict)
    workloads: Mapping[str, str] = field(default_factory=dict)  # "ns/name" -> mode
    udp: str = "allow"  # UDP to a STRICT pod: allow | deny
    proxy_mark: int = 0x4D  # SO_MARK of the proxy's pod-facing sockets (bpf/peerauth.py)

    def mode_of(self, namespace: str, name: str) -> str:
        return self.default_of(namespace, name)[0]

    def default_of(self, namespace: str, name: str) -> tuple[str, str]:
        """The mode of a workload where no PeerAuthentication applies, and the key that set it."""
        key = f"{namespace}/{name}"
        if key in self.workloads:
            return self.workloads[key], f"agent.yaml peer_authentication.workloads[{key}]"
        if namespace in self.namespaces:
            return self.namespaces[namespace], f"agent.yaml peer_authentication.namespaces[{namespace}]"
        return self.mode, "agent.yaml peer_authentication.mode"


@dataclass(frozen=True, slots=True)
class MeshConfig:
    root_namespace: str = DEFAULT_ROOT_NAMESPACE  # Istio's meshConfig.rootNamespace


# (max_connections, max_connections_per_peer); a peer of 15001 is a local pod, of 15008 a node
DEFAULT_LISTENER_LIMITS: Mapping[str, tuple[int, int]] = {
    "outbound": (65536, 16384),
    "hbone": (16384, 2048),
    "dns_tcp": (1024, 64),
    "admin": (64, 32),
    "metrics": (128, 32),
    "health": (128, 32),
}


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    listeners: Mapping[str, ListenerLimits] = field(
        default_factory=lambda: {n: ListenerLimits(*v) for n, v in DEFAULT_LISTENER_LIMITS.items()}
    )
    hbone_handshake_timeout_s: float = 3.0
    dns_tcp_idle_timeout_s: float = 5.0

    def of(self, listener: str) -> ListenerLimits:
        return self.listeners.get(listener) or ListenerLimits(*DEFAULT_LISTENER_LIMITS[listener])


@dataclass(frozen=True, slots=True)
class HttpConfig:
    sniff_timeout_s: float = 0.1
    max_request_line_bytes: int = 8192
    max_header_bytes: int = 65536
    max_headers: int = 100
    idle_timeout_s: float = 3600.0
    upstream_idle_timeout_s: float = 60.0
    upstream_max_idle_per_endpoint: int = 64
    retry_buffer_bytes: int = 1 << 20  # Envoy's per_connection_buffer_limit_bytes (0: bodies never retried)
    path_normalization: PathNormalization = PathNormalization.BASE
    jwks_refresh_s: float = 1200.0  # jwksUri keys fetched again this often
    access_log_path: str = ""
    access_log_sampling: float = 1.0


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    addresses: Addresses
    trust_domain: str = "cluster.local"
    ports: Ports = field(default_factory=Ports)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    ca_dir: str = "/etc/nodemesh/ca"
    ca_service: str = ""  # host:port of `nodemesh ca serve` (several hosts); "" = CA in-process
    ca_node_dir: str = ""  # node.crt, node.key, bundle.pem from `nodemesh ca issue-node`
    interception: InterceptionConfig = field(default_factory=InterceptionConfig)
    peers: Mapping[str, str] = field(default_factory=dict)
    dns_upstream: str | None = None
    log_level: str = "info"
    peer_authentication: PeerAuthConfig = field(default_factory=PeerAuthConfig)
    cert_ttl_s: int = 86400
    drain_s: float = 10.0
    runtime_dir: str = "/run/nodemesh"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    gateway: GatewayConfig | None = None  # None: not a gateway
    mesh: MeshConfig = field(default_factory=MeshConfig)
    outbound_traffic_policy: str = "ALLOW_ANY"  # or REGISTRY_ONLY (one of OUTBOUND_MODES)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(message, where=where, source=self.source, hint=hint)

    def mapping(self, doc: Any, where: str, known: set[str]) -> Mapping[str, Any]:
        if doc is None:
            return {}
        if not isinstance(doc, Mapping):
            raise self.fail(where, f"expected a mapping, got {type(doc).__name__}")
        for k in doc:
            if k not in known:
                raise self.fail(
                    f"{where}.{k}" if where else str(k),
                    f"unknown key (expected one of: {', '.join(sorted(known))})",
                )
        return doc

    def string(self, doc: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
        v = doc.get(key, default)
        if not isinstance(v, str) or not v:
            raise self.fail(f"{where}{key}", f"expected a non-empty string, got {v!r}")
        return v

    def address(self, doc: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
        v = self.string(doc, key, where, default)
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise self.fail(f"{where}{key}", f"expected an IP address, got {v!r}") from None

    def port(self, doc: Mapping[str, Any], key: str, where: str, default: int) -> int:
        v = doc.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            raise self.fail(f"{where}{key}", f"expected a port number 1-65535, got {v!r}")
        return v

    def str_list(
        self, doc: Mapping[str, Any], key: str, where: str, default: tuple[str, ...]
    ) -> tuple[str, ...]:
        v = doc.get(key, list(default))
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(f"{where}{key}", f"expected a list of strings, got {v!r}")
        return tuple(v)


def from_mapping(doc: Any, *, source: str = "agent config") -> AgentConfig:
    r = _Reader(source)
    top = r.mapping(
        doc,
        "",
        {
            "node",
            "trust_domain",
            "addresses",
            "ports",
            "registry",
            "ca",
            "interception",
            "peers",
            "dns_upstream",
            "log_level",
            "peer_authentication",
            "cert_ttl_s",
            "drain_s",
            "runtime_dir",
            "limits",
            "http",
            "mesh",
            "gateway",
            "outbound_traffic_policy",
        },
    )
    if "node" not in top:
        raise r.fail("node", "required key is missing")
    node = r.string(top, "node", "")
    td = r.string(top, "trust_domain", "", "cluster.local")
    a = r.mapping(top.get("addresses"), "addresses", {"proxy", "hbone", "metrics"})
    proxy = r.address(a, "proxy", "addresses.")
    hbone = r.address(a, "hbone", "addresses.", proxy)
    addresses = Addresses(proxy=proxy, hbone=hbone, metrics=r.address(a, "metrics", "addresses.", hbone))
    port_keys = ("outbound", "hbone", "dns", "metrics", "admin", "health")
    p = r.mapping(top.get("ports"), "ports", set(port_keys))
    d = Ports()
    ports = Ports(*(r.port(p, k, "ports.", getattr(d, k)) for k in port_keys))
    g = r.mapping(top.get("registry"), "registry", {"backend", "dir", "endpoints", "tls"})
    backend = r.string(g, "backend", "registry.", "embedded")
    if backend not in ("embedded", "etcd"):
        raise r.fail("registry.backend", f"expected 'embedded' or 'etcd', got {backend!r}")
    t = r.mapping(g.get("tls"), "registry.tls", {"ca", "cert", "key"})
    registry = RegistryConfig(
        backend,
        r.string(g, "dir", "registry.", "/var/lib/nodemesh/registry"),
        r.str_list(g, "endpoints", "registry.", ()),
        *(r.string(t, k, "registry.tls.") if k in t else "" for k in ("ca", "cert", "key")),
    )
    if bool(registry.tls_cert) != bool(registry.tls_key):
        missing = "key" if registry.tls_cert else "cert"
        raise r.fail(f"registry.tls.{missing}", "a client certificate and its key go together")
    if backend == "etcd" and not registry.endpoints:
        raise r.fail("registry.endpoints", "the etcd backend needs at least one endpoint URL")
    from agent.control.errors import RegistryError
    from agent.control.etcd import parse_endpoints

    for n, url in enumerate(registry.endpoints):
        try:
            parse_endpoints([url])
        except RegistryError as e:
            raise r.fail(f"registry.endpoints[{n}]", e.message,
                         hint="list every member of the etcd cluster, e.g. http://10.0.0.5:2379") from None
    if registry.endpoints:
        try:
            eps = parse_endpoints(registry.endpoints)
        except RegistryError as e:
            raise r.fail("registry.endpoints", e.message) from None
        if not eps[0].tls and (registry.tls_ca or registry.tls_cert):
            raise r.fail("registry.tls", "TLS files are set but the endpoints are http://",
                         hint="use https:// endpoints, or drop registry.tls")
    c = r.mapping(top.get("ca"), "ca", {"dir", "service", "node_dir"})
    ca_dir = r.string(c, "dir", "ca.", "/etc/nodemesh/ca")
    ca_service = str(c.get("service") or "")
    ca_node_dir = str(c.get("node_dir") or "")
    if ca_service:
        host, sep, port_s = ca_service.rpartition(":")
        if not sep or not host or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
            raise r.fail("ca.service", f"expected host:port of the CA service, got {ca_service!r}")
        if not ca_node_dir:
            raise r.fail(
                "ca.node_dir", "required with ca.service: the directory `nodemesh ca issue-node` wrote"
            )
    i = r.mapping(
        top.get("interception"),
        "interception",
        {"cgroup", "bpffs_root", "capture_cidrs", "excluded_ports", "enroll", "host_cgroups"},
    )
    cidrs = r.str_list(i, "capture_cidrs", "interception.", ("10.96.0.0/16",))
    for n, cidr in enumerate(cidrs):
        try:
            ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as e:
            raise r.fail(
                f"interception.capture_cidrs[{n}]", f"{cidr!r} is not an IPv4 network ({e})"
            ) from None
    excl = i.get("excluded_ports", [])
    if not isinstance(excl, list):
        raise r.fail("interception.excluded_ports", f"expected a list of ports, got {excl!r}")
    excluded = tuple(
        r.port({"p": x}, "p", f"interception.excluded_ports[{n}]", 0) for n, x in enumerate(excl)
    )
    interception = InterceptionConfig(
        cgroup=str(i.get("cgroup", "")),
        bpffs_root=r.string(i, "bpffs_root", "interception.", "/sys/fs/bpf/nodemesh"),
        capture_cidrs=cidrs,
        excluded_ports=excluded,
        enroll=r.str_list(i, "enroll", "interception.", ()),
        host_cgroups=_host_cgroups(r, i),
    )
    peers_doc = top.get("peers") or {}
    if not isinstance(peers_doc, Mapping):
        raise r.fail("peers", "expected a mapping of node name to HBONE address")
    peers = {str(k): r.address(peers_doc, k, "peers.") for k in peers_doc}
    upstream = top.get("dns_upstream")
    if upstream is not None and not isinstance(upstream, str):
        raise r.fail("dns_upstream", f"expected host:port or null, got {upstream!r}")
    level = r.string(top, "log_level", "", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise r.fail("log_level", f"expected debug, info, warning or error, got {level!r}")
    pa = r.mapping(top.get("peer_authentication"), "peer_authentication",
                   {"mode", "namespaces", "workloads", "udp", "proxy_mark"})

    def mode(value: object, where: str) -> str:
        if not isinstance(value, str) or value.upper() not in PEER_AUTH_MODES:
            raise r.fail(where, f"expected one of {', '.join(PEER_AUTH_MODES)}, got {value!r}")
        return value.upper()

    def modes(key: str) -> dict[str, str]:
        doc = pa.get(key) or {}
        if not isinstance(doc, Mapping):
            raise r.fail(f"peer_authentication.{key}", "expected a mapping of name to mode")
        return {str(k): mode(v, f"peer_authentication.{key}.{k}") for k, v in doc.items()}

    udp = pa.get("udp", "allow")
    if not isinstance(udp, str) or udp.lower() not in ("allow", "deny"):
        raise r.fail("peer_authentication.udp", f"expected allow or deny, got {udp!r}")
    proxy_mark = pa.get("proxy_mark", 0x4D)
    if isinstance(proxy_mark, bool) or not isinstance(proxy_mark, int) or not 0 < proxy_mark <= 0xFFFFFFFF:
        raise r.fail("peer_authentication.proxy_mark",
                     f"expected a mark between 1 and 0xffffffff, got {proxy_mark!r}")
    peer_auth = PeerAuthConfig(
        mode(pa.get("mode", "PERMISSIVE"), "peer_authentication.mode"),
        modes("namespaces"),
        modes("workloads"),
        udp.lower(),
        proxy_mark,
    )
    for k in peer_auth.workloads:
        if k.count("/") != 1:
            raise r.fail(f"peer_authentication.workloads.{k}", "expected a key of the form namespace/name")
    ttl = top.get("cert_ttl_s", 86400)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 60 <= ttl <= 7 * 86400:
        raise r.fail("cert_ttl_s", f"expected seconds between 60 and 604800, got {ttl!r}")
    drain = top.get("drain_s", 10)
    if isinstance(drain, bool) or not isinstance(drain, int | float) or not 0 <= drain <= 3600:
        raise r.fail("drain_s", f"expected seconds between 0 and 3600, got {drain!r}")
    limits = _limits(r, top.get("limits"))
    return AgentConfig(
        node=node,
        addresses=addresses,
        trust_domain=td,
        ports=ports,
        registry=registry,
        ca_dir=ca_dir,
        ca_service=ca_service,
        ca_node_dir=ca_node_dir,
        interception=interception,
        peers=peers,
        dns_upstream=upstream,
        log_level=level,
        peer_authentication=peer_auth,
        cert_ttl_s=ttl,
        drain_s=drain,
        runtime_dir=r.string(top, "runtime_dir", "", "/run/nodemesh"),
        limits=limits,
        http=_http(r, top.get("http")),
        mesh=_mesh(r, top.get("mesh")),
        gateway=_gateway(r, top.get("gateway")),
        outbound_traffic_policy=_outbound_mode(r, top.get("outbound_traffic_policy")),
    )


OUTBOUND_MODES = ("ALLOW_ANY", "REGISTRY_ONLY")


def _outbound_mode(r: _Reader, doc: Any) -> str:
    mode = r.mapping(doc, "outbound_traffic_policy", {"mode"}).get("mode", "ALLOW_ANY")
    if mode not in OUTBOUND_MODES:
        raise r.fail("outbound_traffic_policy.mode",
                     f"expected one of {', '.join(OUTBOUND_MODES)}, got {mode!r}")
    return str(mode)


def _gateway(r: _Reader, doc: Any) -> GatewayConfig | None:
    if doc is None:
        return None
    g = r.mapping(doc, "gateway", {f.name for f in fields(GatewayConfig)})
    labels = g.get("labels")
    if not isinstance(labels, Mapping) or not labels or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise r.fail("gateway.labels", f"expected a non-empty mapping of label to value, got {labels!r}",
                     hint="the labels Gateway selectors match, e.g. {istio: ingressgateway}")
    from agent.control.model import NAME_RE

    d = GatewayConfig({}, "")
    names = {}
    for key in ("name", "namespace", "service_account"):
        v = r.string(g, key, "gateway.", getattr(d, key))
        if not NAME_RE.match(v):
            raise r.fail(f"gateway.{key}", f"{v!r} is not a valid name (lowercase letters, digits, '-')")
        names[key] = v
    return GatewayConfig(dict(labels), r.address(g, "address", "gateway."),
                         r.string(g, "credentials_dir", "gateway.", d.credentials_dir), **names)


def _mesh(r: _Reader, doc: Any) -> MeshConfig:
    from agent.control.model import NAME_RE

    m = r.mapping(doc, "mesh", {"root_namespace"})
    root = m.get("root_namespace", DEFAULT_ROOT_NAMESPACE)
    if not isinstance(root, str) or not NAME_RE.match(root):
        raise r.fail("mesh.root_namespace", f"expected a namespace name (lowercase letters, digits, '-'), "
                     f"got {root!r}")
    return MeshConfig(root)


def _host_cgroups(r: _Reader, i: Mapping[str, Any]) -> tuple[str, ...]:
    """interception.host_cgroups: cgroup paths whose last part names the workload (a systemd
    unit ``my-service.service`` is workload ``my-service``)."""
    out = r.str_list(i, "host_cgroups", "interception.", ())
    for n, path in enumerate(out):
        parts = path.strip("/").split("/")
        if not path.strip("/") or ".." in parts or "." in parts:
            raise r.fail(f"interception.host_cgroups[{n}]",
                         f"expected a cgroup path such as system.slice/my-service.service, got {path!r}")
    if len(set(out)) != len(out):
        raise r.fail("interception.host_cgroups", "a cgroup is listed twice")
    return out


def host_workload_name(cgroup: str) -> str:
    """The workload a host cgroup's processes are: its last part without a systemd suffix."""
    leaf = cgroup.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".service", ".scope"):
        if leaf.endswith(suffix):
            return leaf[: -len(suffix)]
    return leaf


def _http(r: _Reader, doc: Any) -> HttpConfig:
    d = HttpConfig()
    top = r.mapping(doc, "http", {f.name for f in fields(HttpConfig) if not f.name.startswith("access_log")}
                    | {"access_log"})

    def number(key: str, lo: float, hi: float, *, whole: bool = False) -> Any:
        v = top.get(key, getattr(d, key))
        ok = isinstance(v, int) if whole else isinstance(v, int | float)
        if isinstance(v, bool) or not ok or not lo <= v <= hi:
            kind = "a whole number" if whole else "a number"
            raise r.fail(f"http.{key}", f"expected {kind} between {lo:g} and {hi:g}, got {v!r}")
        return v if whole else float(v)

    al = r.mapping(top.get("access_log"), "http.access_log", {"path", "sampling"})
    path = al.get("path", "")
    if not isinstance(path, str):
        raise r.fail("http.access_log.path", f"expected a file path or '-' (stdout), got {path!r}")
    sampling = al.get("sampling", 1.0)
    if isinstance(sampling, bool) or not isinstance(sampling, int | float) or not 0 < sampling <= 1:
        raise r.fail("http.access_log.sampling", f"expected a fraction in (0, 1], got {sampling!r}")
    norm = top.get("path_normalization", d.path_normalization.value)
    names = [m.value for m in PathNormalization]
    if norm not in names:
        raise r.fail("http.path_normalization", f"expected one of {', '.join(names)}, got {norm!r}")
    return HttpConfig(
        sniff_timeout_s=number("sniff_timeout_s", 0.001, 10),
        max_request_line_bytes=number("max_request_line_bytes", 256, 1 << 20, whole=True),
        max_header_bytes=number("max_header_bytes", 1024, 1 << 22, whole=True),
        max_headers=number("max_headers", 8, 10_000, whole=True),
        idle_timeout_s=number("idle_timeout_s", 1, 86400),
        upstream_idle_timeout_s=number("upstream_idle_timeout_s", 1, 86400),
        upstream_max_idle_per_endpoint=number("upstream_max_idle_per_endpoint", 0, 100_000, whole=True),
        retry_buffer_bytes=number("retry_buffer_bytes", 0, 1 << 26, whole=True),
        access_log_path=path,
        access_log_sampling=float(sampling),
        path_normalization=PathNormalization(norm),
        jwks_refresh_s=number("jwks_refresh_s", 1, 86400),
    )


def _limits(r: _Reader, doc: Any) -> LimitsConfig:
    top = r.mapping(doc, "limits", {"hbone_handshake_timeout_s", "dns_tcp_idle_timeout_s", "listeners"})
    d = LimitsConfig()

    def seconds(key: str, default: float) -> float:
        v = top.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.1 <= v <= 600:
            raise r.fail(f"limits.{key}", f"expected seconds between 0.1 and 600, got {v!r}")
        return float(v)

    ls = r.mapping(top.get("listeners"), "limits.listeners", set(DEFAULT_LISTENER_LIMITS))
    listeners: dict[str, ListenerLimits] = {}
    for name, (total, per_peer) in DEFAULT_LISTENER_LIMITS.items():
        where = f"limits.listeners.{name}"
        one = r.mapping(ls.get(name), where, {"max_connections", "max_connections_per_peer"})
        values = []
        for key, default in (("max_connections", total), ("max_connections_per_peer", per_peer)):
            v = one.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000_000:
                raise r.fail(f"{where}.{key}", f"expected a number of connections 1-10000000, got {v!r}")
            values.append(v)
        if values[1] > values[0]:
            raise r.fail(f"{where}.max_connections_per_peer",
                         f"{values[1]} is above max_connections ({values[0]})")
        listeners[name] = ListenerLimits(values[0], values[1])
    return LimitsConfig(
        listeners=listeners,
        hbone_handshake_timeout_s=seconds("hbone_handshake_timeout_s", d.hbone_handshake_timeout_s),
        dns_tcp_idle_timeout_s=seconds("dns_tcp_idle_timeout_s", d.dns_tcp_idle_timeout_s),
    )


def load(path: str) -> AgentConfig:
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(
            "file not found", source=path, hint="create it (see README: agent configuration)"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", where=where, source=path) from None
    return from_mapping(doc, source=path)
