"""Istio's ServiceEntry: parsed strictly (file, line and field for every refusal), VIPs allocated
at apply and kept across re-applies, clashes refused (nothing applied), compiled into services
per host (STATIC, DNS, NONE endpoints; MESH_INTERNAL endpoints as the mesh workloads), routed
to by address, answered by the mesh DNS, matched by VirtualServices, shown by the CLI
(get/describe/delete, short name se); outboundTrafficPolicy in agent.yaml and what it captures;
the egress DNS cache."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli.main import cli
from agent.config import ConfigError, from_mapping
from agent.control import dns
from agent.control import dns_wire as w
from agent.control.apply import plan
from agent.control.embedded import EmbeddedBackend
from agent.control.errors import InputError
from agent.control.model import Kind, Workload, resource_key
from agent.control.screening import WorkloadGuard
from agent.control.serviceentry import (
    EntryService,
    ServiceEntry,
    service_entry_doc,
    service_entry_from_doc,
)
from agent.control.snapshot import Snapshot, SnapshotBuilder, healthy_endpoints
from agent.control.validate import Located, parse_vip_range, parse_yaml
from agent.dataplane.egress import DnsCache, Egress, EgressError, Resolver, a_query, capture_cidrs
from agent.dataplane.http.routing import RouteTable, subset_endpoints
from agent.dataplane.lb import Balancer
from agent.dataplane.route import Directory, UnknownDestination, decide

NET = parse_vip_range("10.96.0.0/16")

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec:
  hosts: [api.example.com, example.org]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS, targetPort: 8443}
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - {address: 192.0.2.10, ports: {http: 8080}, labels: {zone: a}, locality: r/z, weight: 3}
  - address: 192.0.2.11
  exportTo: ["*"]
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def parse(text: str, file: str = "se.yaml") -> list[Located]:
    return parse_yaml(text, file, NET)


def entry(text: str = SE) -> ServiceEntry:
    (loc,) = parse(text)
    assert isinstance(loc.resource, ServiceEntry)
    return loc.resource


def snapshot_of(puts: dict[str, str], *workloads: Workload) -> Snapshot:
    b = SnapshotBuilder()
    items = dict(puts)
    items.update({resource_key(Kind.WORKLOAD, x.namespace, x.name): json.dumps(x.to_doc())
                  for x in workloads})
    b.reset(items)
    return b.build(1)


def test_full_resource_parses_and_round_trips_in_every_api_version() -> None:
    se = entry()
    assert se.hosts == ("api.example.com", "example.org")
    assert [(p.number, p.name, p.protocol, p.target_port) for p in se.ports] == [
        (80, "http", "HTTP", 0), (443, "https", "HTTPS", 8443)]
    assert (se.location, se.resolution, se.addresses) == ("MESH_EXTERNAL", "STATIC", ())
    e0 = se.endpoints[0]
    assert (e0.address, e0.ports, e0.labels, e0.locality, e0.weight) == (
        "192.0.2.10", (("http", 8080),), (("zone", "a"),), "r/z", 3)
    assert se.source == "se.yaml:1"
    assert service_entry_from_doc(json.loads(json.dumps(service_entry_doc(se)))) == se
    for v in ("v1beta1", "v1alpha3"):
        assert entry(SE.replace("networking.istio.io/v1", f"networking.istio.io/{v}")) == se
    # Istio's defaults: MESH_EXTERNAL, NONE
    dflt = entry(SE.replace("  location: MESH_EXTERNAL\n", "").replace("  resolution: STATIC\n", "")
                 .split("  endpoints:")[0] + "  addresses: [203.0.113.5/32]\n")
    assert (dflt.location, dflt.resolution, dflt.addresses) == ("MESH_EXTERNAL", "NONE", ("203.0.113.5",))


REFUSED = {
    "workloadSelector": (SE + "  workloadSelector: {labels: {app: x}}\n", "workloadSelector",
                         "spec.workloadSelector", "workloadSelector is not supported"),
    "subjectAltNames": (SE + "  subjectAltNames: [spiffe://x]\n", "subjectAltNames", "spec.subjectAltNames",
                        "subjectAltNames is not supported"),
    "exportTo namespace": (SE.replace('exportTo: ["*"]', "exportTo: [other]"), "exportTo",
                           "spec.exportTo[0]", "exportTo 'other' is not supported"),
    "wildcard host": (SE.replace("api.example.com,", "'*.example.com',"), "hosts:", "spec.hosts[0]",
                      "wildcard host"),
    "single label host": (SE.replace("api.example.com,", "api,"), "hosts:", "spec.hosts[0]",
                          "not a fully qualified host name"),
    "mesh name": (SE.replace("api.example.com,", "web.shop.svc.cluster.local,"), "hosts:", "spec.hosts[0]",
                  "mesh service name"),
    "duplicate host": (SE.replace("example.org", "API.example.com"), "hosts:", "spec.hosts[1]",
                       "listed twice"),
    "no hosts": (SE.replace("hosts: [api.example.com, example.org]", "hosts: []"), "hosts:", "spec.hosts",
                 "non-empty list"),
    "no ports": (SE.replace("  ports:\n  - {number: 80, name: http, protocol: HTTP}\n"
                            "  - {number: 443, name: https, protocol: HTTPS, targetPort: 8443}\n", ""),
                 "hosts:", "spec.ports", "missing required field 'ports'"),
    "port without name": (SE.replace("{number: 80, name: http, protocol: HTTP}", "{number: 80}"),
                          "{number: 80}", "spec.ports[0].name", "missing required field 'name'"),
    "UDP port": (SE.replace("protocol: HTTP}", "protocol: UDP}"), "protocol: UDP", "spec.ports[0].protocol",
                 "'UDP' is not supported"),
    "port twice": (SE.replace("number: 443", "number: 80"), "number: 443".replace("443", "80, name: https"),
                   "spec.ports[1].number", "listed twice"),
    "bad location": (SE.replace("location: MESH_EXTERNAL", "location: OUTSIDE"), "location:", "spec.location",
                     "unknown location"),
    "bad resolution": (SE.replace("resolution: STATIC", "resolution: MAGIC"), "resolution:",
                       "spec.resolution", "unknown resolution"),
    "STATIC with a name": (SE.replace("address: 192.0.2.11", "address: db.example.com"), "db.example.com",
                           "spec.endpoints[1].address", "not an IP address"),
    "STATIC without endpoints": (SE.split("  endpoints:")[0], "hosts:", "spec.endpoints",
                                 "STATIC needs at least one endpoint"),
    "NONE with endpoints": (SE.replace("resolution: STATIC", "resolution: NONE"), "- {address: 192.0.2.10",
                            "spec.endpoints", "no endpoints should be given"),
    "NONE without addresses": (SE.replace("resolution: STATIC", "resolution: NONE").split("  endpoints:")[0],
                               "resolution:", "spec.resolution", "NONE needs spec.addresses"),
    "DNS_ROUND_ROBIN two endpoints": (SE.replace("resolution: STATIC", "resolution: DNS_ROUND_ROBIN"),
                                      "- {address: 192.0.2.10", "spec.endpoints", "at most one endpoint"),
    "MESH_INTERNAL DNS": (SE.replace("resolution: STATIC", "resolution: DNS").replace("MESH_EXTERNAL",
                                                                                       "MESH_INTERNAL"),
                          "resolution:", "spec.resolution", "MESH_INTERNAL with resolution DNS"),
    "loopback endpoint": (SE.replace("192.0.2.11", "127.0.0.1"), "127.0.0.1", "spec.endpoints[1].address",
                          "loopback"),
    "IPv6 address": (SE + "  addresses: ['2001:db8::1']\n", "addresses:", "spec.addresses[0]",
                     "IPv6 address 2001:db8::1 is not supported"),
    "CIDR address": (SE + "  addresses: [10.0.0.0/24]\n", "addresses:", "spec.addresses[0]",
                     "CIDR block '10.0.0.0/24' is not supported"),
    "endpoint port name unknown": (SE.replace("ports: {http: 8080}", "ports: {grpc: 8080}"), "grpc: 8080",
                                   "spec.endpoints[0].ports.grpc", "no port named 'grpc'"),
    "endpoint network": (SE.replace("- address: 192.0.2.11", "- {address: 192.0.2.11, network: n2}"),
                         "network: n2", "spec.endpoints[1].network", "network is not supported"),
    "unknown field": (SE + "  hostz: [x]\n", "hostz", "spec.hostz", "unknown field 'hostz'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_file_line_field_and_reason(case: str) -> None:
    text, on_line, path, reason = REFUSED[case]
    with pytest.raises(InputError) as ei:
        parse(text)
    e = ei.value
    assert (e.file, e.path) == ("se.yaml", path), str(e)
    assert e.line == line_of(text, on_line), str(e)
    assert reason in e.reason, str(e)


def test_apply_allocates_one_vip_per_host_keeps_them_and_refuses_clashes() -> None:
    (loc,) = parse(SE)
    p = plan({}, [loc], NET)
    key = resource_key(Kind.SERVICE_ENTRY, "shop", "ext")
    assert p.created == ("ServiceEntry shop/ext",) and key in p.puts
    assert json.loads(p.puts[key])["autoAddresses"] == ["10.96.0.1", "10.96.0.2"]
    assert plan(p.puts, [loc], NET).unchanged == ("ServiceEntry shop/ext",)  # the VIPs stay
    # a Service applied later gets the next free VIP, never an entry's
    svc = parse("apiVersion: nodemesh.io/v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n"
                "spec: {ports: [{name: http, port: 80}]}\n")
    p2 = plan(p.puts, svc, NET)
    assert json.loads(p2.puts[resource_key(Kind.SERVICE, "shop", "web")])["vip"] == "10.96.0.3"
    with pytest.raises(InputError) as ei:  # and never one explicitly
        plan(p.puts, parse("apiVersion: nodemesh.io/v1\nkind: Service\n"
                           "metadata: {name: db, namespace: shop}\n"
                           "spec: {vip: 10.96.0.2, ports: [{name: tcp, port: 5432}]}\n"), NET)
    assert "VIP 10.96.0.2 is already taken by ServiceEntry shop/ext" in str(ei.value)
    # a host drops out, one is added: the kept host keeps its VIP
    (moved,) = parse(SE.replace("example.org", "example.net"))
    p3 = plan(p.puts, [moved], NET)
    assert json.loads(p3.puts[key])["autoAddresses"] == ["10.96.0.1", "10.96.0.3"]
    # another entry for a host this one has: refused, naming the first
    (other,) = parse(SE.replace("name: ext,", "name: ext2,").replace("example.org", "other.org"))
    with pytest.raises(InputError) as ei:
        plan(p.puts, [other], NET)
    assert ei.value.path == "spec.hosts[0]"
    assert "already has a ServiceEntry: shop/ext (se.yaml:1)" in str(ei.value)
    # an address a Service has as its VIP: refused
    (taken,) = parse(SE + "  addresses: [10.96.0.1]\n".replace("10.96.0.1", "10.96.0.3"))
    with pytest.raises(InputError) as ei:
        plan(p2.puts | p.puts, [taken], NET)
    assert ei.value.path == "spec.addresses[0]" and "already taken by Service shop/web" in str(ei.value)


def test_entry_addresses_and_external_endpoints_are_no_workload_addresses() -> None:
    wl = parse("apiVersion: nodemesh.io/v1\nkind: Workload\nmetadata: {name: db-1, namespace: shop}\n"
               "spec: {address: 192.0.2.11, node: n2}\n")
    stored = plan({}, wl, NET).puts
    with pytest.raises(InputError) as ei:  # an external endpoint at a pod: it would skip its mTLS
        plan(stored, parse(SE), NET)
    assert ei.value.path == "spec.endpoints[1].address" and "Workload shop/db-1" in str(ei.value)
    assert plan(stored, parse(SE.replace("MESH_EXTERNAL", "MESH_INTERNAL")), NET).created  # as it should be
    with pytest.raises(InputError) as ei:  # an entry address at a pod: it would take the pod's traffic
        plan(stored, parse(SE.replace("192.0.2.11", "192.0.2.12") + "  addresses: [192.0.2.11]\n"), NET)
    assert ei.value.path == "spec.addresses[0]"
    # and the other way round: a workload at an entry's address, stored or in the same input
    entry_stored = plan({}, parse(SE + "  addresses: [192.0.2.77]\n"), NET).puts
    with pytest.raises(InputError) as ei:
        plan(entry_stored, parse("apiVersion: nodemesh.io/v1\nkind: Workload\n"
                                 "metadata: {name: db-2, namespace: shop}\n"
                                 "spec: {address: 192.0.2.77}\n"), NET)
    assert ei.value.path == "spec.address" and "ServiceEntry shop/ext" in str(ei.value)


def test_virtual_service_may_route_to_an_entry_host_and_applies_to_it() -> None:
    vs = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ext, namespace: shop}
spec:
  hosts: [example.org]
  http:
  - timeout: 2s
    route: [{destination: {host: example.org}}]
"""
    with pytest.raises(InputError) as ei:
        plan({}, parse(vs), NET)
    assert "route to unknown host 'example.org'" in str(ei.value)
    p = plan({}, parse(SE + "---\n" + vs), NET)
    snap = snapshot_of(dict(p.puts))
    table = RouteTable.build(snap)
    es = snap.entry_services["example.org"]
    assert table.virtual_service(es) is not None and table.virtual_service(snap.entry_services[
        "api.example.com"]) is None


def test_destination_rule_subsets_select_entry_endpoints_by_their_labels() -> None:
    dr = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ext, namespace: shop}
spec:
  host: api.example.com
  subsets: [{name: a, labels: {zone: a}}, {name: b, labels: {zone: b}}]
"""
    snap = snapshot_of(dict(plan({}, parse(SE + "---\n" + dr), NET).puts))
    table = RouteTable.build(snap)
    es = snap.entry_services["api.example.com"]
    assert [e.address for e in subset_endpoints(table, es, 80, "a")[0]] == ["192.0.2.10"]
    assert subset_endpoints(table, es, 80, "b")[0] == ()
    assert len(subset_endpoints(table, es, 80, "")[0]) == 2


def test_compiled_services_endpoints_by_resolution_and_location() -> None:
    p = plan({}, parse(SE), NET)
    snap = snapshot_of(dict(p.puts))
    es = snap.entry_services["api.example.com"]
    assert isinstance(es, EntryService) and es.fqdn == "api.example.com" and es.vip == "10.96.0.1"
    assert snap.entry_by_address["10.96.0.2"].name == "example.org"
    eps = es.by_port[80]
    assert [(e.address, e.port, e.weight, e.locality, e.external) for e in eps] == [
        ("192.0.2.10", 8080, 3, "r/z", True), ("192.0.2.11", 80, 1, "", True)]
    assert [e.port for e in es.by_port[443]] == [8443, 8443]  # targetPort
    # routed to by its VIP; Istio's destination_service is the host
    d = Directory.build(snap)
    r = decide(d, "10.96.0.1", 443)
    assert r.service is es and r.service_host == "api.example.com" and r.protocol is not None
    assert r.policy.value == "WEIGHTED_ROUND_ROBIN"  # the endpoints' weights 3 and 1 count
    b = Balancer()
    picks = [b.pick("k", r.policy, r.endpoints).address for _ in range(8)]  # type: ignore[union-attr]
    assert picks.count("192.0.2.10") == 6 and picks.count("192.0.2.11") == 2, picks
    with pytest.raises(UnknownDestination):
        decide(d, "192.0.2.99", 80)
    # DNS without endpoints: the host itself, resolved when dialled
    dns_se = SE.replace("resolution: STATIC", "resolution: DNS").split("  endpoints:")[0]
    s2 = snapshot_of(dict(plan({}, parse(dns_se), NET).puts))
    assert [(e.address, e.port) for e in s2.entry_services["example.org"].by_port[80]] == [
        ("example.org", 80)]
    # NONE: the address dialled, and only that one
    none_se = (SE.replace("resolution: STATIC", "resolution: NONE").split("  endpoints:")[0]
               + "  addresses: [203.0.113.5, 203.0.113.6]\n")
    s3 = snapshot_of(dict(plan({}, parse(none_se), NET).puts))
    r3 = decide(Directory.build(s3), "203.0.113.6", 443)
    assert [(e.address, e.port) for e in r3.endpoints] == [("203.0.113.6", 8443)]
    # MESH_INTERNAL: the endpoints are the mesh workloads at those addresses (HBONE, their identity)
    internal = SE.replace("MESH_EXTERNAL", "MESH_INTERNAL").replace("192.0.2.10", "10.244.2.7")
    wl = Workload("db-1", "data", "10.244.2.7", node="n2", service_account="db")
    s4 = snapshot_of(dict(plan({}, parse(internal), NET).puts), wl)
    e4 = s4.entry_services["example.org"].by_port[80][0]
    assert (e4.workload, e4.namespace, e4.node, e4.service_account, e4.external) == (
        "db-1", "data", "n2", "db", False)
    # an address no workload has, or one the agent's guard screens out: no endpoint (503 UH)
    es4 = s4.entry_services["example.org"]
    assert [e.workload for e in healthy_endpoints(s4, es4, 80)] == ["db-1"]
    guard = WorkloadGuard.of({"proxy": "10.244.2.1"}, {"n2": "10.244.2.7"})
    screened = Directory.build(s4, guard).snapshot
    assert healthy_endpoints(screened, screened.entry_services["example.org"], 80) == ()


def test_a_stored_entry_that_does_not_decode_is_skipped_and_the_rest_serve() -> None:
    puts = dict(plan({}, parse(SE), NET).puts)
    bad = service_entry_doc(entry())
    bad.update(name="bad", hosts=["no_such host"], autoAddresses=["10.96.5.5"])
    puts[resource_key(Kind.SERVICE_ENTRY, "shop", "bad")] = json.dumps(bad)
    zero = service_entry_doc(entry())
    zero.update(name="zero", hosts=["zero.example"], autoAddresses=["10.96.5.6"])
    zero["endpoints"][0]["weight"] = 0
    puts[resource_key(Kind.SERVICE_ENTRY, "shop", "zero")] = json.dumps(zero)
    puts[resource_key(Kind.SERVICE_ENTRY, "shop", "junk")] = "{not json"
    snap = snapshot_of(puts)
    assert list(snap.service_entries) == [("shop", "ext")]
    assert sorted(snap.entry_services) == ["api.example.com", "example.org"]


def test_explain_walks_a_request_to_an_entry_host() -> None:
    from agent.cli.explain import explain

    client = Workload("client", "shop", "10.244.1.2", node="n1", service_account="client")
    snap = snapshot_of(dict(plan({}, parse(SE), NET).puts), client)
    for url in ("http://api.example.com/x", "http://10.96.0.1/x"):
        walk = explain(snap, "shop/client", "GET", url, {})
        assert walk["capture"].startswith("10.96.0.1:80 is service shop/api.example.com"), walk
        assert walk["outcome"]["answer"] == "forwarded", walk
        assert walk["outcome"]["via"].startswith("plain TCP from the node"), walk


def test_mesh_dns_answers_entry_hosts_with_their_addresses() -> None:
    snap = snapshot_of(dict(plan({}, parse(SE), NET).puts))

    def ask(name: str, qtype: int = w.A) -> w.Message:
        query = w.encode(w.Message(id=7, rd=True, questions=(w.Question(name, qtype),)))
        out = dns.answer(query, snap, udp=True)
        assert out is not None
        return w.decode(out)

    m = ask("api.example.com")
    assert m.rcode == w.NOERROR and [r.data for r in m.answers] == ["10.96.0.1"]
    assert [r.data for r in ask("EXAMPLE.org").answers] == ["10.96.0.2"]
    assert ask("api.example.com", w.AAAA).answers == ()  # NODATA for the other family
    assert dns.answer(w.encode(w.Message(id=1, questions=(w.Question("other.example.com", w.A),))), snap,
                      udp=True) is None  # not ours: forwarded


def test_outbound_traffic_policy_config_and_capture() -> None:
    base = {"node": "n1", "addresses": {"proxy": "10.244.1.1"}}
    assert from_mapping(base).outbound_traffic_policy == "ALLOW_ANY"
    assert from_mapping({**base, "outbound_traffic_policy": {"mode": "REGISTRY_ONLY"}}
                        ).outbound_traffic_policy == "REGISTRY_ONLY"
    with pytest.raises(ConfigError) as ei:
        from_mapping({**base, "outbound_traffic_policy": {"mode": "DENY"}})
    assert "outbound_traffic_policy.mode" in str(ei.value)
    with pytest.raises(ConfigError):
        from_mapping({**base, "outbound_traffic_policy": {"mod": "ALLOW_ANY"}})
    snap = snapshot_of(dict(plan({}, parse(SE + "  addresses: [192.0.2.50, 10.96.9.9]\n"), NET).puts))
    cidrs = ("10.96.0.0/16", "10.244.0.0/16")
    # ALLOW_ANY: agent.yaml's CIDRs plus each entry address outside them, nothing else
    assert capture_cidrs(cidrs, False, snap) == ((*cidrs, "192.0.2.50/32"), 0)
    assert capture_cidrs(cidrs, False, Snapshot(0)) == (cidrs, 0)
    # REGISTRY_ONLY: every IPv4 destination goes to the proxy, which decides
    assert capture_cidrs(cidrs, True, snap) == ((*cidrs, "0.0.0.0/0"), 0)


def test_dns_cache_ttl_clamped_negative_and_bounded() -> None:
    c = DnsCache(max_names=2)
    e = c.put("a.example", ("192.0.2.1", "192.0.2.2"), 30, now_s=100)
    assert c.get("a.example", 129.9) is e and c.get("a.example", 130.1) is None
    assert [DnsCache.next_address(e) for _ in range(3)] == ["192.0.2.1", "192.0.2.2", "192.0.2.1"]
    assert c.put("b.example", ("192.0.2.3",), 0, now_s=100).expires_s == 101  # at least 1 s
    assert c.put("c.example", ("192.0.2.3",), 10**6, now_s=100).expires_s == 400  # at most 300 s
    assert c.put("d.example", (), 60, now_s=100, error="rcode 3").expires_s == 102  # a failure: 2 s
    assert len(c._names) <= 2


def test_resolver_shares_one_query_and_egress_refuses_what_the_proxy_must_never_dial() -> None:
    asked: list[bytes] = []

    async def query(data: bytes) -> bytes:
        asked.append(data)
        await asyncio.sleep(0.01)
        q = w.decode(data)
        name = q.questions[0].name
        ip = {"db.example": "192.0.2.9", "lo.example": "127.0.0.1", "node.example": "10.250.0.2"}[name]
        return w.encode(w.Message(id=q.id, qr=True, questions=q.questions,
                                  answers=(w.Record(name, w.A, w.CLASS_IN, 60, ip),)))

    async def go() -> None:
        r = Resolver(("192.0.2.53", 53), query=query)
        a, b = await asyncio.gather(r.resolve("db.example"), r.resolve("db.example"))
        assert a is b and a.addresses == ("192.0.2.9",) and len(asked) == 1
        eg = Egress(r, frozenset({"10.250.0.2"}))
        from agent.control.snapshot import Endpoint, Health
        for name, why in (("lo.example", "loopback"), ("node.example", "a mesh node's address"),
                          ("169.254.1.1", "link-local")):
            with pytest.raises(EgressError, match=why):
                await eg.address_of(Endpoint("ns", name, name, 80, 1, "", "", "", Health.PASSING, True))
        # the first asker going away does not fail the others: the query runs on its own
        slow = Resolver(("192.0.2.53", 53), query=query)
        first = asyncio.ensure_future(slow.resolve("lo.example"))
        second = asyncio.ensure_future(slow.resolve("lo.example"))
        await asyncio.sleep(0)
        first.cancel()
        assert (await second).addresses == ("127.0.0.1",)
        no_upstream = Resolver(None)
        assert (await no_upstream.resolve("db.example")).error == "no dns_upstream to resolve it"
        assert a_query("db.example", 5)[:2] == b"\x00\x05"

    asyncio.run(go())


def run(args: list[str], reg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, args, env={"NODEMESH_REGISTRY_DIR": str(reg)})
    return r.exit_code, r.output


def test_cli_apply_get_describe_delete_and_bad_input_applies_nothing(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    f = tmp_path / "se.yaml"
    text, on_line, path, _ = REFUSED["NONE with endpoints"]
    f.write_text(SE.replace("name: ext,", "name: good,") + "---\n" + text)
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 2 and f"{f}:{len(SE.splitlines()) + 1 + line_of(text, on_line)} at {path}: " in out, out
    assert EmbeddedBackend(reg).read().items == {}
    f.write_text(SE)
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 0 and "ServiceEntry shop/ext created" in out, out
    code, out = run(["get", "se", "-n", "shop"], reg)
    header, row = out.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "HOSTS", "ADDRESSES", "PORTS", "LOCATION", "RESOLUTION",
                              "SOURCE"], out
    assert row.split() == ["shop", "ext", "api.example.com,example.org", "10.96.0.1,10.96.0.2",
                           "80/HTTP,443/HTTPS", "MESH_EXTERNAL", "STATIC", f"{f}:1"], out
    code, out = run(["describe", "serviceentry", "ext", "-n", "shop", "-o", "json"], reg)
    assert code == 0 and json.loads(out)["autoAddresses"] == ["10.96.0.1", "10.96.0.2"], out
    code, out = run(["delete", "se", "ext", "-n", "shop"], reg)
    assert code == 0 and "ServiceEntry shop/ext deleted" in out, out
    code, out = run(["get", "serviceentries", "-A", "-o", "json"], reg)
    assert code == 0 and json.loads(out) == [], out


class _Maps:
    """The capture map writes the agent makes (bpf.maps.Dataplane.set_capture)."""

    def __init__(self, fail: bool = False) -> None:
        self.writes: list[tuple[str, ...]] = []
        self.fail = fail

    def set_capture(self, cfg: Any) -> None:
        if self.fail:
            raise OSError("map full")
        self.writes.append(tuple(cfg.cidrs))


def test_apply_capture_writes_what_the_snapshot_and_policy_ask_for_only_on_change() -> None:
    from agent import node

    cfg = from_mapping({"node": "n1", "addresses": {"proxy": "10.244.1.1"},
                        "interception": {"capture_cidrs": ["10.96.0.0/16"]}})
    snap = snapshot_of(dict(plan({}, parse(SE + "  addresses: [192.0.2.50]\n"), NET).puts))
    maps = _Maps()
    agent: Any = SimpleNamespace(dataplane=maps, cfg=cfg, capture=((), ()),
                                 directory=SimpleNamespace(current=Directory.build(snap)))
    node.apply_capture(agent)
    node.apply_capture(agent)  # nothing changed: nothing written
    assert maps.writes == [("10.96.0.0/16", "192.0.2.50/32")]
    node.apply_capture(agent, dataclasses.replace(cfg, outbound_traffic_policy="REGISTRY_ONLY"))
    assert maps.writes[-1] == ("10.96.0.0/16", "0.0.0.0/0")
    # a write the kernel refuses leaves the last one in force and is tried again next time
    agent.dataplane = _Maps(fail=True)
    node.apply_capture(agent)
    assert agent.capture[0] == ("10.96.0.0/16", "0.0.0.0/0")
