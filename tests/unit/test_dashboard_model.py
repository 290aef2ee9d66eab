"""The dashboard's numbers: parsing, rates from two scrapes, quantiles, the graph, agent state."""

from __future__ import annotations

import math

import pytest

from agent.dashboard import graph, model, promtext, scrape, state
from agent.dashboard.model import EdgeKey
from agent.metrics.istio import MeshMetrics

BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000)


def series(name: str, value: float, **labels: str) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{body}}} {value}\n"


def request_lines(
    n: float,
    latencies_ms: dict[float, float] | None = None,
    *,
    reporter: str = "source",
    src: str = "client",
    svc: str = "web.default.svc.cluster.local",
    dst: str = "web-1",
    code: str = "200",
    proto: str = "http",
    mtls: bool = True,
    grpc: str = "",
) -> str:
    """istio_requests_total and the duration histogram of one label set; ``latencies_ms``
    maps an upper bucket bound to how many requests fell at or below it (cumulative)."""
    labels = {
        "reporter": reporter, "source_workload": src, "source_workload_namespace": "default",
        "destination_service": svc, "destination_workload": dst,
        "destination_workload_namespace": "default",
        "connection_security_policy": "mutual_tls" if mtls else "none", "request_protocol": proto,
        "response_code": code, "grpc_response_status": grpc, "response_flags": "-",
    }
    out = series("istio_requests_total", n, **labels)
    cum = latencies_ms or {}
    for le in BUCKETS:
        c = max((v for b, v in cum.items() if b <= le), default=0.0)
        out += series("istio_request_duration_milliseconds_bucket", c, **labels, le=str(le))
    out += series("istio_request_duration_milliseconds_bucket", n, **labels, le="+Inf")
    return out


def tcp_lines(opened: float, closed: float, sent: float, received: float, *, mtls: bool = True) -> str:
    labels = {
        "reporter": "source", "source_workload": "client", "source_workload_namespace": "default",
        "destination_service": "db.default.svc.cluster.local", "destination_workload": "db-1",
        "destination_workload_namespace": "default",
        "connection_security_policy": "mutual_tls" if mtls else "none", "response_flags": "-",
    }
    return (series("istio_tcp_connections_opened_total", opened, **labels)
            + series("istio_tcp_connections_closed_total", closed, **labels)
            + series("istio_tcp_sent_bytes_total", sent, **labels)
            + series("istio_tcp_received_bytes_total", received, **labels))


def scrape_of(text: str, at_s: float, node: str = "n1") -> model.NodeScrape:
    p = promtext.parse(text, model.WANTED)
    return model.node_scrape(node, at_s, p.samples, p.skipped_lines)


# -- parsing -------------------------------------------------------------------------------------


def test_parse_keeps_wanted_families_and_unescapes_label_values() -> None:
    text = (
        "# HELP istio_requests_total Requests\n# TYPE istio_requests_total counter\n"
        'istio_requests_total{a="x\\"y",b="back\\\\slash",c="line\\nbreak",d="{}, ="} 7\n'
        "istio_requests_created{a=\"x\"} 1.7e9\n"
        "process_cpu_seconds_total 3\n"
        "nodemesh_registry_revision 42\n"
        "istio_requests_total{broken 1\n"
        "istio_requests_total{a=\"1\"} not-a-number\n"
        "istio_requests_total{a=\"nan\"} NaN\n"
        'istio_requests_total{a="ts"} 5 1700000000000\n'
    )
    p = promtext.parse(text, ("istio_requests_total", "nodemesh_registry_*"))
    assert [(s.name, s.value) for s in p.samples] == [
        ("istio_requests_total", 7.0), ("nodemesh_registry_revision", 42.0), ("istio_requests_total", 5.0)
    ]
    assert p.samples[0].labels == {"a": 'x"y', "b": "back\\slash", "c": "line\nbreak", "d": "{}, ="}
    assert p.skipped_lines == 3


def test_a_series_labels_are_parsed_once_and_shared_by_its_buckets() -> None:
    text = request_lines(3, {1: 2, 5: 3})
    cache: promtext.LabelCache = {}
    p = promtext.parse(text, model.WANTED, cache)
    req, *buckets = p.samples
    assert req.name == "istio_requests_total" and len(buckets) == len(BUCKETS) + 1
    assert all(b.labels is req.labels for b in buckets) and "le" not in req.labels
    assert [b.le for b in buckets] == [*map(float, BUCKETS), math.inf]
    again = promtext.parse(text, model.WANTED, cache)
    assert again.samples[0].labels is req.labels and len(cache) == 1


def test_the_agents_own_exposition_is_read_whole() -> None:
    """What MeshMetrics exports (prometheus_client sorts labels by name: ``le`` in the middle)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from tests.component.dashboard_sim import request_labels

    reg = CollectorRegistry()
    m = MeshMetrics(reg)
    for ms in (0.7, 3.0, 3.0, 7.0):
        m.request(request_labels("client", "web", "web-1"), "http", 200, "", "-", ms, 10, 20)
    m.request(request_labels("client", "web", "web-1"), "http", 503, "", "-", 30.0, 10, 20)
    text = generate_latest(reg).decode()
    assert ',le="0.5",' in text  # (not last)
    p = promtext.parse(text, model.WANTED)
    assert p.skipped_lines == 0
    ns = model.node_scrape("n1", 0, p.samples)
    (c,) = ns.edges.values()
    assert (c.requests, c.errors, c.mtls) == (5, 1, 5)
    assert c.buckets[1.0] == 1 and c.buckets[5.0] == 3 and c.buckets[10.0] == 4 and c.buckets[math.inf] == 5


def test_prometheus_api_buckets_keep_le_among_labels_and_count_the_same() -> None:
    text = request_lines(4, {1: 1, 5: 4})
    direct = scrape_of(text, 0)
    samples = promtext.parse(text, model.WANTED).samples
    api = [promtext.Sample(s.name, {**s.labels, **({"le": str(s.le)} if s.le is not None else {})}, s.value)
           for s in samples]
    assert model.node_scrape("n1", 0, api).edges == direct.edges


def test_prometheus_api_answer_becomes_samples_per_instance() -> None:
    doc = {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"__name__": "istio_requests_total", "instance": "n1:15020", "reporter": "source"},
         "value": [100.5, "3"]},
        {"metric": {"__name__": "istio_requests_total", "instance": "n1:15020"}, "value": [101.0, "4"]},
        {"metric": {"__name__": "up", "instance": "n2:15020"}, "value": [99.0, "0"]},
        {"metric": {"__name__": "x"}, "value": "garbage"},
    ]}}
    got = promtext.from_prometheus_api(doc)
    assert sorted(got) == ["n1:15020", "n2:15020"]
    at, samples = got["n1:15020"]
    assert at == 101.0 and [s.value for s in samples] == [3.0, 4.0]
    assert samples[0].labels == {"instance": "n1:15020", "reporter": "source"}
    with pytest.raises(ValueError, match="bad query"):
        promtext.from_prometheus_api({"status": "error", "error": "bad query"})
    with pytest.raises(ValueError, match="instant vector"):
        promtext.from_prometheus_api({"status": "success", "data": {"resultType": "matrix"}})


# -- quantiles -----------------------------------------------------------------------------------


def test_histogram_quantile_interpolates_inside_the_bucket_as_prometheus_does() -> None:
    b = {1.0: 10.0, 5.0: 30.0, 10.0: 40.0, math.inf: 40.0}
    assert model.histogram_quantile(0.25, b) == pytest.approx(1.0)  # rank 10: the top of (0, 1]
    assert model.histogram_quantile(0.5, b) == pytest.approx(1 + 4 * (20 - 10) / 20)  # 3.0
    assert model.histogram_quantile(0.99, b) == pytest.approx(5 + 5 * (39.6 - 30) / 10)
    assert model.histogram_quantile(0.1, b) == pytest.approx(0.4)  # first bucket from 0
    # all in +Inf: the highest finite bound; no observations: None
    assert model.histogram_quantile(0.5, {1.0: 0.0, math.inf: 5.0}) == 1.0
    assert model.histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert model.histogram_quantile(0.5, {}) is None


# -- rates ---------------------------------------------------------------------------------------


def test_rates_success_latency_and_mtls_from_two_scrapes() -> None:
    a = scrape_of(request_lines(100, {1: 50, 5: 100}) + request_lines(0, code="503"), 10.0)
    b = scrape_of(request_lines(300, {1: 50, 5: 250, 10: 300}) + request_lines(20, {5: 20}, code="503"), 12.0)
    w = model.window(a, b)
    assert w is not None and w.dt_s == 2.0
    st = model.stats([w], model.by_service)["web.default.svc.cluster.local"]
    assert st.rps == pytest.approx(110.0)  # (200 + 20) / 2 s
    assert st.error_rps == pytest.approx(10.0)
    assert st.success == pytest.approx(200 / 220)
    # window: 220 requests, 0 at <=1 ms, 170 at <=5, 220 at <=10: p50 rank 110 in (1, 5]
    assert st.latency_ms[0] == pytest.approx(1 + 4 * 110 / 170)
    assert st.latency_ms[2] == pytest.approx(5 + 5 * (217.8 - 170) / 50)
    assert st.mtls == 1.0 and st.protocols == ("http",) and st.requests_total == 320


def test_a_counter_that_went_down_is_a_restarted_agent_not_a_negative_rate() -> None:
    a = scrape_of(request_lines(1000, {1: 1000}), 0.0)
    b = scrape_of(request_lines(30, {1: 30}), 3.0)
    w = model.window(a, b)
    assert w is not None
    st = model.stats([w], model.by_service)["web.default.svc.cluster.local"]
    assert st.rps == pytest.approx(10.0) and st.latency_ms[0] == pytest.approx(0.75)  # all in (0.5, 1]
    assert model.window(b, b) is None  # no time passed: no window


def test_each_request_counts_once_source_reporter_first() -> None:
    text = (
        request_lines(10, reporter="source")
        + request_lines(10, reporter="destination")  # the same requests, seen at the destination
        + request_lines(4, reporter="destination", src="unknown")  # a caller outside the mesh
    )
    a = scrape_of(text.replace(" 10\n", " 0\n").replace(" 4\n", " 0\n"), 0.0)
    b = scrape_of(text, 1.0)
    w = model.window(a, b)
    assert w is not None
    rows = model.stats([w], model.by_edge)
    assert rows[("default/client", "web.default.svc.cluster.local", "default/web-1")].rps == 10
    assert rows[("unknown", "web.default.svc.cluster.local", "default/web-1")].rps == 4
    assert sum(s.rps for s in rows.values()) == 14


def test_what_counts_as_failed() -> None:
    codes = {"200": 0, "404": 0, "503": 1, "0": 1}
    text0 = "".join(request_lines(0, code=c, dst=f"w{c}") for c in codes)
    text1 = "".join(request_lines(1, code=c, dst=f"w{c}") for c in codes)
    for g in ("0", "5"):
        text0 += request_lines(0, proto="grpc", grpc=g, dst=f"g{g}")
        text1 += request_lines(1, proto="grpc", grpc=g, dst=f"g{g}")
    w = model.window(scrape_of(text0, 0), scrape_of(text1, 1))
    assert w is not None
    got = {k: s.error_rps for k, s in model.stats([w], model.by_workload).items()}
    assert got == {"default/w200": 0, "default/w404": 0, "default/w503": 1, "default/w0": 1,
                   "default/g5": 1, "default/g0": 0}


def test_tcp_bytes_per_second_and_connections() -> None:
    w = model.window(scrape_of(tcp_lines(10, 8, 1000, 500), 0), scrape_of(tcp_lines(14, 10, 5000, 2500), 2))
    assert w is not None
    st = model.stats([w], model.by_service)["db.default.svc.cluster.local"]
    assert st.bytes_per_s == pytest.approx((4000 + 2000) / 2)
    assert st.connections_per_s == pytest.approx(2.0)
    assert st.connections_open == 4  # 14 opened, 10 closed
    assert st.protocols == ("tcp",) and st.mtls == 1.0 and st.rps == 0 and st.success is None


def test_mtls_share_and_windows_of_several_nodes_add_up() -> None:
    w1 = model.window(scrape_of(request_lines(0, mtls=False), 0, "n1"),
                      scrape_of(request_lines(10, mtls=False), 1, "n1"))
    w2 = model.window(scrape_of(request_lines(0, src="c2"), 0, "n2"),
                      scrape_of(request_lines(60, src="c2"), 2, "n2"))
    assert w1 is not None and w2 is not None
    st = model.stats([w1, w2], model.by_service)["web.default.svc.cluster.local"]
    assert st.rps == pytest.approx(10 + 30)  # each node over its own elapsed time
    assert st.mtls == pytest.approx(60 / 70)


def test_idle_edges_leave_the_view() -> None:
    text = request_lines(5, dst="busy") + request_lines(7, dst="idle")
    w = model.window(scrape_of(text.replace(" 5\n", " 0\n"), 0), scrape_of(text, 1))
    assert w is not None
    assert list(model.stats([w], model.by_workload)) == ["default/busy"]


def test_top_rows_sort() -> None:
    rows = [{"source": "a", "destination": "x", "service": "s", "rps": 1.0, "success": 1.0, "p99_ms": 9.0},
            {"source": "b", "destination": "y", "service": "s", "rps": 5.0, "success": 0.5, "p99_ms": 1.0},
            {"source": "c", "destination": "z", "service": "s", "rps": 0.0, "success": None, "p99_ms": None}]
    assert [r["source"] for r in model.sort_rows(rows, "rps")] == ["b", "a", "c"]
    assert [r["source"] for r in model.sort_rows(rows, "success")] == ["b", "a", "c"]
    assert [r["source"] for r in model.sort_rows(rows, "p99_ms")] == ["a", "b", "c"]
    assert [r["source"] for r in model.sort_rows(rows, "destination")] == ["a", "b", "c"]


# -- graph ---------------------------------------------------------------------------------------


def test_layout_puts_callers_left_of_callees_and_survives_cycles() -> None:
    pos = graph.layout(["a", "b", "c", "d"], [("a", "b"), ("b", "c"), ("c", "a"), ("a", "d"), ("d", "c")])
    assert pos["a"][0] == 0 and pos["b"][0] == 1 and pos["d"][0] == 1 and pos["c"][0] == 2
    shuffled = [("d", "c"), ("a", "d"), ("c", "a"), ("b", "c"), ("a", "b")]
    assert graph.layout(["a", "b", "c", "d"], shuffled) == pos
    assert {p for p in pos.values()} == {(0, 0), (1, 0), (1, 1), (2, 0)}  # no two nodes in one place


def test_service_graph_has_workload_service_workload_hops_with_their_numbers() -> None:
    text0 = (request_lines(0, dst="web-1") + request_lines(0, dst="web-2")
             + request_lines(0, dst="unknown", code="503"))
    text1 = (request_lines(10, {5: 10}, dst="web-1") + request_lines(30, {5: 30}, dst="web-2")
             + request_lines(2, dst="unknown", code="503"))
    w = model.window(scrape_of(text0, 0), scrape_of(text1, 1))
    assert w is not None
    g = graph.service_graph([w])
    ids = {n["id"]: n for n in g["nodes"]}
    assert set(ids) == {"w:default/client", "s:web.default.svc.cluster.local", "w:default/web-1",
                        "w:default/web-2"}
    x = {k: n["x"] for k, n in ids.items()}
    assert x["w:default/client"] < x["s:web.default.svc.cluster.local"] < x["w:default/web-1"]
    edges = {(e["source"], e["target"]): e for e in g["edges"]}
    to_svc = edges[("w:default/client", "s:web.default.svc.cluster.local")]
    assert to_svc["rps"] == 42 and to_svc["success"] == pytest.approx(40 / 42, abs=1e-4)
    assert to_svc["mtls"] == 1.0 and to_svc["protocols"] == ["http"] and not to_svc["tcp_only"]
    assert edges[("s:web.default.svc.cluster.local", "w:default/web-2")]["rps"] == 30
    assert len(edges) == 3  # the failed requests reached no workload: no third hop


# -- agent state ---------------------------------------------------------------------------------


def test_an_agent_that_stops_answering_is_down_at_once_and_its_traffic_leaves_the_view() -> None:
    ms = state.MeshState(refresh_s=2)
    ms.observe("n1", 0, scrape_of(request_lines(0), 0), status={"ok": True, "registry": {"revision": 7}})
    ms.observe("n1", 2, scrape_of(request_lines(20), 2), status={"ok": True, "registry": {"revision": 7}})
    v = ms.end_round(2)
    assert v["nodes"][0]["up"] and v["nodes"][0]["status"]["registry"]["revision"] == 7
    assert v["top"][0]["rps"] == 10
    ms.observe("n1", 4, None, "timed out")
    v = ms.end_round(4)
    assert v["nodes"][0] == {**v["nodes"][0], "up": False, "error": "timed out", "last_ok_ago_s": 2.0,
                             "status": {}}
    assert v["top"] == [] and v["graph"]["nodes"] == []


def test_history_is_bounded() -> None:
    ms = state.MeshState(refresh_s=1)
    text = request_lines(0)
    for i in range(state.HISTORY_POINTS + 20):
        ms.observe("n1", i, scrape_of(text.replace(" 0\n", f" {i}\n", 1), i))
        v = ms.end_round(i)
    (svc,) = v["services"]
    assert len(svc["history"]) == state.HISTORY_POINTS and svc["history"][-1][1] == 1.0


def test_node_summary_reads_the_agents_status_document() -> None:
    doc = {
        "ok": False, "ready": True, "uptime_s": 5,
        "interception": {"ok": True, "hooks": [{"attached": True}, {"attached": False}], "enrolled": 3},
        "certificates": [{"spiffe_id": "spiffe://x/ns/a/sa/b", "expires_in_s": 900}, {"expires_in_s": 50}],
        "registry": {"backend": "embedded", "revision": 12, "stale": True, "stale_for_s": 3.5},
        "degraded": ["listener hbone cannot accept"], "policies": {"AuthorizationPolicy": 2, "Gateway": 0},
    }
    s = state.node_summary(doc)
    assert s["interception"] == {"ok": True, "hooks_attached": 1, "hooks": 2, "enrolled": 3, "error": None}
    assert s["first_expiry_s"] == 50 and s["registry"]["stale"] and s["registry"]["revision"] == 12
    assert s["policies"] == {"AuthorizationPolicy": 2} and s["degraded"] == ["listener hbone cannot accept"]
    doc["rate_limits"] = [
        {"policy": "shop/per-node", "service": "cart", "port": 80, "scope": "node",
         "buckets": [{"rate_per_s": 10.0}], "limited": 3},
        {"policy": "shop/shared", "service": "cart", "port": 80, "scope": "service", "share": 0.25,
         "total_per_s": 100.0, "local_per_s": 25.0, "sharing": "by demand", "limited": 0},
    ]
    assert state.node_summary(doc)["rate_limits"] == [
        "shop/per-node on cart:80 10/s here, 3 limited",
        "shop/shared on cart:80 25/s here (25% of 100.0/s, by demand)",
    ]


# -- targets -------------------------------------------------------------------------------------


def test_targets() -> None:
    assert scrape.parse_target("10.0.0.5") == scrape.Target("10.0.0.5", "10.0.0.5", 15020, 15021)
    assert scrape.parse_target("node-a.example:9020", 15020, 9021) == scrape.Target(
        "node-a.example:9020", "node-a.example", 9020, 9021)
    assert scrape.parse_target("[::1]:15020").host == "::1"
    t = scrape.parse_target("http://127.0.0.1:8080/")
    assert (t.metrics_port, t.status_port) == (8080, 8080)
    for bad in ("", "http://x", "a b", "host:99999", "ftp://x:1"):
        with pytest.raises(scrape.TargetError):
            scrape.parse_target(bad)


def test_lines_of_body_pieces_split_anywhere() -> None:
    text = request_lines(7, {1: 3, 5: 7}) + "# HELP other\nother_total 1\n" + tcp_lines(2, 1, 10, 20)
    body = text.encode()
    starts = tuple(w.rstrip("*").encode() for w in model.WANTED)
    whole = promtext.parse(text, model.WANTED)
    for size in (1, 7, 100, len(body)):
        pieces = [body[i:i + size] for i in range(0, len(body), size)]
        got = promtext.parse_lines(scrape.lines_of(pieces, starts), model.WANTED)
        assert got == whole, size
    assert list(scrape.lines_of([b"istio_requests_total 1"], starts)) == ["istio_requests_total 1"]


def test_edge_keys_sort_and_name_workloads_with_their_namespace() -> None:
    a = scrape_of(request_lines(1), 0)
    key = EdgeKey("default/client", "web.default.svc.cluster.local", "default/web-1", "http")
    assert list(a.edges) == [key]
