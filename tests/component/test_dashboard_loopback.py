"""`nodemesh top` and the dashboard server against simulated agents on loopback (the agent's own
metric code behind real sockets): the numbers match the rates the agents counted, a silent
agent shows as down, the page and its assets are served from the package."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

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
    r = CliRunner().invoke(cli, ["top", "--once", "--admin", "127.0.0.94:20904"])  # (no agent there)
    assert r.exit_code == 3, r.output
    assert "nothing to read: no agent's config at 127.0.0.94:20904: connection refused" in r.output
    assert "--agent" in r.output
    r = CliRunner().invoke(cli, ["top", "--once", "--agent", "http://x"])
    assert r.exit_code == 2 and "needs the port" in r.output
    r = CliRunner().invoke(cli, ["top", "--once", "-o", "json", "--interval", "0.2",
                                 "--agent", "http://127.0.0.94:20904"])
    assert r.exit_code == 3  # no agent answered
    assert json.loads(r.output)["agents"] == [{"name": "127.0.0.94:20904", "address": "127.0.0.94:20904",
                                               "up": False, "error": "connection refused"}]


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
        assert view["nodes"][0]["status"]["policies"] == {"AuthorizationPolicy": 1}  # (none: left out)
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


PROM = "127.0.0.93"


@pytest.fixture
def prometheus(agents: tuple[SimAgent, SimAgent], tmp_path: Any) -> Iterator[str]:
    """A real Prometheus on loopback scraping the two simulated agents every second."""
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(json.dumps({  # (YAML is a superset of JSON)
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [{"job_name": "nodemesh", "static_configs": [
            {"targets": [f"{HOST}:20901", f"{SILENT}:20902"]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path}/tsdb",
         f"--web.listen-address={PROM}:20903", "--log.level=warn"], stdout=log, stderr=log)
    log.close()
    url = f"http://{PROM}:20903"
    try:
        deadline = time.monotonic() + 20
        while True:  # both targets scraped at least twice
            try:
                q = urllib.parse.urlencode({"query": "count_over_time(up[10s])"})
                with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=2) as r:
                    result = json.loads(r.read())["data"]["result"]
                if len(result) == 2 and all(float(x["value"][1]) >= 3 for x in result):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not scrape the agents"
            time.sleep(0.3)
        yield url
    finally:
        proc.kill()  # by PID: the one this fixture started
        proc.wait()


def test_top_through_a_real_prometheus_and_a_target_it_cannot_scrape(
    agents: tuple[SimAgent, SimAgent], prometheus: str
) -> None:
    def top(interval: str) -> dict[str, Any]:
        r = CliRunner().invoke(cli, ["top", "--once", "-o", "json", "--interval", interval,
                                     "--prometheus", prometheus])
        assert r.exit_code == 0, r.output
        doc: dict[str, Any] = json.loads(r.output)
        return doc

    doc = top("2.5")
    assert {a["name"]: a["up"] for a in doc["agents"]} == {f"{HOST}:20901": True, f"{SILENT}:20902": True}
    rows = {(x["source"], x["service"], x["destination"]): x for x in doc["rows"]}
    web = rows[("default/client", "web.default.svc.cluster.local", "default/web-1")]
    assert web["rps"] == pytest.approx(60, rel=0.25) and web["success"] == pytest.approx(50 / 60, abs=0.06)
    assert 1 < web["p50_ms"] <= 5 and web["mtls"] == 1.0
    assert rows[("default/other", "api.default.svc.cluster.local", "default/api-1")]["mtls"] == 0.0

    agents[1].freeze()  # Prometheus' scrapes of it time out: up == 0
    deadline = time.monotonic() + 10
    while True:
        doc = top("0.3")
        state = {a["name"]: a for a in doc["agents"]}
        if not state[f"{SILENT}:20902"]["up"]:
            break
        assert time.monotonic() < deadline, state
    assert state[f"{SILENT}:20902"]["error"] == "down in Prometheus (up == 0)"
    assert state[f"{HOST}:20901"]["up"]
    assert all(r["source"] != "default/other" for r in doc["rows"])
