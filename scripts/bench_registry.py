#!/usr/bin/env python3
"""Registry propagation benchmark (not a test): apply on one host -> snapshot on 3 agents.

Starts its own etcd on 127.0.0.1 (random ports, temp dir, killed by PID at the
end) and three agents (Registry watchers, each its own etcd connection). For
each size (10, 1,000, 10,000 endpoints) it applies a Service plus N Workloads
changed each round (a new address for every workload) ``--rounds`` times, and
records the time from the start of ``apply`` (validation + plan + commit)
until the last agent holds the new snapshot. Prints p50/p99 per size, the
agent memory per 1,000 endpoints (tracemalloc of one snapshot builder), and
writes JSON with ``--json``.

    .venv/bin/python scripts/bench_registry.py [--rounds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.control import apply as apply_mod
from agent.control.etcd import EtcdBackend
from agent.control.registry import Registry
from agent.control.snapshot import SnapshotBuilder
from agent.control.validate import parse_vip_range, parse_yaml
from tests.integration.etcd_fixture import running_etcd

NET = parse_vip_range("10.96.0.0/16")


def docs(n: int, generation: int) -> str:
    out = ["""apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: bench, namespace: bench}
spec:
  selector: {app: bench}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
"""]
    for i in range(n):
        out.append(f"""apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: w-{i}, namespace: bench, labels: {{app: bench}}}}
spec: {{address: 10.{generation % 200}.{i // 250}.{2 + i % 250}, node: node{i % 3}}}
""")
    return "---\n".join(out)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the etcd teardown
    results: dict[str, object] = {}
    with running_etcd() as etcd:
        agents = [Registry(EtcdBackend(etcd.url), poll_timeout_s=0.5) for _ in range(3)]
        for r in agents:
            r.start()
        writer = EtcdBackend(etcd.url)
        try:
            gen = 0
            for n in (int(x) for x in a.sizes.split(",")):
                rounds = a.rounds if n <= 1000 else max(5, a.rounds // 3)
                times, parse_s, prop = [], [], []
                for _ in range(rounds):
                    gen += 1
                    text = docs(n, gen)
                    addr = f"10.{gen % 200}.0.2"
                    t0 = time.perf_counter()
                    res = parse_yaml(text, "bench.yaml", NET)
                    t1 = time.perf_counter()
                    apply_mod.apply(writer, res, NET)
                    for r in agents:
                        ok = r.wait_for(lambda s, addr=addr, n=n: len(s.workloads) >= n and s.workloads.get(
                            ("bench", "w-0")) is not None and s.workloads[("bench", "w-0")].address == addr,
                            30)
                        if ok is None:
                            raise SystemExit(f"agent did not converge at n={n}")
                    t2 = time.perf_counter()
                    times.append((t2 - t0) * 1000)
                    prop.append((t2 - t1) * 1000)
                    parse_s.append((t1 - t0) * 1000)
                # shrink back so the next size starts from only its own workloads
                st = writer.read()
                writer.commit({}, [k for k in st.items if "/workload/bench/" in k])
                results[str(n)] = {
                    "rounds": rounds, "p50_ms": round(statistics.median(times), 1),
                    "p99_ms": round(pct(times, 99), 1), "max_ms": round(max(times), 1),
                    "yaml_parse_p50_ms": round(statistics.median(parse_s), 1),
                    "commit_to_agents_p50_ms": round(statistics.median(prop), 1),
                    "commit_to_agents_p99_ms": round(pct(prop, 99), 1),
                }
                print(f"{n:>6} endpoints: apply->3 agents p50 {results[str(n)]['p50_ms']} ms, "  # type: ignore[index]
                      f"p99 {results[str(n)]['p99_ms']} ms (YAML parse+validate p50 "  # type: ignore[index]
                      f"{results[str(n)]['yaml_parse_p50_ms']} ms; plan+commit->3 agents p50 "  # type: ignore[index]
                      f"{results[str(n)]['commit_to_agents_p50_ms']} ms p99 "  # type: ignore[index]
                      f"{results[str(n)]['commit_to_agents_p99_ms']} ms; {rounds} rounds)",  # type: ignore[index]
                      flush=True)
        finally:
            for r in agents:
                r.stop()
            writer.close()
    # memory: one agent's decoded state + a snapshot, for 1,000 and 10,000 endpoints
    mem = {}
    for n in (1000, 10000):
        items = {}
        for loc in parse_yaml(docs(n, 1), "m.yaml", NET):
            r = loc.resource
            items[r.key] = json.dumps(r.to_doc() | ({"vip": "10.96.0.1"} if "vip" in r.to_doc() else {}))
        gc.collect()
        tracemalloc.start()
        b = SnapshotBuilder()
        b.reset(items)
        snap = b.build(1)
        cur, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del snap, b
        mem[str(n)] = round(cur / 1024 / 1024 / (n / 1000), 2)
        print(f"agent memory at {n} endpoints: {mem[str(n)]} MiB per 1,000 endpoints "
              "(decoded state + raw values + one snapshot)")
    results["memory_mib_per_1000"] = mem
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
