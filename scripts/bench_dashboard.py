#!/usr/bin/env python3
"""The dashboard's cost with 100 services and 20 nodes: page load, refresh, its own CPU and memory.

Not a test: a benchmark, run by hand from the repository root (no root needed; loopback only):

    .venv/bin/python scripts/bench_dashboard.py [--services 100] [--nodes 20] [--seconds 60]
        [--refresh 2] [--loads 5] [--out-dir bench-results]

The agents are SIMULATED: 20 loopback servers (tests/component/dashboard_sim.py) on
127.0.0.91:20910.. that export what a real agent would, with the agent's own metric code
(``MeshMetrics``: both reporters, Istio's labels, the three histograms with Envoy's buckets)
and a /status document like the agent's. The mesh: ``--services`` services of 2 workloads
each, the workloads spread over the nodes in turn; 10 frontend workloads call 3 services
each, every service's workloads call 0-2 other services (seeded), each call at 1-4 req/s
per destination workload, 1 % of them 503. Counters follow wall time, so the dashboard
sees live rates. The dashboard runs as a user runs it (``nodemesh dashboard --agent ...``,
its own process, 127.0.0.90:20930).

Measured: what one agent's /metrics holds (bytes, lines); per dashboard round (every
``--refresh`` s: read every agent, parse, compute, serialise) its wall time and the
dashboard process's CPU time; /api/view size and GET time; in headless Chromium, page load
(navigation start to the first drawing of the whole view, medians of ``--loads`` loads),
the drawing time of each refresh and the JS heap; the dashboard process's CPU share and RSS
over ``--seconds`` with one tab open. Output: JSON in bench-results/dashboard-<stamp>.json,
a PNG next to it, a screenshot of the page (dashboard-<stamp>-page.png).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchplot  # noqa: E402  (scripts/, this script's own directory)

from agent.metrics.istio import RequestLabels  # noqa: E402
from tests.browser import chromium  # noqa: E402
from tests.component.dashboard_sim import Flow, SimAgent, status_doc  # noqa: E402

SIM_HOST, FIRST_PORT = "127.0.0.91", 20910
DASH_HOST, DASH_PORT = "127.0.0.90", 20930
LATENCIES_MS = (0.8, 1.5, 2.0, 3.0, 4.0, 7.0, 12.0, 30.0)


def _labels(reporter: str, src: str, svc: str, dst: str) -> RequestLabels:
    host = f"{svc}.shop.svc.cluster.local"
    return RequestLabels(
        reporter, src, "shop", f"spiffe://cluster.local/ns/shop/sa/{src}", src, "v1", host, svc, "shop",
        dst, "shop", f"spiffe://cluster.local/ns/shop/sa/{svc}", svc, "v1", "mutual_tls",
    )


def simulated_mesh(services: int, nodes: int, seed: int = 1) -> tuple[dict[int, list[Flow]], int]:
    """Flows per node index: the source's node reports ``source``, the destination's
    ``destination``. Returns (flows by node, number of source->service call edges)."""
    rng = random.Random(seed)
    node_of: dict[str, int] = {}
    workloads: dict[str, list[str]] = {}
    i = 0
    for s in range(services):
        svc = f"svc-{s:03d}"
        workloads[svc] = [f"{svc}-{k}" for k in range(2)]
        for w in workloads[svc]:
            node_of[w] = i % nodes
            i += 1
    frontends = [f"frontend-{k}" for k in range(10)]
    for f in frontends:
        node_of[f] = i % nodes
        i += 1
    names = sorted(workloads)
    calls: list[tuple[str, str]] = [(f, svc) for f in frontends for svc in rng.sample(names, 3)]
    for svc in names:
        for callee in rng.sample(names, rng.randint(0, 2)):
            if callee != svc:
                calls.extend((w, callee) for w in workloads[svc])
    flows: dict[int, list[Flow]] = {n: [] for n in range(nodes)}
    for src, svc in calls:
        for dst in workloads[svc]:
            rate = rng.uniform(1, 4)
            lat = tuple(rng.sample(LATENCIES_MS, 4))
            for reporter, node in (("source", node_of[src]), ("destination", node_of[dst])):
                labels = _labels(reporter, src, svc, dst)
                flows[node].append(Flow(labels, rate * 0.99, lat))
                flows[node].append(Flow(labels, rate * 0.01, lat, code=503))
    return flows, len(calls)


@contextlib.contextmanager
def sim_agents(flows: dict[int, list[Flow]]) -> Iterator[list[SimAgent]]:
    with contextlib.ExitStack() as stack:
        agents = []
        for n, fl in sorted(flows.items()):
            a = SimAgent(SIM_HOST, FIRST_PORT + n, f"node-{n:02d}", fl)
            a.status = status_doc(f"node-{n:02d}", revision=42)
            agents.append(stack.enter_context(a))
        yield agents


def get(path: str) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://{DASH_HOST}:{DASH_PORT}{path}", timeout=10) as r:
        body = r.read()
    return (time.perf_counter() - t0) * 1000, body


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    flows, edges = simulated_mesh(args.services, args.nodes)
    out: dict[str, Any] = {
        "simulated": True, "services": args.services, "nodes": args.nodes,
        "workloads": 2 * args.services + 10,
        "call_edges": edges, "flows_per_agent": statistics.median(len(f) for f in flows.values()),
        "refresh_s": args.refresh, "seconds": args.seconds, "cpus": os.cpu_count(),
    }
    with sim_agents(flows) as agents:
        argv = [sys.executable, "-m", "agent.cli.main", "dashboard", "--host", DASH_HOST,
                "--port", str(DASH_PORT), "--refresh", str(args.refresh), "--timeout", "5"]
        for a in agents:
            argv += ["--agent", f"http://{SIM_HOST}:{a.httpd.server_address[1]}"]
        dash = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc = psutil.Process(dash.pid)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if json.loads(get("/api/view")[1])["round"] >= 2:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or dash.poll() is not None:
                    raise SystemExit("bench_dashboard: the dashboard did not come up")
                time.sleep(0.2)
            gets = [get("/api/view") for _ in range(20)]
            view = json.loads(gets[-1][1])
            out["view_bytes"] = len(gets[-1][1])
            out["view_get_ms_median"] = round(statistics.median(t for t, _ in gets), 2)
            out["graph_nodes"] = len(view["graph"]["nodes"])
            out["graph_edges"] = len(view["graph"]["edges"])
            out["top_rows"] = len(view["top"])
            out["agents_up"] = sum(1 for n in view["nodes"] if n["up"])
            with chromium(DASH_HOST) as driver:
                loads = []
                for _ in range(args.loads):
                    driver.get(f"http://{DASH_HOST}:{DASH_PORT}/")
                    t_end = time.monotonic() + 20
                    while not driver.execute_script("return window.nmRender && window.nmRender.firstDrawnAt"):
                        if time.monotonic() > t_end:
                            raise SystemExit("bench_dashboard: the page did not draw in 20 s")
                        time.sleep(0.05)
                    loads.append(driver.execute_script(
                        "const n = performance.getEntriesByType('navigation')[0];"
                        "return {drawn: window.nmRender.firstDrawnAt, dom: n.domContentLoadedEventEnd,"
                        " draw_ms: window.nmRender.lastMs,"
                        " elements: document.getElementsByTagName('*').length};"))
                out["page_load_ms_median"] = round(statistics.median(x["drawn"] for x in loads), 1)
                out["page_load_ms_all"] = [round(x["drawn"], 1) for x in loads]
                out["page_dom_ready_ms_median"] = round(statistics.median(x["dom"] for x in loads), 1)
                out["page_elements"] = loads[-1]["elements"]
                cpu0, t0, r0 = proc.cpu_times(), time.monotonic(), json.loads(get("/api/view")[1])["round"]
                samples = []
                last_round = -1
                while time.monotonic() - t0 < args.seconds:
                    time.sleep(args.refresh / 2)
                    c = proc.cpu_times()
                    r = driver.execute_script(
                        "return {round: window.nmRender.round, draw_ms: window.nmRender.lastMs,"
                        " heap: performance.memory ? performance.memory.usedJSHeapSize : null}")
                    v = json.loads(get("/api/view")[1])
                    if v["round"] != last_round:
                        last_round = v["round"]
                        samples.append({"t": round(time.monotonic() - t0, 2), "round": v["round"],
                                        "round_ms": v.get("round_ms"), "draw_ms": r["draw_ms"],
                                        "heap_mb": r["heap"] / 2 ** 20 if r["heap"] else None,
                                        "cpu_s": c.user + c.system - cpu0.user - cpu0.system,
                                        "rss_mb": proc.memory_info().rss / 2 ** 20})
                driver.save_screenshot(args.screenshot)
            cpu1, t1 = proc.cpu_times(), time.monotonic()
            r1 = json.loads(get("/api/view")[1])["round"]
            cpu_s = cpu1.user + cpu1.system - cpu0.user - cpu0.system
            rounds = max(1, r1 - r0)
            out["dashboard_cpu_percent_of_one_core"] = round(100 * cpu_s / (t1 - t0), 1)
            out["dashboard_cpu_ms_per_round"] = round(1000 * cpu_s / rounds, 1)
            out["dashboard_rss_mb"] = round(proc.memory_info().rss / 2 ** 20, 1)
            rms = [s["round_ms"] for s in samples if s["round_ms"] is not None]
            out["round_ms_median"] = round(statistics.median(rms), 1) if rms else None
            out["round_ms_p95"] = round(pct(rms, 95), 1) if rms else None
            draws = [s["draw_ms"] for s in samples if s["draw_ms"] is not None]
            out["browser_draw_ms_median"] = round(statistics.median(draws), 1) if draws else None
            out["browser_draw_ms_max"] = round(max(draws), 1) if draws else None
            heaps = [s["heap_mb"] for s in samples if s["heap_mb"] is not None]
            out["browser_js_heap_mb_last"] = round(heaps[-1], 1) if heaps else None
            out["samples"] = samples
            earlier = [a.metrics_text() for a in agents]
            time.sleep(args.refresh)
            texts = [a.metrics_text() for a in agents]  # every series has appeared by now
            out["metrics_bytes_per_agent_median"] = statistics.median(len(t) for t in texts)
            out["metrics_lines_per_agent_median"] = statistics.median(t.count(b"\n") for t in texts)
            out["metrics_mb_per_round"] = round(sum(len(t) for t in texts) / 2 ** 20, 1)
        finally:
            dash.terminate()
            try:
                dash.wait(10)
            except subprocess.TimeoutExpired:
                dash.kill()
                dash.wait()
    out["compute_ms_per_round"] = compute_ms(earlier, texts)  # (alone: no dashboard polling the sims)
    return out


def compute_ms(earlier: list[bytes], later: list[bytes], rounds: int = 6) -> dict[str, float]:
    """The dashboard's own work per round without the network or the simulated agents:
    every agent's exposition split, parsed and summed, the view computed and serialised
    (median of ``rounds`` that alternate two reads of each agent a refresh apart, so the
    view has live rates; in this process, the label caches warm as in a running dashboard)."""
    from agent.dashboard.model import WANTED, node_scrape
    from agent.dashboard.promtext import parse_lines
    from agent.dashboard.scrape import lines_of
    from agent.dashboard.state import MeshState

    starts = tuple(w.rstrip("*").encode() for w in WANTED)
    state = MeshState(2.0)
    caches: list[dict[str, Any]] = [{} for _ in later]
    parse_ms, view_ms = [], []
    for r in range(rounds + 1):
        texts = later if r % 2 else earlier
        t0 = time.perf_counter()
        for i, (text, cache) in enumerate(zip(texts, caches, strict=True)):
            chunks = [text[k:k + 65536] for k in range(0, len(text), 65536)]
            p = parse_lines(lines_of(chunks, starts), WANTED, cache)
            at = 2.0 * (r // 2) + (r % 2)  # (earlier at 0, 2, 4 …; later 1 s after each)
            state.observe(f"n{i}", at, node_scrape(f"n{i}", at, p.samples))
        t1 = time.perf_counter()
        json.dumps(state.end_round(float(r)), separators=(",", ":"))
        t2 = time.perf_counter()
        if r:  # (the first fills the caches)
            parse_ms.append((t1 - t0) * 1000)
            view_ms.append((t2 - t1) * 1000)
    return {"parse_ms_median": round(statistics.median(parse_ms), 1),
            "view_and_json_ms_median": round(statistics.median(view_ms), 1)}


def plot(doc: dict[str, Any], png: str) -> str | None:
    plt = benchplot.pyplot()
    if plt is None:
        return None
    s = doc["samples"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    t = [x["t"] for x in s]
    ax1.plot(t, [x["round_ms"] for x in s], label="dashboard round (read 20 agents, compute)", color="#37c")
    ax1.plot(t, [x["draw_ms"] for x in s], label="browser: draw one refresh", color="#c84")
    ax1.set_ylabel("ms")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.plot(t, [x["rss_mb"] for x in s], label="dashboard RSS MB", color="#2a7")
    ax2b = ax2.twinx()
    ax2b.plot(t, [x["cpu_s"] for x in s], label="dashboard CPU s (cumulative)", color="#777")
    ax2.set_ylabel("RSS MB")
    ax2b.set_ylabel("CPU s")
    ax2.set_xlabel("seconds (simulated agents)")
    ax1.set_title(f"nodemesh dashboard: {doc['services']} services, {doc['nodes']} nodes (simulated), "
                  f"refresh {doc['refresh_s']} s")
    return benchplot.save(fig, png)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=100, choices=range(1, 501), metavar="1..500")
    ap.add_argument("--nodes", type=int, default=20, choices=range(1, 41), metavar="1..40")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--refresh", type=float, default=2.0)
    ap.add_argument("--loads", type=int, default=5, choices=range(1, 21), metavar="1..20")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench-results"))
    a = ap.parse_args()
    if not 1 <= a.seconds <= 600:
        ap.error("--seconds must be between 1 and 600")
    os.makedirs(a.out_dir, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    json_path = os.path.join(a.out_dir, f"dashboard-{stamp}.json")
    a.screenshot = os.path.join(a.out_dir, f"dashboard-{stamp}-page.png")
    doc = run(a)
    doc["screenshot"] = a.screenshot
    doc["plot"] = plot(doc, benchplot.png_next_to(json_path))
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({k: v for k, v in doc.items() if k != "samples"}, indent=1))
    plotted = f"; plot: {os.path.relpath(doc['plot'], ROOT)}" if doc["plot"] else "; no plot (no matplotlib)"
    print(f"written: {os.path.relpath(json_path, ROOT)}{plotted}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
