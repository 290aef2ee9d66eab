"""RateLimitPolicy (issue 15): parsed strictly (file, line and field for every refusal; nothing
applied), stored and read back, in snapshots, shown by the CLI; token buckets with a fake clock;
which policies apply to which pod port; the 429 and its headers; TCP connection limits; the
service-wide budget divided by demand, and the static share when peers are unreachable."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from agent.cli.main import cli
from agent.control import authz
from agent.control.apply import plan
from agent.control.embedded import EmbeddedBackend
from agent.control.errors import InputError
from agent.control.model import Kind, resource_key
from agent.control.ratelimit import Rate, RateLimitPolicy, rate_limit_doc, rate_limit_from_doc
from agent.control.snapshot import SnapshotBuilder
from agent.control.validate import Located, parse_vip_range, parse_yaml
from agent.dataplane.http.exchange import Exchange, LocalReply
from agent.dataplane.ratelimit import Bucket, RateLimits, divide
from agent.dataplane.ratepeers import RateShare
from agent.dataplane.route import Directory

NET = parse_vip_range("10.96.0.0/16")
TD = "cluster.local"

SERVICE = """\
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  vip: 10.96.5.1
  selector: {app: api}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: http}
  - {name: db, port: 5432, targetPort: 5432, protocol: tcp}
"""

RLP = """\
apiVersion: nodemesh.io/v1
kind: RateLimitPolicy
metadata: {name: api-limit, namespace: shop}
spec:
  targetRef: {kind: Service, name: api, port: 80}
  http:
    total: {requestsPerSecond: 100, burst: 10}
    perIdentity: {requestsPerSecond: 20, burst: 2}
    identities:
    - principal: spiffe://cluster.local/ns/shop/sa/batch
      requestsPerSecond: 50
      burst: 5
    descriptors:
    - header: X-Tenant
      requestsPerSecond: 5
      burst: 1
    - pathPrefix: /search
      requestsPerSecond: 2
      burst: 1
    - method: POST
      requestsPerSecond: 3
"""

TCP = """\
apiVersion: nodemesh.io/v1
kind: RateLimitPolicy
metadata: {name: db-limit, namespace: shop}
spec:
  targetRef: {name: api, port: 5432}
  scope: service
  tcp: {connectionsPerSecond: 4, burst: 2, maxConnections: 3}
"""


def workloads(spec: dict[str, int]) -> str:
    """One api workload per node: {node: how many}."""
    out = []
    i = 0
    for node, n in spec.items():
        for _ in range(n):
            i += 1
            out.append(f"""apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: api-{i}, namespace: shop, labels: {{app: api}}}}
spec: {{address: 10.244.{i}.5, node: {node}, serviceAccount: api}}
""")
    return "---\n".join(out)


def line_of(text: str, needle: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)


def parse(text: str, file: str = "rl.yaml") -> list[Located]:
    return parse_yaml(text, file, NET)


def policy(text: str = RLP) -> RateLimitPolicy:
    (loc,) = parse(text)
    assert isinstance(loc.resource, RateLimitPolicy)
    return loc.resource


# -- the kind ---------------------------------------------------------------------------------


def test_parse_reads_every_field() -> None:
    p = policy()
    assert (p.namespace, p.name, p.service, p.port, p.scope) == ("shop", "api-limit", "api", 80, "endpoint")
    assert p.total == Rate(100.0, 10) and p.per_identity == Rate(20.0, 2)
    assert [(i.principal, i.rate) for i in p.identities] == [(f"{TD}/ns/shop/sa/batch", Rate(50.0, 5))]
    assert [(d.kind, d.key, d.value, d.rate) for d in p.descriptors] == [
        ("header", "x-tenant", None, Rate(5.0, 1)), ("pathPrefix", "/search", None, Rate(2.0, 1)),
        ("method", "POST", None, Rate(3.0, 1))]  # burst defaults to a tenth of a second's worth
    t = policy(TCP)
    assert t.connections == Rate(4.0, 2) and t.max_connections == 3 and t.scope == "service" and t.tcp
    assert not t.http and t.source == "rl.yaml:1"
    for q in (p, t):
        assert rate_limit_from_doc(json.loads(json.dumps(rate_limit_doc(q)))) == q


REFUSED = {
    # name: (text, line holding the error, field path, reason)
    "zero rate": (RLP.replace("requestsPerSecond: 100", "requestsPerSecond: 0"), "requestsPerSecond: 0",
                  "spec.http.total.requestsPerSecond", "a rate must be positive"),
    "negative rate": (RLP.replace("requestsPerSecond: 50", "requestsPerSecond: -5"), "requestsPerSecond: -5",
                      "spec.http.identities[0].requestsPerSecond", "a rate must be positive"),
    "negative connections": (TCP.replace("connectionsPerSecond: 4", "connectionsPerSecond: -1"), "tcp:",
                             "spec.tcp.connectionsPerSecond", "a rate must be positive"),
    "zero burst": (RLP.replace("burst: 10", "burst: 0"), "burst: 0", "spec.http.total.burst", "out of range"),
    "duplicate descriptor": (RLP.replace("- method: POST", "- header: x-tenant"), "- header: x-tenant",
                             "spec.http.descriptors[2]", "duplicate descriptor header:x-tenant"),
    "duplicate identity": (RLP.replace("    descriptors:", "    - principal: cluster.local/ns/shop/sa/batch\n"
                                       "      requestsPerSecond: 1\n    descriptors:"),
                           "    - principal: cluster.local/ns/shop/sa/batch",
                           "spec.http.identities[1].principal", "listed twice"),
    "route as a string": (RLP.replace("port: 80}", "port: 80, route: reviews-v2}"), "targetRef",
                          "spec.targetRef.route", "expected {virtualService: <name>, name: <route name>}"),
    "two descriptor kinds": (RLP.replace("- method: POST", "- method: POST\n      pathPrefix: /x"),
                             "- method: POST", "spec.http.descriptors[2]", "exactly one of"),
    "no limit": (RLP.split("  http:")[0], "targetRef", "spec", "needs a limit"),
    "unknown field": (RLP.replace("    perIdentity", "    perSource: {requestsPerSecond: 1}\n"
                                                  "    perIdentity"),
                      "perSource", "spec.http.perSource", "unknown field"),
    "bad scope": (TCP.replace("scope: service", "scope: cluster"), "scope:", "spec.scope", "unknown scope"),
    "rate as text": (RLP.replace("requestsPerSecond: 20", "requestsPerSecond: fast"),
                     "requestsPerSecond: fast",
                     "spec.http.perIdentity.requestsPerSecond", "expected a number"),
}


def assert_refused(text: str, on_line: str, path: str, reason: str) -> None:
    """Parsing ``text`` fails at field ``path`` on the line holding ``on_line``, saying ``reason``."""
    with pytest.raises(InputError) as ei:
        parse(text)
    e = ei.value
    assert e.path == path and e.line == line_of(text, on_line), str(e)
    assert reason in e.reason, str(e)
    assert str(e).startswith(f"rl.yaml:{e.line} at {path}: "), str(e)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_with_file_line_field(case: str) -> None:
    assert_refused(*REFUSED[case])


def test_unknown_target_and_port_refused_at_apply() -> None:
    (loc,) = parse(RLP)
    with pytest.raises(InputError) as ei:
        plan({}, [loc], NET)
    assert ei.value.path == "spec.targetRef.name" and "unknown target" in ei.value.reason
    assert ei.value.line == line_of(RLP, "targetRef"), str(ei.value)
    svc = parse(SERVICE)
    p = plan({}, [*svc, loc], NET)  # the Service in the same input
    assert "RateLimitPolicy shop/api-limit" in p.created
    stored = plan({}, svc, NET).puts  # or stored
    assert plan(stored, [loc], NET).created == ("RateLimitPolicy shop/api-limit",)
    (bad,) = parse(RLP.replace("port: 80}", "port: 81}"))
    with pytest.raises(InputError) as ei:
        plan(stored, [bad], NET)
    assert ei.value.path == "spec.targetRef.port" and "has no port 81" in ei.value.reason


def run(args: list[str], reg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, args, env={"NODEMESH_REGISTRY_DIR": str(reg)})
    return r.exit_code, r.output


def test_bad_input_applies_nothing_and_cli(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    f = tmp_path / "mesh.yaml"
    text, on_line, path, _ = REFUSED["duplicate descriptor"]
    f.write_text(SERVICE + "---\n" + text)
    code, out = run(["apply", "-f", str(f)], reg)
    expected = len(SERVICE.splitlines()) + 1 + line_of(text, on_line)
    assert code == 2 and f"error: {f}:{expected} at {path}: " in out, out
    assert EmbeddedBackend(reg).read().items == {}
    f.write_text(SERVICE + "---\n" + RLP)
    code, out = run(["apply", "-f", str(f)], reg)
    assert code == 0 and "RateLimitPolicy shop/api-limit created" in out, out
    code, out = run(["get", "rlp", "-n", "shop"], reg)
    header, row = out.splitlines()
    assert header.split() == ["NAMESPACE", "NAME", "TARGET", "SCOPE", "LIMITS", "SOURCE"], out
    assert row.split()[:5] == ["shop", "api-limit", "api:80", "endpoint", "total=100/s"], out
    code, out = run(["describe", "ratelimitpolicy", "api-limit", "-n", "shop", "-o", "json"], reg)
    assert code == 0 and json.loads(out)["http"]["total"] == {"requestsPerSecond": 100.0, "burst": 10}
    code, out = run(["delete", "rlp", "api-limit", "-n", "shop"], reg)
    assert code == 0 and "deleted" in out, out
    assert resource_key(Kind.RATE_LIMIT_POLICY, "shop", "api-limit") not in EmbeddedBackend(reg).read().items


# -- buckets and decisions ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    b = Bucket(10.0, 5.0, 0.0)
    assert b.refill(0.0) == 5.0
    b.tokens = 0.0
    assert b.refill(0.25) == pytest.approx(2.5) and b.wait_s() == 0.0
    b.tokens = 0.5
    assert b.wait_s() == pytest.approx(0.05)
    assert b.refill(100.0) == 5.0  # never above the burst


def mesh(*texts: str, nodes: dict[str, int] | None = None) -> tuple[Directory, SnapshotBuilder]:
    locs = [loc for t in (SERVICE, workloads(nodes or {"n1": 1}), *texts) for loc in parse(t)]
    b = SnapshotBuilder()
    b.reset(plan({}, locs, NET).puts)
    return Directory.build(b.build(1)), b


def limiter(*texts: str, nodes: dict[str, int] | None = None, node: str = "n1",
            ) -> tuple[RateLimits, Directory, Clock]:
    d, _ = mesh(*texts, nodes=nodes)
    clock = Clock()
    return RateLimits(lambda: d, node, CollectorRegistry(), clock=clock), d, clock


def ask(rl: RateLimits, d: Directory, principal: str = f"{TD}/ns/shop/sa/web", method: str = "GET",
        path: str = "/", headers: list[tuple[str, str]] | None = None, port: int = 8080,
        workload: str = "api-1", route: str = "") -> int | LocalReply:
    w = d.snapshot.workloads[("shop", workload)]
    ex = Exchange(0.0, method, "api", path)
    facts = authz.Facts(principal=principal, destination_port=port)
    try:
        rl.judge_request(w, lambda: facts, ex, headers or [], path, route)
    except LocalReply as r:
        return r
    return 200


def admitted(rl: RateLimits, d: Directory, n: int, **kw: object) -> int:
    return sum(ask(rl, d, **kw) == 200 for _ in range(n))  # type: ignore[arg-type]


def test_total_limit_over_time_with_a_fake_clock() -> None:
    rl, d, clock = limiter(RLP.replace("perIdentity: {requestsPerSecond: 20, burst: 2}",
                                       "perIdentity: {requestsPerSecond: 1000, burst: 1000}"))
    assert admitted(rl, d, 30) == 10  # the burst
    got = 0
    for _ in range(100):  # 1 s at 200 requests/s offered: 100 admitted
        clock.t += 0.01
        got += admitted(rl, d, 2)
    assert got == 100
    assert ask(rl, d, port=5432) == 200  # another port: not this policy's


def test_refusal_is_429_rl_with_headers_and_resource_exhausted() -> None:
    rl, d, clock = limiter(RLP)
    assert admitted(rl, d, 2) == 2
    r = ask(rl, d)
    assert isinstance(r, LocalReply)
    assert (r.status, str(r), r.flag) == (429, "local_rate_limited", "RL")
    assert r.grpc_status == "RESOURCE_EXHAUSTED"
    h = dict(r.headers)
    assert h[b"x-ratelimit-limit"] == b"20, 20;w=1" and h[b"x-ratelimit-remaining"] == b"0"
    assert h[b"retry-after"] == b"1" and h[b"x-ratelimit-reset"] == b"1"  # 1/20 s, rounded up
    clock.t += 0.05
    assert ask(rl, d) == 200  # a refused request took no token


def test_per_identity_override_and_descriptors() -> None:
    rl, d, clock = limiter(RLP)
    batch = f"{TD}/ns/shop/sa/batch"
    assert admitted(rl, d, 10, principal=batch) == 5  # the override's burst, not perIdentity's 2
    assert admitted(rl, d, 10, principal=f"{TD}/ns/shop/sa/other") == 2  # each identity its own
    clock.t += 10
    assert admitted(rl, d, 5, path="/search/x?q=1") == 1
    assert admitted(rl, d, 5, method="POST", principal=batch) == 1
    assert admitted(rl, d, 5, headers=[("x-tenant", "a")], principal=batch) == 1
    assert admitted(rl, d, 5, headers=[("x-tenant", "b")], principal=f"{TD}/ns/x/sa/y") == 1  # per value
    st = rl.status()
    assert st[0]["policy"] == "shop/api-limit" and st[0]["limited"] > 0
    assert {"bucket": "api-1: header:x-tenant [a]", "rate_per_s": 5.0, "burst": 1.0, "remaining": 0} \
        in st[0]["buckets"]


def test_tcp_connections_per_second_and_open_at_once() -> None:
    rl, d, clock = limiter(TCP)
    w = d.snapshot.workloads[("shop", "api-1")]
    r1, _ = rl.admit_connection(w, 5432)
    r2, _ = rl.admit_connection(w, 5432)
    r3, why = rl.admit_connection(w, 5432)
    assert r1 and r2 and r3 is None and "connections/s" in why  # burst 2
    clock.t += 0.25
    r3, _ = rl.admit_connection(w, 5432)
    clock.t += 0.25
    r4, why = rl.admit_connection(w, 5432)
    assert r3 and r4 is None and "3 connections open" in why
    r1()
    r4, _ = rl.admit_connection(w, 5432)
    assert r4 is not None
    assert rl.admit_connection(w, 8080)[1] == ""  # the HTTP port has no TCP limit


def test_buckets_survive_an_unrelated_snapshot_and_reset_on_change() -> None:
    d1, b = mesh(RLP)
    cur = [d1]
    clock = Clock()
    reg = CollectorRegistry()
    rl = RateLimits(lambda: cur[0], "n1", reg, clock=clock)
    assert admitted(rl, d1, 3) == 2
    b.apply({resource_key(Kind.WORKLOAD, "shop", "other"): json.dumps(
        {"name": "other", "namespace": "shop", "address": "10.244.9.9", "node": "n2"})}, ())
    cur[0] = Directory.build(b.build(2))
    assert admitted(rl, cur[0], 3) == 0  # the same buckets
    (loc,) = parse(RLP.replace("burst: 2}", "burst: 3}"))
    b.apply(plan({}, [*parse(SERVICE), loc], NET).puts, ())
    cur[0] = Directory.build(b.build(3))
    assert admitted(rl, cur[0], 4) == 3  # a changed policy starts afresh
    # its decisions stay counted across the change (2 + 3 admitted, 4 + 1 limited), read at scrape time
    name = "shop/api-limit"
    assert rl.decisions() == {(name, "http", "admitted"): 5, (name, "http", "limited"): 5,
                              (name, "tcp", "admitted"): 0, (name, "tcp", "limited"): 0}
    assert reg.get_sample_value("nodemesh_ratelimit_decisions_total",
                                {"policy": name, "kind": "http", "result": "limited"}) == 5


def test_keyed_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.dataplane import ratelimit
    monkeypatch.setattr(ratelimit, "MAX_KEYED_BUCKETS", 50)
    rl, d, _ = limiter(RLP)
    for i in range(500):
        ask(rl, d, headers=[("x-tenant", f"t{i}")], principal=f"{TD}/ns/a/sa/s{i}")
    st = rl._states[("shop", "api-limit")]
    assert len(st.buckets) <= 50


# -- service-wide budgets -------------------------------------------------------------------


def test_divide_by_demand_when_over_the_limit() -> None:
    eps = {"n1": 1, "n2": 1, "n3": 1}
    demand = {"n1": 160.0, "n2": 20.0, "n3": 20.0}  # 80/10/10 at 2x a limit of 100
    shares = {n: divide(n, 100.0, eps, demand, set(eps) - {n}) for n in eps}
    assert shares == pytest.approx({"n1": 0.8, "n2": 0.1, "n3": 0.1})
    assert sum(shares.values()) == pytest.approx(1.0)


def test_divide_gives_spare_by_endpoints_when_demand_fits() -> None:
    eps = {"n1": 2, "n2": 1, "n3": 1}
    demand = {"n1": 10.0, "n2": 30.0, "n3": 0.0}
    shares = {n: divide(n, 100.0, eps, demand, set(eps) - {n}) for n in eps}
    # spare 60: n1 10 + 30, n2 30 + 15, n3 0 + 15
    assert shares == pytest.approx({"n1": 0.4, "n2": 0.45, "n3": 0.15})


def test_unreachable_peer_keeps_its_static_share_total_bounded() -> None:
    eps = {"n1": 1, "n2": 1, "n3": 1}
    demand = {"n1": 160.0, "n2": 20.0, "n3": 20.0}
    alone = divide("n1", 100.0, eps, demand, set())  # n1 partitioned: its static share
    assert alone == pytest.approx(1 / 3)
    others = [divide(n, 100.0, eps, demand, {"n2", "n3"} - {n}) for n in ("n2", "n3")]
    assert others == pytest.approx([1 / 3, 1 / 3])  # 2/3 left, divided by demand (equal here)
    assert alone + sum(others) <= 1.0 + 1e-9
    assert divide("n1", None, eps, {}, {"n2", "n3"}) == pytest.approx(1 / 3)  # no demand: static


def test_service_scope_runs_on_its_share() -> None:
    text = RLP.replace("port: 80}", "port: 80}\n  scope: service").replace("burst: 10}", "burst: 30}")
    rl, _, _ = limiter(text, nodes={"n1": 1, "n2": 2})
    (st,) = rl.status()
    assert st["share"] == pytest.approx(1 / 3, abs=1e-3) and st["sharing"] == "static"  # (no exchange yet)
    assert st["local_per_s"] == pytest.approx(33.333, abs=0.01)
    rl.set_shares({("shop", "api-limit"): 0.5}, {("shop", "api-limit"): "no peer heard for 0.5 s"})
    (st,) = rl.status()
    assert st["share"] == 0.5 and st["sharing"] == "static" and "no peer" in st["fallback"]
    assert [p for p in rl.service_policies()] == [("shop", "api-limit")]
    rl2, _, _ = limiter(text, nodes={"n1": 1, "n2": 2}, node="n9")
    assert rl2.service_policies() == {} and rl2.status() == []


# -- the exchange between agents (pure part) ----------------------------------------------


def sharing(node: str, clock: Clock, d: Directory) -> tuple[RateLimits, RateShare]:
    rl = RateLimits(lambda: d, node, CollectorRegistry(), clock=clock)
    return rl, RateShare(rl, lambda: d, node, lambda n: {"n1": "10.0.0.1", "n2": "10.0.0.2",
                                                           "n3": "10.0.0.3"}.get(n), None, TD, clock=clock)


def test_reports_redivide_by_demand_and_fall_back_when_peers_go_silent() -> None:
    text = RLP.replace("port: 80}", "port: 80}\n  scope: service")
    d, _ = mesh(text, nodes={"n1": 1, "n2": 1, "n3": 1})
    clock = Clock()
    agents = {n: sharing(n, clock, d) for n in ("n1", "n2", "n3")}
    key = ("shop", "api-limit")
    offered = {"n1": 160, "n2": 20, "n3": 20}  # per second: 80/10/10 at 2x the limit of 100
    for _ in range(10):  # one second of 100 ms rounds
        clock.t += 0.1
        for n, (rl, share) in agents.items():
            rl.service_policies()[key].offered += offered[n] // 10
            share.sample(clock.t)
        reports = {n: share.report(clock.t) for n, (_, share) in agents.items()}
        for n, (_, share) in agents.items():
            for m, line in reports.items():
                if m != n:
                    assert share._take(line.rstrip(b"\n"), f"10.0.0.{m[1]}", frozenset({m})) is None
            share.recompute(clock.t)
    shares = {n: rl.status()[0]["share"] for n, (rl, _) in agents.items()}
    assert shares == pytest.approx({"n1": 0.8, "n2": 0.1, "n3": 0.1}, abs=0.01)
    assert {rl.status()[0]["sharing"] for rl, _ in agents.values()} == {"by demand"}
    assert agents["n1"][0].status()[0]["peers"] == {"n2": "reachable", "n3": "reachable"}
    # a report claiming another node, or from another address, is refused
    _, s1 = agents["n1"]
    assert "not where the tunnel comes from" in (s1._take(b'{"node":"n3","heard":[],"demand":{}}',
                                                          "10.0.0.2", frozenset({"n2"})) or "")
    assert s1._take(b"[1,2]", "10.0.0.2", frozenset({"n2"})) == "no node name"
    # n1 partitioned: nobody hears it, it hears nobody
    clock.t += 1.0
    for n in ("n2", "n3"):
        agents[n][1].peers.pop("n1")
    fresh = {n: agents[n][1].report(clock.t) for n in ("n2", "n3")}
    agents["n2"][1]._take(fresh["n3"].rstrip(b"\n"), "10.0.0.3", frozenset({"n3"}))
    agents["n3"][1]._take(fresh["n2"].rstrip(b"\n"), "10.0.0.2", frozenset({"n2"}))
    for _, share in agents.values():
        share.recompute(clock.t)
    st1 = agents["n1"][0].status()[0]
    assert st1["sharing"] == "static" and st1["share"] == pytest.approx(1 / 3, abs=1e-3)
    assert "n2, n3" in st1["fallback"]
    assert st1["peers"] == {"n2": "unreachable", "n3": "unreachable"}
    total = sum(rl.status()[0]["share"] for rl, _ in agents.values())
    assert total <= 1.0 + 1e-6  # n1's static third set aside by n2 and n3


def test_explain_names_the_limits_in_force_at_the_picked_endpoint() -> None:
    from agent.cli.explain import _text, explain

    client = """apiVersion: nodemesh.io/v1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {address: 10.244.1.77, node: n1, serviceAccount: web}
"""
    d, _ = mesh(RLP, TCP, client)
    walk = explain(d.snapshot, "shop/web", "GET", "http://api.shop/", {})
    assert walk["outcome"]["answer"] == "forwarded"
    assert walk["ratelimit"]["policies"] == [{
        "name": "shop/api-limit", "scope": "endpoint", "source": "rl.yaml:1",
        "limits": "total=100/s per-identity=20/s 1 override(s) 3 descriptor(s)"}]
    assert "ratelimit:  at shop/api-1: shop/api-limit (endpoint: total=100/s" in _text(walk)
    d, _ = mesh(TCP, client)  # a policy for another port of the service: nothing in force here
    assert "ratelimit" not in explain(d.snapshot, "shop/web", "GET", "http://api.shop/", {})


def test_peer_reports_parse_or_are_refused_never_raise() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    text = RLP.replace("port: 80}", "port: 80}\n  scope: service")
    d, _ = mesh(text, nodes={"n1": 1, "n2": 1})
    _, share = sharing("n1", Clock(), d)
    n2 = frozenset({"n2"})
    assert share._take(b"[" * 100_000, "10.0.0.2", n2) == "not JSON"
    assert share._take(b'{"node":"n2","heard":["n1"],"demand":{"shop/api-limit":1e300,"x/y":5}}',
                       "10.0.0.2", n2) is None
    assert share.peers["n2"].demand == {}  # an absurd rate and another node's policy are ignored
    assert share._take(b'{"node":"n2","heard":"n1","demand":{}}', "10.0.0.2", n2) is not None

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200) | st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20).map(lambda v: json.dumps({"node": "n2", "heard": v, "demand": v}).encode()))
    def any_line(line: bytes) -> None:
        why = share._take(line, "10.0.0.2", n2)
        assert why is None or isinstance(why, str)

    any_line()


def test_a_stored_policy_decodes_or_is_skipped() -> None:
    """What the registry holds may not have come through validation: decoding gives a policy or
    one of the errors the snapshot builder skips, never anything else."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    good = rate_limit_doc(policy())
    values = (st.none() | st.integers(-3, 3) | st.floats() | st.text(max_size=4)
              | st.lists(st.integers(), max_size=2))

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from([("http", "total"), ("http", "descriptors"), ("http", "identities"),
                            ("tcp", "maxConnections"), ("targetRef", "port"), ("targetRef", "name")]),
           values | st.dictionaries(st.sampled_from(["header", "requestsPerSecond", "burst"]), values))
    def decode(where: tuple[str, str], v: object) -> None:
        doc = json.loads(json.dumps(good))
        doc[where[0]][where[1]] = v
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):  # (what the builder skips)
            rate_limit_from_doc(doc)

    decode()
