"""Ingress gateway benchmark: nodemesh's gateway vs HAProxy as an ingress on the same two-hop mTLS path.

How this works: a fresh two-node testbed; nginx (one worker, ``return 200`` of a 1 KiB body) in
the server pod n2-p1 on 8080; the client pod n1-p2 is not enrolled (a client outside the mesh).
On node n1, two ingresses listen on second addresses of n1's pod bridge:

- ``nodemesh``: the n1 agent with a ``gateway:`` section at 10.244.1.250, serving the Gateway
  ``bench-gateway`` (port 80 HTTP, 443 HTTPS SIMPLE with a credential made here) and a
  VirtualService routing ``Host: my-service`` to the service ``my-service`` (n2-p1:8080). Each
  request is parsed by the gateway, sent over HBONE (pooled mTLS) with the gateway's identity,
  parsed again by n2's agent, then to nginx.
- ``haproxy``: HAProxy (one thread, mode http) at 10.244.1.251:80 and :443 (the same certificate),
  the hop to an HAProxy in n2's netns in mode http over TLS 1.3 with client certificates verified
  on both sides (``http-reuse always``: its way to pool the hop), then to nginx.
- ``direct``: the client to n2-p1:8080 (the testbed's limit).

wrk (1 thread, ``--seconds`` each) runs the paths alternating, for ``--rounds`` rounds, over
http:// and https://: req/s with 16 keep-alive connections, p50 latency with one (so no request
waits behind another); the report is req/s and p50 (medians of the rounds) and the
nodemesh/haproxy ratios of req/s and of the added p50 (p50 minus direct's), as a table and JSON
(``--out``). Needs root; everything it creates carries a fresh testbed prefix and
is removed at the end, also on failure:

    .venv/bin/python scripts/bench_gateway.py --rounds 3 --seconds 5 --out gw.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchplot  # (scripts/, this script's own directory)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import meshbed
from netns import testbed, topology
from scripts.bench_egress import NGINX, wrk

HOST = "my-service"
HA_HOP_PORT = 16443  # the HAProxy hop on n2's fabric address
PATHS = ("direct", "nodemesh", "haproxy")


HAPROXY = """global
    nbthread 1
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
{body}
"""
HA_N1 = """frontend ingress
    bind {ha}:80
    bind {ha}:443 ssl crt {work}/ingress.pem
    default_backend hop
backend hop
    http-reuse always
    server n2 {n2}:{hop} ssl crt {work}/hop-client.pem ca-file {work}/ca.pem verify required alpn h2
"""
HA_N2 = """frontend hop
    bind {n2}:{hop} ssl crt {work}/hop-server.pem ca-file {work}/ca.pem verify required alpn h2
    default_backend pod
backend pod
    http-reuse always
    server web {pod}:8080
"""


def registry(gw: str) -> str:
    return f"""apiVersion: nodemesh.io/v1
kind: Service
metadata: {{name: my-service}}
spec: {{ports: [{{name: http, port: 8080, protocol: http}}], selector: {{app: web}}}}
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: istio-ingressgateway, namespace: istio-system, labels: {{istio: ingressgateway}}}}
spec: {{address: {gw}, node: n1, serviceAccount: istio-ingressgateway-service-account}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench-gateway}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [{HOST}]
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [{HOST}]
    tls: {{mode: SIMPLE, credentialName: bench-cert}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: my-service}}
spec:
  hosts: [{HOST}]
  gateways: [bench-gateway]
  http:
  - route: [{{destination: {{host: my-service, port: {{number: 8080}}}}}}]
---
"""


def pki(work: str, creds: str) -> None:
    """A CA, the ingress certificate (for both ingresses) and HAProxy's two hop certificates."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM

    def leaf(cn: str) -> tuple[bytes, bytes]:
        k = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        c = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(ca_name).public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
             .sign(ca_key, hashes.SHA256()))
        return c.public_bytes(pem), k.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption())

    files: dict[str, bytes] = {os.path.join(work, "ca.pem"): ca.public_bytes(pem)}
    cert, key = leaf(HOST)
    files[os.path.join(creds, "bench-cert.crt")] = cert
    files[os.path.join(creds, "bench-cert.key")] = key
    files[os.path.join(work, "ingress.pem")] = cert + key
    for name in ("hop-client", "hop-server"):
        c, k = leaf(name)
        files[os.path.join(work, f"{name}.pem")] = c + k
    for path, data in files.items():
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args()
    if not 1 <= a.rounds <= 20 or not 1 <= a.seconds <= 60:
        ap.error("--rounds 1-20, --seconds 1-60")
    prefix = f"gb{secrets.token_hex(2)}"
    topo = testbed.up(topology.plan(topology.default_spec(prefix, 2, 2)))
    runs: dict[str, list[dict[str, Any]]] = {f"{p}-{s}": [] for p in PATHS for s in ("http", "https")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        n1, n2 = topo.nodes
        server, client = topo.pod("n2-p1"), topo.pod("n1-p2")
        assert server is not None and client is not None
        base = n1.gateway.rsplit(".", 1)[0]
        gw, ha = f"{base}.250", f"{base}.251"
        for addr in (gw, ha):  # inside the testbed's own node netns, removed with it
            subprocess.run(["ip", "-n", n1.netns, "addr", "add", f"{addr}/32", "dev", n1.bridge], check=True)
        roles: dict[str, meshbed.Role] = {"n2-p1": ("default", {"app": "web"}, {"http": 8080})}
        with tempfile.TemporaryDirectory(prefix="bench-gateway-") as work, \
                meshbed.running(topo, registry(gw) + meshbed.workload_manifest(topo, roles),
                                start_agents=False) as bed:
            creds = os.path.join(work, "creds")
            os.makedirs(creds)
            os.makedirs(os.path.join(work, "nginx-tmp"))
            pki(work, creds)
            ic = dict(bed.agent_config(n1)["interception"])  # type: ignore[call-overload]
            ic["enroll"] = [e for e in ic["enroll"] if not e.endswith(client.netns)]
            bed.node_extra["n1"] = {"interception": ic, "gateway": {
                "labels": {"istio": "ingressgateway"}, "address": gw, "credentials_dir": creds}}
            for node in topo.nodes:
                bed.start_agent(node)
            confs = {"nginx.conf": NGINX.format(work=work, listen=f"{server.address}:8080", body="x" * 1024),
                     "ha-n1.cfg": HAPROXY.format(body=HA_N1.format(ha=ha, work=work, n2=n2.fabric_address,
                                                                   hop=HA_HOP_PORT)),
                     "ha-n2.cfg": HAPROXY.format(body=HA_N2.format(work=work, n2=n2.fabric_address,
                                                                   hop=HA_HOP_PORT, pod=server.address))}
            for name, text in confs.items():
                with open(os.path.join(work, name), "w") as f:
                    f.write(text)
            procs.append(testbed.popen_in_pod(server, ["nginx", "-p", work, "-c", f"{work}/nginx.conf"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for node, cfg in ((n1, "ha-n1.cfg"), (n2, "ha-n2.cfg")):
                procs.append(testbed.popen_in(node.netns, None, ["haproxy", "-db", "-f", f"{work}/{cfg}"],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls = {"direct-http": f"http://{server.address}:8080/1k",
                    "nodemesh-http": f"http://{gw}/1k", "haproxy-http": f"http://{ha}/1k",
                    "nodemesh-https": f"https://{gw}/1k", "haproxy-https": f"https://{ha}/1k"}
            deadline = time.monotonic() + 20  # the agents have the Gateway, HAProxy and nginx listen
            while True:
                codes = {k: bed.exec(client.name, ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                                                   "-H", f"Host: {HOST}", u]).stdout for k, u in urls.items()}
                if set(codes.values()) == {"200"}:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not every path answers 200: {codes}\n{bed.log_text('n1')}")
                time.sleep(0.3)
            order = list(urls)
            for r in range(a.rounds):
                for path in (order if r % 2 == 0 else order[::-1]):
                    one = wrk(bed, client.name, urls[path], a.seconds, HOST)
                    # latency alone: one connection, so no request waits behind another
                    one["p50_us"] = wrk(bed, client.name, urls[path], a.seconds, HOST, conns=1)["p50_us"]
                    runs[path].append(one)
                    print(f"round {r + 1} {path}: {runs[path][-1]}", file=sys.stderr)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        testbed.down(prefix)
    med = {p: {k: statistics.median(x[k] for x in rs) for k in ("rps", "p50_us")}
           for p, rs in runs.items() if rs}
    direct = med["direct-http"]["p50_us"]
    ratio: dict[str, dict[str, float]] = {}
    for s in ("http", "https"):
        nm, hp = med[f"nodemesh-{s}"], med[f"haproxy-{s}"]
        ratio[s] = {"rps": nm["rps"] / hp["rps"],
                    "added_p50": (nm["p50_us"] - direct) / (hp["p50_us"] - direct)}
    print("| path | req/s (median) | p50 (us) | added p50 (us) |\n|---|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['rps']:,.0f} | {m['p50_us']:,.0f} | {m['p50_us'] - direct:,.0f} |")
    for scheme, q in ratio.items():
        print(f"nodemesh/haproxy {scheme}: req/s {q['rps']:.2f}x, added p50 {q['added_p50']:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"rounds": a.rounds, "seconds": a.seconds, "runs": runs, "median": med, "ratio": ratio},
                      f, indent=1)
        benchplot.rps_and_p50(benchplot.png_next_to(a.out), "ingress: nodemesh gateway vs HAProxy", med)
    return 0


if __name__ == "__main__":
    sys.exit(main())
