"""`nodemesh top` and the dashboard server against simulated agents on loopback (the agent's own
metric code behind real sockets): the numbers match the rates the agents counted, a silent
agent shows as down, the page and its assets are served from the package."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from agent.cli.main import cli
from agent.dashboard.scrape import Poller, parse_target
from agent.dashboard.server import Dashboard
from agent.dashboard.state import MeshState
from agent.metrics.istio import ConnLabels
from tests.component.dashboard_sim import Flow, SimAgent, TcpFlow, request_labels

HOST = "127.0.0.91"
SILENT = "127.0.0.92"
DASH = "127.0.0.90"


@pytest.fixture
def agents() -> Iterator[tuple[SimAgent, SimAgent]]:
    n1 = SimAgent(HOST, 20901, "n1", [
        Flow(request_labels("client", "web", "web-1"), 50.0, (0.7, 3.0, 3.0, 7.0)),
        Flow(request_labels("client", "web", "web-1"), 10.0, (3.0,), code=503),
    ], [TcpFlow(ConnLabels("source", "client", "default", "-", "db.default.svc.cluster.local", "db-1",
                           "default", "-", "mutual_tls"), 5.0)])
    n2 = SimAgent(SILENT, 20902, "n2", [Flow(request_labels("other", "api", "api-1", mtls=False), 20.0)])
    with n1, n2:
        yield n1, n2


def test_top_once_json_numbers_match_what_the_agents_counted(agents: tuple[SimAgent, SimAgent]) -> None:
    r = CliRunner().invoke(cli, ["top", "--once", "-o", "json", "--interval", "1",
                                 "--agent", f"http://{HOST}:20901", "--agent", f"http://{SILENT}:20902"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [a["up"] for a in doc["agents"]] == [True, True]
    rows = {(x["source"], x["service"], x["destination"]): x for x in doc["rows"]}
    web = rows[("default/client", "web.default.svc.cluster.local", "default/web-1")]
    assert web["rps"] == pytest.approx(60, rel=0.1)
    assert web["success"] == pytest.approx(50 / 60, abs=0.04)
    assert web["mtls"] == 1.0 and web["protocols"] == ["http"]
    # latencies 0.7 / 3 / 3 / 7 (and 3 for the 503s): p50 in (1, 5], p99 in (5, 10]
    assert 1 < web["p50_ms"] <= 5 and 5 < web["p99_ms"] <= 10
    api = rows[("default/other", "api.default.svc.cluster.local", "default/api-1")]
    assert api["rps"] == pytest.approx(20, rel=0.1) and api["mtls"] == 0.0 and api["success"] == 1.0
    db = rows[("default/client", "db.default.svc.cluster.local", "default/db-1")]
    assert db["protocols"] == ["tcp"] and db["bytes_per_s"] == pytest.approx(5 * 5000, rel=0.15)
    first = doc["rows"][0]  # sorted by rps
    assert first["source"] == "default/client" and first["service"].startswith("web")

    r = CliRunner().invoke(cli, ["top", "--once", "--interval", "0.3", "--sort", "success",
                                 "--agent", f"http://{HOST}:20901"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "1 agents, all answering"
    assert lines[1].split()[:3] == ["SOURCE", "SERVICE", "DESTINATION"]
    assert "web.default.svc.cluster.local" in lines[2]  # the failing edge first


def test_top_refuses_nothing_to_read_and_bad_agents() -> None:
    r = CliRunner().invoke(cli, ["top", "--once"])
    assert r.exit_code == 2 and "nothing to read" in r.output and "--agent" in r.output
    r = CliRunner().invoke(cli, ["top", "--once", "--agent", "http://x"])
    assert r.exit_code == 2 and "needs the port" in r.output


def test_dashboard_serves_page_assets_and_view_and_a_silent_agent_is_down(
    agents: tuple[SimAgent, SimAgent],
) -> None:
    _, n2 = agents
    targets = [parse_target(f"http://{HOST}:20901"), parse_target(f"http://{SILENT}:20902")]
    dash = Dashboard(Poller(MeshState(1.0), targets, timeout_s=0.5), 1.0, DASH, 20900)
    import threading

    t = threading.Thread(target=dash.httpd.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://{DASH}:20900"

        def get(path: str) -> tuple[int, str, bytes]:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as resp:
                    return resp.status, resp.headers["Content-Type"], resp.read()
            except urllib.error.HTTPError as e:
                return e.code, e.headers["Content-Type"], e.read()

        status, ctype, body = get("/")
        assert status == 200 and ctype.startswith("text/html") and b'<script src="/app.js">' in body
        assert b"http://" not in body.replace(b"http://www.w3.org", b"")  # nothing from elsewhere
        status, ctype, js = get("/app.js")
        assert status == 200 and "javascript" in ctype and b"/api/view" in js
        assert get("/app.css")[0] == 200 and get("/nope")[0] == 404
        dash.poll_once()
        time.sleep(0.6)
        dash.poll_once()
        view = json.loads(get("/api/view")[2])
        assert [n["up"] for n in view["nodes"]] == [True, True]
        assert view["nodes"][0]["status"]["policies"] == {"AuthorizationPolicy": 1, "VirtualService": 0}
        edges = {(e["source"], e["target"]) for e in view["graph"]["edges"]}
        assert ("w:default/other", "s:api.default.svc.cluster.local") in edges
        n2.freeze()
        t0 = time.monotonic()
        dash.poll_once()
        took = time.monotonic() - t0
        view = json.loads(get("/api/view")[2])
        down = {n["name"]: n for n in view["nodes"]}[f"{SILENT}:20902"]
        assert not down["up"] and "no full answer in 0.5 s" in down["error"] and took < 1.5
        assert all(e["source"] != "w:default/other" for e in view["graph"]["edges"])
        assert {n["name"]: n for n in view["nodes"]}[f"{HOST}:20901"]["up"]
    finally:
        dash.httpd.shutdown()
        dash.close()
