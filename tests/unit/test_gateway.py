"""The Gateway kind (validation, apply, snapshot) and the pure rules of gateway routing."""

from __future__ import annotations

import contextlib
import ipaddress
import random
import ssl

import pytest

from agent import config as config_mod
from agent.control import apply as apply_mod
from agent.control.errors import InputError
from agent.control.gateway import (
    Gateway,
    GatewayHost,
    gateway_doc,
    gateway_from_doc,
    host_match,
    host_of,
    name_match,
)
from agent.control.istio import virtual_service_doc, virtual_service_from_doc
from agent.control.snapshot import SnapshotBuilder
from agent.control.validate import parse_yaml
from agent.dataplane import gatewayplan
from agent.dataplane.http.exchange import LocalReply
from agent.proto.tls_hello import NEED_MORE, NotTls, client_hello_sni

NET = ipaddress.ip_network("10.96.0.0/16")
SEED = "tests/fixtures/seed"


def parse(text: str, file: str = "gw.yaml") -> list[object]:
    return [loc.resource for loc in parse_yaml(text, file, NET)]


def gw_yaml(
    servers: str, name: str = "gw", ns: str = "default", selector: str = "{istio: ingressgateway}"
) -> str:
    return (
        f"apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec:\n  selector: {selector}\n  servers:\n{servers}"
    )


HTTP80 = "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n"


def test_seed_files_parse_as_written() -> None:
    for version_file in ("gateway.yaml", "virtualservice.yaml"):
        with open(f"{SEED}/{version_file}") as f:
            (r,) = parse(f.read(), version_file)
        assert r is not None
    with open(f"{SEED}/gateway.yaml") as f:
        (gw,) = parse(f.read())
    assert isinstance(gw, Gateway)
    assert gw.selector == (("istio", "ingressgateway"),)
    (s,) = gw.servers
    assert (s.port, s.port_name, s.protocol, s.hosts) == (
        80,
        "http",
        "HTTP",
        (GatewayHost("*", "my-service"),),
    )
    assert gateway_from_doc(gateway_doc(gw)) == gw


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_api_versions(version: str) -> None:
    (gw,) = parse(gw_yaml(HTTP80).replace("networking.istio.io/v1", f"networking.istio.io/{version}"))
    assert isinstance(gw, Gateway)


def test_servers_all_kinds_and_host_forms() -> None:
    (gw,) = parse(
        gw_yaml(
            "  - port: {number: 443, name: https, protocol: HTTPS}\n"
            "    hosts: ['./a.example.com', 'shop/*.example.com', '*/b.example.com', c.example.com]\n"
            "    tls: {mode: MUTUAL, credentialName: shop-cert, minProtocolVersion: TLSV1_3}\n"
            "  - port: {number: 8443, name: tls, protocol: TLS}\n    hosts: ['*']\n"
            "    tls: {mode: PASSTHROUGH}\n"
            "  - port: {number: 9000, name: tcp, protocol: TCP}\n    hosts: ['*']\n"
            "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n"
            "    tls: {httpsRedirect: true}\n"
        )
    )
    assert isinstance(gw, Gateway)
    https = gw.servers[0]
    assert [(h.namespace, h.host) for h in https.hosts] == [
        (".", "a.example.com"),
        ("shop", "*.example.com"),
        ("*", "b.example.com"),
        ("*", "c.example.com"),
    ]
    assert https.tls is not None and (
        https.tls.mode,
        https.tls.credential_name,
        https.tls.min_protocol_version,
    ) == ("MUTUAL", "shop-cert", "TLSV1_3")
    assert gw.servers[3].tls is not None and gw.servers[3].tls.https_redirect
    assert gateway_from_doc(gateway_doc(gw)) == gw


@pytest.mark.parametrize(
    ("servers", "path", "reason"),
    [
        (
            "  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: ISTIO_MUTUAL}\n",
            "spec.servers[0].tls.mode",
            "ISTIO_MUTUAL",
        ),
        (
            "  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n"
            "    tls: {mode: OPTIONAL_MUTUAL, credentialName: x}\n",
            "spec.servers[0].tls.mode",
            "OPTIONAL_MUTUAL",
        ),
        (
            "  - port: {number: 80, protocol: GRPC}\n    hosts: ['*']\n",
            "spec.servers[0].port.protocol",
            "GRPC",
        ),
        (
            "  - port: {number: 80, protocol: FTP}\n    hosts: ['*']\n",
            "spec.servers[0].port.protocol",
            "unknown protocol",
        ),
        (
            "  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: SIMPLE}\n",
            "spec.servers[0].tls.credentialName",
            "needs credentialName",
        ),
        (
            "  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n",
            "spec.servers[0].tls",
            "SIMPLE or MUTUAL",
        ),
        (
            "  - port: {number: 443, protocol: TLS}\n    hosts: ['*']\n",
            "spec.servers[0].tls",
            "a TLS server needs tls.mode",
        ),
        (
            "  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n"
            "    tls: {mode: SIMPLE, credentialName: x, serverCertificate: /a.pem}\n",
            "spec.servers[0].tls.serverCertificate",
            "serverCertificate is not supported yet",
        ),
        (
            "  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n"
            "    tls: {mode: SIMPLE, credentialName: x, minProtocolVersion: TLSV1_0}\n",
            "spec.servers[0].tls.minProtocolVersion",
            "TLSV1_0",
        ),
        (
            "  - port: {number: 80, protocol: HTTP}\n    hosts: ['*']\n    bind: 0.0.0.0\n",
            "spec.servers[0].bind",
            "bind is not supported yet",
        ),
        (
            "  - port: {number: 80, protocol: HTTP, targetPort: 8080}\n    hosts: ['*']\n",
            "spec.servers[0].port.targetPort",
            "targetPort",
        ),
        (
            "  - port: {number: 15008, protocol: TCP}\n    hosts: ['*']\n",
            "spec.servers[0].port.number",
            "agent's own ports",
        ),
        ("  - port: {number: 80, protocol: HTTP}\n    hosts: []\n", "spec.servers[0].hosts", "non-empty"),
        (
            "  - port: {number: 80, protocol: HTTP}\n    hosts: ['bad host']\n",
            "spec.servers[0].hosts[0]",
            "not a host name",
        ),
        (
            "  - port: {number: 80, protocol: HTTP}\n    hosts: ['Bad_NS/x.com']\n",
            "spec.servers[0].hosts[0]",
            "not a valid name",
        ),
        (
            "  - port: {number: 80, protocol: HTTP}\n    hosts: ['*']\n"
            "  - port: {number: 80, protocol: TCP}\n    hosts: ['*']\n",
            "spec.servers[1].port.number",
            "one port serves one protocol",
        ),
        (
            "  - port: {number: 80, protocol: TCP}\n    hosts: ['*']\n    tls: {httpsRedirect: true}\n",
            "spec.servers[0].tls.httpsRedirect",
            "HTTP servers",
        ),
    ],
)
def test_refused_by_name_with_line(servers: str, path: str, reason: str) -> None:
    with pytest.raises(InputError) as e:
        parse(gw_yaml(servers))
    assert e.value.path == path
    assert reason in str(e.value)
    assert e.value.file == "gw.yaml" and e.value.line is not None and e.value.line >= 6


VS_GW = """apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web.example.com]
  gateways: [%s]
  http:
  - route: [{destination: {host: web}}]
"""
SVC = """apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80, protocol: http}], selector: {app: web}}
"""


def test_apply_refuses_a_virtualservice_naming_an_unknown_gateway() -> None:
    res = parse_yaml(SVC + "---\n" + VS_GW % "other/gw", "vs.yaml", NET)
    with pytest.raises(InputError) as e:
        apply_mod.plan({}, res, NET)
    assert e.value.path == "spec.gateways[0]" and "unknown gateway 'other/gw'" in str(e.value)
    assert e.value.line == 11
    ok = parse_yaml(SVC + "---\n" + VS_GW % "gw, mesh" + "---\n" + gw_yaml(HTTP80), "all.yaml", NET)
    p = apply_mod.plan({}, ok, NET)
    assert any("gateway/default/gw" in k for k in p.puts)
    b = SnapshotBuilder()
    b.apply(p.puts, [])
    snap = b.build(1)
    assert ("default", "gw") in snap.gateways and snap.virtual_services[("default", "web")].gateways == (
        "gw",
        "mesh",
    )
    # a stored Gateway is known to a later input
    later = apply_mod.plan(p.puts, parse_yaml(VS_GW % "default/gw", "vs.yaml", NET), NET)
    assert later.configured == ("VirtualService default/web",)


def test_virtualservice_tls_routes() -> None:
    (vs,) = parse(
        VS_GW
        % "gw".replace("http:\n  - route: [{destination: {host: web}}]\n", "")
        + "  tls:\n  - match: [{sniHosts: [a.example.com], port: 443}]\n"
        "    route: [{destination: {host: web, port: {number: 443}}}]\n"
    )
    assert vs.tls[0].matches[0].sni_hosts == ("a.example.com",)  # type: ignore[attr-defined]
    assert virtual_service_from_doc(virtual_service_doc(vs)) == vs  # type: ignore[arg-type]
    mesh_tls = (
        VS_GW % "mesh"
    ) + "  tls:\n  - match: [{sniHosts: [a.example.com]}]\n    route: [{destination: {host: web}}]\n"
    with pytest.raises(InputError) as e:
        parse(mesh_tls)
    assert e.value.path == "spec.tls" and "Gateway" in str(e.value)
    with pytest.raises(InputError) as e:
        parse((VS_GW % "gw") + "  tls:\n  - match: [{port: 443}]\n    route: [{destination: {host: web}}]\n")
    assert e.value.path == "spec.tls[0].match[0].sniHosts"


def test_host_rules() -> None:
    assert name_match("*", "anything")
    assert name_match("*.example.com", "a.example.com") and name_match("*.example.com", "a.b.example.com")
    assert not name_match("*.example.com", "example.com")
    assert not name_match("a.example.com", "b.example.com")
    assert host_of("My-Service:8080") == "my-service" and host_of("[::1]:80") == "[::1]"
    assert host_of("web.example.com.") == "web.example.com"
    assert host_match("my-service", "my-service", "default")
    assert host_match("my-service", "my-service.default.svc.cluster.local", "default")
    assert host_match("my-service", "my-service.default", "default")
    assert not host_match("my-service", "my-service.shop", "default")
    assert host_match("*.example.com", "x.example.com", "default")


def _table(
    gateways: str, vss: str, labels: dict[str, str] | None = None, reserved: frozenset[int] = frozenset()
) -> gatewayplan.GatewayTable:
    res = parse_yaml(SVC + "---\n" + gateways + "---\n" + vss, "t.yaml", NET)
    b = SnapshotBuilder()
    b.apply(apply_mod.plan({}, res, NET).puts, [])
    return gatewayplan.GatewayTable.build(b.build(1), labels or {"istio": "ingressgateway"}, reserved)


def _vs(name: str, ns: str, hosts: str, gateways: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec:\n  hosts: [{hosts}]\n  gateways: [{gateways}]\n"
        "  http:\n  - route: [{destination: {host: web.default.svc.cluster.local}}]\n---\n"
    )


def test_http_target_by_host_server_and_namespace() -> None:
    shop_svc = SVC.replace("name: web}", "name: web, namespace: shop}")
    t = _table(
        gw_yaml(
            "  - port: {number: 80, protocol: HTTP}\n    hosts: ['./a.example.com', 'shop/*.shop.com', "
            "'my-service']\n  - port: {number: 8080, protocol: HTTP}\n    hosts: ['*']\n"
            "    tls: {httpsRedirect: true}\n"
        ),
        _vs("a", "default", "a.example.com", "gw")
        + _vs("s", "shop", "x.shop.com", "default/gw")
        + _vs("wrongns", "other", "y.shop.com", "default/gw")
        + _vs("seed", "default", "my-service", "gw")
        + shop_svc.replace("Service\n", "Service\n", 1),
    )
    assert gatewayplan.http_target(t, 80, "a.example.com:80").vs is not None
    hit = gatewayplan.http_target(t, 80, "x.shop.com")
    assert hit.vs is not None and hit.vs.name == "s"
    assert gatewayplan.http_target(t, 80, "my-service").vs is not None
    for host in ("b.example.com", "y.shop.com", "unknown"):  # no server host / namespace not allowed
        with pytest.raises(LocalReply) as e:
            gatewayplan.http_target(t, 80, host)
        assert (e.value.status, e.value.flag) == (404, "NR")
    with pytest.raises(LocalReply):
        gatewayplan.http_target(t, 81, "a.example.com")
    redirect = gatewayplan.http_target(t, 8080, "a.example.com")
    assert redirect.vs is None
    r = gatewayplan.https_redirect("a.example.com:8080", "/p?q=1")
    assert r.status == 301 and r.headers == ((b"location", b"https://a.example.com/p?q=1"),)


def test_selector_and_port_clashes() -> None:
    gws = (
        gw_yaml(HTTP80, "one")
        + "---\n"
        + gw_yaml("  - port: {number: 80, protocol: TCP}\n    hosts: ['*']\n", "two")
        + "---\n"
        + gw_yaml(HTTP80.replace("80", "81"), "other", selector="{istio: egress}")
        + "---\n"
        + gw_yaml(HTTP80.replace("80", "9001"), "own")
    )
    t = _table(gws, _vs("a", "default", "a.example.com", "one"), reserved=frozenset({9001}))
    assert set(t.ports) == {80} and t.ports[80].kind == "http"
    assert any("Gateway default/two port 80" in r and "already a http server" in r for r in t.refused)
    assert any("Gateway default/own port 9001" in r for r in t.refused)
    assert _table(gws, "", {"istio": "nothing"}).ports == {}


def test_tls_target_by_sni() -> None:
    t = _table(
        gw_yaml(
            "  - port: {number: 443, protocol: TLS}\n    hosts: ['*.example.com']\n"
            "    tls: {mode: PASSTHROUGH}\n"
        ),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: p}\n"
        "spec:\n  hosts: ['*.example.com']\n  gateways: [gw]\n  tls:\n"
        "  - match: [{sniHosts: [a.example.com]}]\n"
        "    route: [{destination: {host: web, port: {number: 80}}}]\n",
    )
    d = gatewayplan.tls_target(t, 443, "a.example.com", random.Random(1))
    assert d.service.name == "web" and d.port == 80
    for sni in ("b.example.com", "", "a.other.com"):
        with pytest.raises(LocalReply) as e:
            gatewayplan.tls_target(t, 443, sni, random.Random(1))
        assert e.value.flag == "NR"


def _hello(sni: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_client_hello_sni_whole_and_byte_by_byte() -> None:
    hello = _hello("My.Example.com")
    assert client_hello_sni(hello) == "my.example.com"
    assert client_hello_sni(hello + b"trailing") == "my.example.com"
    for i in range(len(hello)):
        assert client_hello_sni(hello[:i]) is NEED_MORE
    assert client_hello_sni(_hello(None)) == ""
    for bad in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x00\x01\x02", b"\x15\x03\x01\x00\x05hello"):
        with pytest.raises(NotTls):
            client_hello_sni(bad)


def test_client_hello_sni_never_raises_other_errors() -> None:
    rng = random.Random(7)
    hello = _hello("a.example.com")
    for _ in range(3000):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(5, len(data))] = rng.randrange(256)
        with contextlib.suppress(NotTls):
            client_hello_sni(bytes(data))


def test_agent_config_gateway_section() -> None:
    base = {"node": "n1", "addresses": {"proxy": "10.0.0.1"}}
    assert config_mod.from_mapping(base).gateway is None
    cfg = config_mod.from_mapping(
        {
            **base,
            "gateway": {
                "labels": {"istio": "ingressgateway"},
                "address": "10.0.0.9",
                "credentials_dir": "/c",
            },
        }
    )
    g = cfg.gateway
    assert g is not None and (g.address, g.credentials_dir, g.namespace) == ("10.0.0.9", "/c", "istio-system")
    for bad, where in (
        ({"address": "10.0.0.9"}, "gateway.labels"),
        ({"labels": {"a": "b"}, "address": "x"}, "gateway.address"),
        ({"labels": {"a": "b"}, "address": "10.0.0.9", "port": 1}, "gateway.port"),
        ({"labels": {"a": "b"}, "address": "10.0.0.9", "namespace": "Bad"}, "gateway.namespace"),
    ):
        with pytest.raises(config_mod.ConfigError) as e:
            config_mod.from_mapping({**base, "gateway": bad})
        assert where in str(e.value)


def _self_signed(cn: str) -> tuple[bytes, bytes]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(k, hashes.SHA256())
    )
    key = k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key


def test_credentials_reload_on_change_keep_the_last_good_and_take_time_as_input(tmp_path: object) -> None:
    import os

    from agent.control.gateway import ServerTls
    from agent.dataplane.gateway import CREDENTIAL_RECHECK_S, CredentialError, Credentials

    d = str(tmp_path)
    now = [100.0]

    def write(cert: bytes, key: bytes) -> None:
        for name, data in (("c.crt", cert), ("c.key", key)):
            with open(os.path.join(d, f".{name}"), "wb") as f:
                f.write(data)
            os.replace(os.path.join(d, f".{name}"), os.path.join(d, name))

    tls = ServerTls("SIMPLE", "c")
    creds = Credentials(d, clock=lambda: now[0])
    with pytest.raises(CredentialError, match="credential 'c'"):
        creds.context(tls)
    write(*_self_signed("one"))
    first = creds.context(tls)
    write(*_self_signed("two"))
    assert creds.context(tls) is first  # not looked at again yet
    now[0] += CREDENTIAL_RECHECK_S
    second = creds.context(tls)
    assert second is not first and creds.reloads == 1
    cert3, _ = _self_signed("three")
    write(cert3, _self_signed("other")[1])  # a key that does not match: the last good one stays
    now[0] += CREDENTIAL_RECHECK_S
    assert creds.context(tls) is second
    os.remove(os.path.join(d, "c.key"))
    now[0] += CREDENTIAL_RECHECK_S
    assert creds.context(tls) is second
    with pytest.raises(CredentialError, match="No such file"):
        Credentials(d).context(tls)
    with pytest.raises(CredentialError, match=r"c-ca\.crt"):  # MUTUAL needs its CA file too
        write(*_self_signed("four"))
        Credentials(d).context(ServerTls("MUTUAL", "c"))


def test_mesh_in_gateways_keeps_a_bound_virtualservice_for_mesh_traffic_too() -> None:
    from agent.dataplane.http import routing

    for gateways, mesh in (("gw", False), ("gw, mesh", True)):
        t = _table(gw_yaml(HTTP80), _vs("web", "default", "web", gateways))
        assert [v.name for v in t.bound_vs[("default", "gw")]] == ["web"]  # the gateway's, either way
        svc = t.snapshot.services[("default", "web")]
        assert (routing.RouteTable.build(t.snapshot).virtual_service(svc) is not None) is mesh


def test_https_offers_h2_only_where_every_route_leads_to_an_http2_or_grpc_port() -> None:
    grpc_svc = (
        "apiVersion: nodemesh.io/v1\nkind: Service\nmetadata: {name: api}\n"
        "spec: {ports: [{port: 9000, protocol: grpc}], selector: {app: api}}\n---\n"
    )
    https = (
        "  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*.example.com']\n"
        "    tls: {mode: SIMPLE, credentialName: c}\n"
    )
    to_api = _vs("a", "default", "a.example.com", "gw").replace("web.default.svc.cluster.local", "api")
    to_web = _vs("b", "default", "b.example.com", "gw")
    for vss, h2 in ((grpc_svc + to_api, True), (grpc_svc + to_api + to_web, False), (grpc_svc, False)):
        t = _table(gw_yaml(https), vss)
        (sv,) = t.ports[443].servers
        assert gatewayplan.h2_upstream(t, sv) is h2


def test_apply_with_the_gateway_credentials_refuses_a_missing_credential_file(tmp_path: object) -> None:
    import os

    from click.testing import CliRunner

    from agent.cli.main import cli

    d = str(tmp_path)
    creds = os.path.join(d, "creds")
    os.makedirs(creds)
    f = os.path.join(d, "gw.yaml")
    with open(f, "w") as out:
        out.write(
            gw_yaml(
                HTTP80 + "  - port: {number: 443, protocol: HTTPS}\n    hosts: ['*']\n"
                "    tls: {mode: MUTUAL, credentialName: shop}\n"
            )
        )
    for name in ("shop.crt", "shop.key"):
        with open(os.path.join(creds, name), "w") as out:
            out.write("x")
    env = {"NODEMESH_REGISTRY_DIR": os.path.join(d, "reg")}
    r = CliRunner().invoke(cli, ["apply", "-f", f, "--gateway-credentials", creds], env=env)
    assert r.exit_code == 2, r.output
    assert (
        f"{f}:11 at spec.servers[1].tls.credentialName: credential 'shop': no shop-ca.crt in {creds}"
        in r.output
    )
    r = CliRunner().invoke(cli, ["get", "gw", "-A"], env=env)
    assert r.output.strip().splitlines()[1:] == []  # nothing applied
    with open(os.path.join(creds, "shop-ca.crt"), "w") as out:
        out.write("x")
    r = CliRunner().invoke(cli, ["apply", "-f", f], env={**env, "NODEMESH_GATEWAY_CREDENTIALS": creds})
    assert r.exit_code == 0 and "Gateway default/gw created" in r.output, r.output
    r = CliRunner().invoke(cli, ["get", "gw"], env=env)
    assert "80/HTTP,443/HTTPS/MUTUAL" in r.output, r.output


def test_a_tls_server_terminates_with_simple_and_passes_through_otherwise() -> None:
    t = _table(
        gw_yaml(
            "  - port: {number: 9443, protocol: TLS}\n    hosts: ['*']\n"
            "    tls: {mode: SIMPLE, credentialName: c}\n"
            "  - port: {number: 8443, protocol: TLS}\n    hosts: ['*']\n    tls: {mode: PASSTHROUGH}\n"
        ),
        "",
    )
    assert (t.ports[9443].kind, t.ports[8443].kind) == ("tls-terminated", "tls")
    with pytest.raises(InputError) as e:  # one port: terminated or passed through, not both
        parse(
            gw_yaml(
                "  - port: {number: 443, protocol: TLS}\n    hosts: [a.com]\n    tls: {mode: PASSTHROUGH}\n"
                "  - port: {number: 443, protocol: TLS}\n    hosts: [b.com]\n"
                "    tls: {mode: SIMPLE, credentialName: c}\n"
            )
        )
    assert e.value.path == "spec.servers[1].port.number"
