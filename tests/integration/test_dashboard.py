"""The dashboard and `nodemesh top` on the testbed mesh: real eBPF capture, real agents, real HBONE
mTLS, nginx in pods, steady traffic from a client pod (HTTP 200s and 503s, TCP connections), the
dashboard as a user runs it (`nodemesh dashboard --testbed`), read by headless Chromium (selenium,
Debian's chromium-driver). Every number the page and `top` show is checked against the agents'
own /metrics, read by the test before and after; a stopped agent must show as down within 10 s."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent import meshbed
from netns import testbed, topology
from tests.browser import artifacts_dir, chromium, console_errors
from tests.integration.conftest import pod_nginx, run_prefix
from tests.integration.scrape import node_metrics

pytestmark = pytest.mark.root

WEB_VIP = "10.96.0.40"
DB_VIP = "10.96.0.41"
WEB = "web.default.svc.cluster.local"
DB = "db.default.svc.cluster.local"
DASH_HOST, DASH_PORT = "127.0.0.90", 20950
MANIFEST = f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  vip: {WEB_VIP}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080}}
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: db, namespace: default}}
spec:
  vip: {DB_VIP}
  selector: {{app: web}}
  ports:
  - {{name: tcp-db, port: 5432, targetPort: 8080}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web-allow-all, namespace: default}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules: [{{}}]
---
"""
ROLES: dict[str, meshbed.Role] = {
    "n1-p1": ("client", {"app": "client"}, {}),
    "n2-p1": ("web", {"app": "web"}, {}),
    "n2-p2": ("web", {"app": "web"}, {}),
}
NGINX = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  server {{
    listen {addr}:8080;
    location / {{ return 200 "{pod}"; }}
    location /fail {{ return 503 "{pod} failing"; }}
  }}
}}
"""
RATE_RPS = 20.0  # requests to web per second; every 4th is /fail (503)
TCP_EVERY = 10  # one TCP connection to db per 10 requests (2 per second)
TRAFFIC = textwrap.dedent(
    """
    import socket, sys, time, urllib.error, urllib.request
    web, db = sys.argv[1], sys.argv[2]
    rate, seconds, tcp_every = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    start = time.monotonic()
    n = 0
    print("ready", flush=True)
    while time.monotonic() - start < seconds:
        url = f"http://{web}/fail" if n % 4 == 3 else f"http://{web}/"
        try:
            urllib.request.urlopen(url, timeout=5).read()
        except (urllib.error.URLError, OSError):
            pass
        if n % tcp_every == 0:
            try:
                with socket.create_connection((db, 5432), timeout=5) as s:
                    s.sendall(b"GET / HTTP/1.0\\r\\nHost: db\\r\\n\\r\\n")
                    while s.recv(65536):
                        pass
            except OSError:
                pass
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
    """
)


@dataclass
class Mesh:
    bed: meshbed.MeshBed
    prefix: str
    dashboard: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{DASH_HOST}:{DASH_PORT}/"


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    prefix = run_prefix("d")
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
    work = f"/run/nodemesh/{prefix}-www"
    os.makedirs(work, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with meshbed.running(topo, MANIFEST + meshbed.workload_manifest(topo, ROLES)) as mb, \
                pod_nginx(topo, work, NGINX, ("n2-p1", "n2-p2")):
            try:
                client = topo.pod("n1-p1")
                assert client is not None
                traffic = testbed.popen_in_pod(
                    client,
                    [sys.executable, "-c", TRAFFIC, WEB_VIP, DB_VIP, str(RATE_RPS), "150", str(TCP_EVERY)],
                    stdout=subprocess.PIPE,
                )
                procs.append(traffic)
                assert traffic.stdout is not None and traffic.stdout.readline() == b"ready\n"
                log = open(os.path.join(work, "dashboard.log"), "wb")  # noqa: SIM115 (closed below)
                dash = subprocess.Popen(
                    [*meshbed.NODEMESH, "dashboard", "--testbed", prefix, "--host", DASH_HOST,
                     "--port", str(DASH_PORT), "--refresh", "2", "--timeout", "2"],
                    stdout=log, stderr=log,
                )
                procs.append(dash)
                log.close()
                deadline = time.monotonic() + 20
                while True:
                    try:
                        with urllib.request.urlopen(f"http://{DASH_HOST}:{DASH_PORT}/healthz", timeout=2):
                            break
                    except OSError:
                        alive = dash.poll() is None and time.monotonic() < deadline
                        assert alive, _read(work, "dashboard.log")
                        time.sleep(0.2)
                time.sleep(5)  # two rounds with traffic
                yield Mesh(mb, prefix, dash)
            finally:
                for p in mb.agents.values():  # a test may leave one stopped
                    if p.poll() is None:
                        os.kill(p.pid, signal.SIGCONT)
                for p in procs:  # by PID: what this fixture started
                    p.kill()
                    p.wait()
    finally:
        testbed.down(prefix)
        shutil.rmtree(work, ignore_errors=True)


def _read(work: str, name: str) -> str:
    try:
        with open(os.path.join(work, name)) as f:
            return f.read()[-3000:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def browser(mesh: Mesh) -> Iterator[Any]:
    with chromium(DASH_HOST) as driver:
        driver.get(mesh.url)
        yield driver


# -- what the agents counted, read by the test itself ---------------------------------------------


@dataclass
class Counts:
    at_s: float
    text: str

    def requests(self, **labels: str) -> float:
        return _sum(self.text, "istio_requests_total", labels)

    def tcp_bytes(self, **labels: str) -> float:
        return (_sum(self.text, "istio_tcp_sent_bytes_total", labels)
                + _sum(self.text, "istio_tcp_received_bytes_total", labels))

    def buckets(self, **labels: str) -> dict[float, float]:
        out: dict[float, float] = {}
        for line in self.text.splitlines():
            if line.startswith("istio_request_duration_milliseconds_bucket{") and _has(line, labels):
                le = float(re.search(r'le="([^"]+)"', line).group(1))  # type: ignore[union-attr]
                out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
        return out


def _has(line: str, labels: dict[str, str]) -> bool:
    return all(f'{k}="{v}"' in line for k, v in labels.items())


def _sum(text: str, name: str, labels: dict[str, str]) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and _has(line, labels))


def counts(mesh: Mesh) -> Counts:
    return Counts(time.monotonic(), node_metrics(mesh.bed.topo, "n1"))  # the client's node: source reports


SRC = {"reporter": "source", "source_workload": "n1-p1"}


def expected(a: Counts, b: Counts, **labels: str) -> tuple[float, float]:
    """(requests/s, success share) between two reads."""
    dt = b.at_s - a.at_s
    total = b.requests(**SRC, **labels) - a.requests(**SRC, **labels)
    failed = (b.requests(**SRC, response_code="503", **labels)
              - a.requests(**SRC, response_code="503", **labels))
    return total / dt, 1 - failed / total


def quantile_bounds(a: Counts, b: Counts, q: float, **labels: str) -> tuple[float, float]:
    """The bucket bounds that must hold the q-quantile of the traffic between two reads, widened
    to the buckets of q-0.2 and q+0.2 (the page's window is shorter than the test's)."""
    nb, na = b.buckets(**SRC, **labels), a.buckets(**SRC, **labels)
    d = {le: nb[le] - na.get(le, 0.0) for le in nb}
    les = sorted(d)
    total = d[les[-1]]

    def bucket(p: float) -> int:
        return next(i for i, le in enumerate(les) if d[le] >= min(1.0, max(0.0, p)) * total)

    lo, hi = bucket(q - 0.2), bucket(min(q + 0.2, 1.0))
    return (les[lo - 1] if lo > 0 else 0.0), (les[hi] if not math.isinf(les[hi]) else les[hi - 1])


# -- the page -------------------------------------------------------------------------------------

READ_PAGE = """
const text = (e) => e ? e.textContent : null;
return {
  round: window.nmRender.round,
  edges: [...document.querySelectorAll('#graph .edge')].map(g => ({
    source: g.dataset.source, target: g.dataset.target, cls: g.getAttribute('class'),
    lines: [...g.querySelectorAll('tspan')].map(t => t.textContent)})),
  nodes: [...document.querySelectorAll('#nodes tbody tr')].map(tr => ({
    name: tr.dataset.node, up: tr.dataset.up, cells: [...tr.cells].map(c => c.textContent)})),
  services: [...document.querySelectorAll('#services tbody tr')]
    .map(tr => [...tr.cells].map(c => c.textContent)),
  sparks: document.querySelectorAll('#services svg.spark polyline').length,
  updated: text(document.querySelector('#updated')),
};
"""
UNITS = {"B/s": 1, "KiB/s": 1024, "MiB/s": 1024 ** 2}


def _rps_success(line: str) -> tuple[float, float]:
    m = re.fullmatch(r"([\d.]+) rps · ([\d.]+)%", line)
    assert m, line
    return float(m.group(1)), float(m.group(2)) / 100


def _latencies(line: str) -> tuple[float, float, str, str]:
    m = re.fullmatch(r"p50 ([\d.]+) ms · p99 ([\d.]+) ms · (\S+) · (.+)", line)
    assert m, line
    return float(m.group(1)), float(m.group(2)), m.group(3), m.group(4)


def test_the_graph_and_its_numbers_match_the_metrics(mesh: Mesh, browser: Any) -> None:
    before = counts(mesh)
    time.sleep(4.5)  # the page's window (one 2 s round) lies inside the test's
    page = browser.execute_script(READ_PAGE)
    after = counts(mesh)
    browser.save_screenshot(os.path.join(artifacts_dir(), "dashboard.png"))
    edges = {(e["source"], e["target"]): e for e in page["edges"]}
    client, web, db = "w:default/n1-p1", f"s:{WEB}", f"s:{DB}"
    hops = {(client, web), (web, "w:default/n2-p1"), (web, "w:default/n2-p2"), (client, db)}
    assert hops <= set(edges), edges

    rps, success = _rps_success(edges[(client, web)]["lines"][0])
    want_rps, want_success = expected(before, after, destination_service=WEB)
    assert want_rps == pytest.approx(RATE_RPS, rel=0.5)  # (the traffic runs: a busy machine slows it)
    assert rps == pytest.approx(want_rps, rel=0.3)
    assert success == pytest.approx(want_success, abs=0.1) and success == pytest.approx(0.75, abs=0.1)
    p50, p99, proto, mtls = _latencies(edges[(client, web)]["lines"][1])
    assert proto == "http" and mtls == "mTLS"
    lo, hi = quantile_bounds(before, after, 0.5, destination_service=WEB)
    assert lo <= p50 <= hi, (p50, lo, hi)
    lo, hi = quantile_bounds(before, after, 0.99, destination_service=WEB)
    assert lo <= p99 <= hi, (p99, lo, hi)
    assert "s-bad" in edges[(client, web)]["cls"]  # 75 % success is drawn red

    for pod in ("n2-p1", "n2-p2"):  # round robin: half each
        rps, success = _rps_success(edges[(web, f"w:default/{pod}")]["lines"][0])
        want_rps, want_success = expected(before, after, destination_workload=pod)
        assert rps == pytest.approx(want_rps, rel=0.3) and success == pytest.approx(want_success, abs=0.15)

    tcp = edges[(client, db)]
    assert "tcp" in tcp["cls"].split() and re.fullmatch(r"tcp · mTLS · [\d.]+ open", tcp["lines"][1])
    m = re.fullmatch(r"([\d.]+) (B/s|KiB/s|MiB/s) · ([\d.]+) conn/s", tcp["lines"][0])
    assert m, tcp["lines"]
    shown = float(m.group(1)) * UNITS[m.group(2)]
    moved = after.tcp_bytes(**SRC, destination_service=DB) - before.tcp_bytes(**SRC, destination_service=DB)
    want = moved / (after.at_s - before.at_s)
    assert want > 0 and shown == pytest.approx(want, rel=0.5)
    assert float(m.group(3)) == pytest.approx(RATE_RPS / TCP_EVERY, rel=0.5)  # connections per second

    nodes = {n["name"]: n for n in page["nodes"]}
    assert set(nodes) == {"n1", "n2"} and all(n["up"] == "true" for n in nodes.values())
    for n in nodes.values():
        _, agent, interception, certs, registry, policies = n["cells"]
        assert agent == "ok", n
        assert re.fullmatch(r"ok, (\d+)/\1 hooks, 2 pods", interception), n
        assert re.fullmatch(r"\d+, first expiry in [\d.]+ h", certs), n
        assert re.fullmatch(r"embedded rev \d+, current", registry), n
        assert policies == "AuthorizationPolicy 1", n
    services = {row[0]: row for row in page["services"]}
    assert float(services[WEB][1]) == pytest.approx(RATE_RPS, rel=0.3)
    assert page["sparks"] >= 2 and "all answering" in (page["updated"] or "")

    # hovering the web service keeps its three hops in view; a click filters by it
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    for _ in range(5):  # (the page redraws every 2 s: a found element may be replaced)
        try:
            box = browser.find_element(By.CSS_SELECTOR, f'#graph .node[data-id="{web}"]')
            ActionChains(browser).move_to_element(box).perform()
            break
        except StaleElementReferenceException:
            continue
    lit = browser.execute_script("return [...document.querySelectorAll('#graph.focus .edge.hl')]"
                                 ".map(e => [e.dataset.source, e.dataset.target])")
    assert sorted(map(tuple, lit)) == sorted([(client, web), (web, "w:default/n2-p1"),
                                              (web, "w:default/n2-p2")])
    browser.execute_script(f"document.querySelector('#graph .node[data-id=\"{web}\"]')"
                           ".dispatchEvent(new Event('click'))")
    shown = browser.execute_script("return [...document.querySelectorAll('#services tbody tr')]"
                                   ".map(r => r.dataset.name)")
    assert shown == [WEB] and browser.execute_script("return document.querySelector('#filter').value") == WEB
    browser.execute_script("const f = document.querySelector('#filter'); f.value = '';"
                           " f.dispatchEvent(new Event('input'))")
    ActionChains(browser).move_by_offset(0, 600).perform()  # (off the box)
    assert console_errors(browser) == []


def test_top_once_json_matches_the_metrics(mesh: Mesh) -> None:
    before = counts(mesh)
    r = subprocess.run([*meshbed.NODEMESH, "top", "--once", "-o", "json", "--testbed", mesh.prefix,
                        "--interval", "2"], capture_output=True, text=True, timeout=30)
    after = counts(mesh)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {a["name"]: a["up"] for a in doc["agents"]} == {"n1": True, "n2": True}
    rows = {(x["source"], x["service"], x["destination"]): x for x in doc["rows"]}
    for pod in ("n2-p1", "n2-p2"):
        row = rows[("default/n1-p1", WEB, f"default/{pod}")]
        want_rps, want_success = expected(before, after, destination_workload=pod)
        assert row["rps"] == pytest.approx(want_rps, rel=0.3), row
        assert row["success"] == pytest.approx(want_success, abs=0.15), row
        assert row["mtls"] == 1.0 and row["protocols"] == ["http"]
        # totals since the agents started: between the test's two reads
        lo = before.requests(**SRC, destination_workload=pod, destination_service=WEB)
        hi = after.requests(**SRC, destination_workload=pod, destination_service=WEB)
        assert lo <= row["requests_total"] <= hi, (lo, row["requests_total"], hi)
        p_lo, p_hi = quantile_bounds(before, after, 0.5, destination_workload=pod)
        assert p_lo <= row["p50_ms"] <= p_hi
    db = [x for k, x in rows.items() if k[1] == DB]
    assert db and db[0]["protocols"] == ["tcp"] and db[0]["bytes_per_s"] > 0
    assert [x["rps"] for x in doc["rows"]] == sorted((x["rps"] for x in doc["rows"]), reverse=True)

    # on a node, nothing to name: the local agent's admin API names its peers
    n1 = mesh.bed.topo.node("n1")
    assert n1 is not None
    r = subprocess.run([*meshbed.NODEMESH, "top", "--once", "-o", "json", "--netns", n1.netns,
                        "--interval", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {a["name"]: a["up"] for a in doc["agents"]} == {"n1": True, "n2": True}
    assert ("default/n1-p1", WEB) in {(x["source"], x["service"]) for x in doc["rows"]}


def test_an_agent_that_stops_answering_shows_as_down_within_10_s(mesh: Mesh, browser: Any) -> None:
    agent = mesh.bed.agents["n2"]
    os.kill(agent.pid, signal.SIGSTOP)  # alive, connections accepted by the kernel, nothing answered
    t0 = time.monotonic()
    try:
        while True:
            page = browser.execute_script(READ_PAGE)
            n2 = next(n for n in page["nodes"] if n["name"] == "n2")
            if n2["up"] == "false":
                break
            assert time.monotonic() - t0 < 10, f"n2 still shown as {n2}"
            time.sleep(0.2)
        took = time.monotonic() - t0
        assert n2["cells"][1].startswith("DOWN: no full answer in 2 s"), n2
        assert "1 DOWN" in page["updated"]
        browser.save_screenshot(os.path.join(artifacts_dir(), "dashboard-agent-down.png"))
        print(f"agent n2 shown down after {took:.1f} s")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    t1 = time.monotonic()
    while True:  # and back when it answers again
        page = browser.execute_script(READ_PAGE)
        if next(n for n in page["nodes"] if n["name"] == "n2")["up"] == "true":
            break
        assert time.monotonic() - t1 < 10, "n2 did not come back"
        time.sleep(0.2)
    assert console_errors(browser) == []
