"""What a ServiceEntry costs: a pod calling a server outside the mesh, directly or through the mesh.

How this works: one node with one enrolled pod (the client) on a fresh testbed, its agent, and
nginx (one worker, ``return 200`` of a 1 KiB body) on a host outside the mesh
(:func:`netns.testbed.external_host`, 10.250.0.200:8080). A ServiceEntry (STATIC, HTTP port 80
-> 8080) gives the server a host name and a VIP. Alternating, ``--rounds`` times, wrk (1 thread,
16 keep-alive connections, ``--seconds`` each) measures:

- ``direct``: the pod to 10.250.0.200:8080 — outside ``capture_cidrs`` under ALLOW_ANY, so not
  captured at all (the fast path ALLOW_ANY keeps);
- ``egress``: the pod to the entry's VIP:80 with ``Host: api.external.test`` — captured, parsed
  and routed by the node proxy, dialled from the node in plain HTTP, with Istio's metrics.

Reports req/s and wrk's p50 latency per path (medians over the rounds) and egress/direct ratios,
as a table and JSON (``--out``). Needs root; everything it creates carries a fresh testbed
prefix and is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchplot  # (scripts/, this script's own directory)

from agent import meshbed
from netns import testbed, topology

EXTERNAL_IP = "10.250.0.200"
EXTERNAL_PORT = 8080
HOST = "api.external.test"

# nginx serving /1k from memory (also bench_gateway's server): {listen} is "[addr:]port"
NGINX = """daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {work}/nginx-tmp;
    server {{
        listen {listen} backlog=4096;
        location = /1k {{ default_type text/plain; return 200 "{body}"; }}
    }}
}}
"""

ENTRY = f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: external-api, namespace: default}}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {EXTERNAL_PORT}}}]
  resolution: STATIC
  endpoints: [{{address: {EXTERNAL_IP}}}]
"""


def wrk(bed: meshbed.MeshBed, pod: str, url: str, seconds: float, host: str | None, conns: int = 16,
        ) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{round(seconds)}s", "--timeout", "5s", "--latency"]
    if host:
        argv += ["-H", f"Host: {host}"]
    r = bed.exec(pod, [*argv, url], timeout_s=seconds + 30)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", r.stdout, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    if r.returncode != 0 or rps is None or p50 is None or non2xx is not None:
        raise RuntimeError(f"wrk {url} failed: {r.stdout[-500:]} {r.stderr[-300:]}")
    scale = {"us": 1.0, "ms": 1000.0, "s": 1e6}[p50.group(2)]
    return {"rps": float(rps.group(1)), "p50_us": float(p50.group(1)) * scale}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args()
    if not 1 <= a.rounds <= 20 or not 1 <= a.seconds <= 60:
        ap.error("--rounds 1-20, --seconds 1-60")
    prefix = f"eb{secrets.token_hex(2)}"
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 1, 1)))
    results: dict[str, list[dict[str, Any]]] = {"direct": [], "egress": []}
    try:
        pod = topo.nodes[0].pods[0]
        manifest = (meshbed.workload_manifest(topo, {pod.name: ("client", {"app": "client"}, {})})
                    + "---\n" + ENTRY)
        with tempfile.TemporaryDirectory(prefix="bench-egress-") as work, \
                testbed.external_host(topo, EXTERNAL_IP) as ext, \
                meshbed.running(topo, manifest) as bed:
            os.makedirs(os.path.join(work, "nginx-tmp"))
            conf = os.path.join(work, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX.format(work=work, listen=EXTERNAL_PORT, body="x" * 1024))
            nginx = testbed.popen_in(ext, None, ["nginx", "-p", work, "-c", conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(0.5)
                vip = bed.exec(pod.name, ["dig", "@10.96.0.53", HOST, "+short", "+tries=1"]).stdout.strip()
                if not vip:
                    raise RuntimeError(f"{HOST} did not resolve through the mesh DNS")
                urls = {"direct": (f"http://{EXTERNAL_IP}:{EXTERNAL_PORT}/1k", None),
                        "egress": (f"http://{vip}/1k", HOST)}
                for r in range(a.rounds):
                    for path in (("direct", "egress") if r % 2 == 0 else ("egress", "direct")):
                        url, host = urls[path]
                        results[path].append(wrk(bed, pod.name, url, a.seconds, host))
                        print(f"round {r + 1} {path}: {results[path][-1]}", file=sys.stderr)
            finally:
                nginx.kill()
                nginx.wait()
    finally:
        testbed.down(prefix)
    med = {p: {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_us")}
           for p, rs in results.items()}
    ratio = {"rps": med["egress"]["rps"] / med["direct"]["rps"],
             "p50": med["egress"]["p50_us"] / med["direct"]["p50_us"],
             "added_p50_us": med["egress"]["p50_us"] - med["direct"]["p50_us"]}
    print("| path | req/s (median) | p50 latency (us) |\n|---|---:|---:|")
    for p in ("direct", "egress"):
        print(f"| {p} | {med[p]['rps']:,.0f} | {med[p]['p50_us']:,.0f} |")
    print(f"egress/direct: req/s {ratio['rps']:.2f}, p50 {ratio['p50']:.2f}x "
          f"(+{ratio['added_p50_us']:.0f} us)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rounds": a.rounds, "seconds": a.seconds, "runs": results, "median": med,
                       "ratio": ratio}, f, indent=1)
        benchplot.rps_and_p50(benchplot.png_next_to(a.out), "egress through a ServiceEntry vs direct", med)
    return 0


if __name__ == "__main__":
    sys.exit(main())
