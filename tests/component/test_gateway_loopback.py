"""The ingress gateway on loopback: a two-node mesh, a gateway on node n1 (127.0.0.50), real
curl, openssl s_client and Python TLS clients, real TLS and HTTP servers as pods.

Addresses 127.0.0.50-59 and ports 20500-20599 are this file's.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import GatewayConfig
from agent.control import apply as apply_mod
from agent.control.model import Kind, Service, Workload, resource_key
from agent.control.snapshot import SnapshotBuilder
from agent.control.validate import parse_yaml
from agent.dataplane.gateway import Credentials, IngressGateway
from tests.component.harness import Mesh, echo_server, http_pod, metric, run, two_node_mesh

GW = "127.0.0.50"
NET = ipaddress.ip_network("10.96.0.0/16")
GW_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"

WORKLOADS = [  # (loopback addresses: made here, as the other component tests do; apply refuses them)
    Workload(
        "istio-ingressgateway",
        "istio-system",
        GW,
        "n1",
        "istio-ingressgateway-service-account",
        {"istio": "ingressgateway"},
    ),
    Workload("web-2", "default", "127.0.0.51", "n2", labels={"app": "web"}),
    Workload("tls-a", "default", "127.0.0.53", "n2", labels={"app": "tls-a"}),
    Workload("tls-b", "default", "127.0.0.54", "n1", labels={"app": "tls-b"}),
    Workload("echo", "default", "127.0.0.55", "n2", labels={"app": "echo"}),
    Workload("grpc-1", "default", "127.0.0.56", "n2", labels={"app": "grpc"}),
    Workload("greet", "default", "127.0.0.57", "n2", labels={"app": "greet"}),
]
REGISTRY = """
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: my-service}
spec: {ports: [{port: 8080, targetPort: 20511, protocol: http}], selector: {app: web}}
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: tls-a}
spec: {ports: [{port: 443, targetPort: 20553, protocol: tcp}], selector: {app: tls-a}}
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: tls-b}
spec: {ports: [{port: 443, targetPort: 20554, protocol: tcp}], selector: {app: tls-b}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 20580, name: http, protocol: HTTP}
    hosts: [my-service]
  - port: {number: 20581, name: http-redirect, protocol: HTTP}
    hosts: ["*"]
    tls: {httpsRedirect: true}
  - port: {number: 20543, name: https, protocol: HTTPS}
    hosts: [secure.example.com]
    tls: {mode: SIMPLE, credentialName: simple-cred}
  - port: {number: 20543, name: https-other, protocol: HTTPS}
    hosts: ["*.other.example.com"]
    tls: {mode: SIMPLE, credentialName: other-cred, minProtocolVersion: TLSV1_3}
  - port: {number: 20544, name: https-mtls, protocol: HTTPS}
    hosts: [mtls.example.com]
    tls: {mode: MUTUAL, credentialName: mutual-cred}
  - port: {number: 20545, name: tls, protocol: TLS}
    hosts: ["*.pass.example.com"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 20546, name: tcp, protocol: TCP}
    hosts: ["*"]
  - port: {number: 20548, name: tls-terminated, protocol: TLS}
    hosts: [secure.example.com]
    tls: {mode: SIMPLE, credentialName: simple-cred}
  - port: {number: 20582, name: http-grpc, protocol: HTTP}
    hosts: [grpc.example.com]
  - port: {number: 20547, name: https-grpc, protocol: HTTPS}
    hosts: [grpc.example.com]
    tls: {mode: SIMPLE, credentialName: grpc-cred}
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: grpc}
spec: {ports: [{port: 20556, protocol: grpc}], selector: {app: grpc}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpc}
spec:
  hosts: [grpc.example.com]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /echo.Echo/Missing}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: grpc}}]
  - route: [{destination: {host: grpc}}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: echo}
spec: {ports: [{port: 9000, targetPort: 20555, protocol: tcp}], selector: {app: echo}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp:
  - match: [{port: 20546}]
    route: [{destination: {host: echo, port: {number: 9000}}}]
---
apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: greet}
spec: {ports: [{port: 9100, targetPort: 20557, protocol: tcp}], selector: {app: greet}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: greet}
spec:
  hosts: ["*"]
  gateways: [gw]
  tcp:
  - match: [{port: 20548}]
    route: [{destination: {host: greet, port: {number: 9100}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: my-service}
spec:
  hosts: [my-service, secure.example.com, mtls.example.com, "*.other.example.com"]
  gateways: [gw]
  http:
  - match: [{uri: {prefix: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - route: [{destination: {host: my-service, port: {number: 8080}}}]
    headers: {request: {set: {x-via: gateway}}}
    timeout: 5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: "5xx,connect-failure"}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pass}
spec:
  hosts: ["*.pass.example.com"]
  gateways: [default/gw]
  tls:
  - match: [{sniHosts: [a.pass.example.com]}]
    route: [{destination: {host: tls-a, port: {number: 443}}}]
  - match: [{sniHosts: [b.pass.example.com]}]
    route: [{destination: {host: tls-b, port: {number: 443}}}]
"""


@dataclass
class Pki:
    dir: str
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate

    @property
    def ca_file(self) -> str:
        return os.path.join(self.dir, "test-ca.pem")

    def leaf(self, cn: str, *, client: bool = False) -> tuple[bytes, bytes, int]:
        now = datetime.datetime.now(datetime.UTC)
        k = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.ca.subject)
            .public_key(k.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        key = k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key, serial

    def credential(self, name: str, cn: str, *, mutual: bool = False) -> int:
        """Write <name>.crt/.key (and <name>-ca.crt) as the gateway reads them, by rename."""
        cert, key, serial = self.leaf(cn)
        files = {f"{name}.crt": cert, f"{name}.key": key}
        if mutual:
            files[f"{name}-ca.crt"] = self.ca.public_bytes(serialization.Encoding.PEM)
        for fname, data in files.items():
            tmp = os.path.join(self.dir, f".{fname}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(self.dir, fname))
        return serial


def make_pki(directory: str) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(k, hashes.SHA256())
    )
    pki = Pki(directory, k, ca)
    with open(pki.ca_file, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    return pki


@dataclass
class Bed:
    mesh: Mesh
    gateway: IngressGateway
    pki: Pki
    creds: str
    simple_serial: int


async def _tls_pod(host: str, port: int, name: str, pki: Pki, work: str) -> asyncio.Server:
    """A pod that terminates TLS itself (for passthrough): answers '<name>' and closes."""
    cert, key, _ = pki.leaf(f"{name}.pass.example.com")
    cf, kf = os.path.join(work, f"{name}.pem"), os.path.join(work, f"{name}.key")
    for path, data in ((cf, cert), (kf, key)):
        with open(path, "wb") as f:
            f.write(data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cf, kf)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await r.read(1)
            w.write(f"pod {name}\n".encode())
            await w.drain()
        w.close()

    return await asyncio.start_server(handle, host, port, ssl=ctx)


@contextlib.asynccontextmanager
async def gateway_bed(ports: int = 9) -> AsyncIterator[Bed]:
    """The mesh, the pods and a running gateway; ``ports``: how many it must be listening on."""
    work = tempfile.mkdtemp(prefix="nm-gw-")
    creds = os.path.join(work, "creds")
    os.makedirs(creds)
    pki = make_pki(creds)
    simple_serial = pki.credential("simple-cred", "secure.example.com")
    pki.credential("mutual-cred", "mtls.example.com", mutual=True)
    pki.credential("other-cred", "*.other.example.com")
    pki.credential("grpc-cred", "grpc.example.com")
    located = parse_yaml(REGISTRY, "gateway-test.yaml", NET)
    b = SnapshotBuilder()
    b.apply(
        {
            **apply_mod.plan({}, located, NET).puts,
            **{resource_key(Kind.WORKLOAD, w.namespace, w.name): json.dumps(w.to_doc()) for w in WORKLOADS},
        },
        [],
    )
    snap = b.build(2)
    pod = http_pod("127.0.0.51", 20511, "web-2")
    echo = await echo_server("127.0.0.55", 20555, "echo")

    async def greet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:  # answers the first bytes
        with contextlib.suppress(Exception):
            w.write(b"greet:" + await r.read(1024))
            await w.drain()
        w.close()

    greeter = await asyncio.start_server(greet, "127.0.0.57", 20557)
    tls_pods = [
        await _tls_pod("127.0.0.53", 20553, "a", pki, work),
        await _tls_pod("127.0.0.54", 20554, "b", pki, work),
    ]
    stop = asyncio.Event()
    ws: list[Workload] = list(snap.workloads.values())
    svcs: list[Service] = list(snap.services.values())
    try:
        async with two_node_mesh(ws, svcs) as mesh:
            mesh.set_snapshot(snap)
            gw = IngressGateway(
                GatewayConfig({"istio": "ingressgateway"}, GW, creds),
                "n1",
                "cluster.local",
                mesh.nodes["n1"].outbound,
                lambda: mesh.directory,
            )
            task = asyncio.create_task(gw.run(stop, 0.5))
            for _ in range(100):
                if len(gw.ports) == ports:
                    break
                await asyncio.sleep(0.02)
            assert len(gw.ports) == ports, gw.problems
            try:
                yield Bed(mesh, gw, pki, creds, simple_serial)
            finally:
                stop.set()
                await task
    finally:
        pod.shutdown()
        pod.server_close()
        for s in [*tls_pods, echo, greeter]:
            s.close()
        shutil.rmtree(work, ignore_errors=True)


async def sh(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(p.communicate(stdin), 20)
    assert p.returncode is not None
    return p.returncode, out.decode("latin-1"), err.decode("latin-1")


def at_destination(bed: Bed, **labels: str) -> float:
    """Requests n2's agent counted from the gateway's identity (reporter=destination)."""
    return metric(
        bed.mesh.nodes["n2"], "istio_requests_total", reporter="destination", source_principal=GW_ID, **labels
    )


def curl(*args: str) -> list[str]:
    return ["curl", "-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", *args]


def test_http_routed_by_host_through_hbone_with_the_gateway_identity() -> None:
    async def main() -> None:
        async with gateway_bed() as bed:
            rc, out, err = await sh(*curl("-H", "Host: my-service", f"http://{GW}:20580/hello?x=1"))
            assert rc == 0, err
            body, code = out.rsplit("\n", 1)
            assert code == "200"
            seen = json.loads(body)
            assert seen["pod"] == "web-2" and seen["path"] == "/hello?x=1"
            assert seen["headers"]["x-via"] == "gateway"  # the route's header operation
            # the destination node verified the gateway's own identity on the HBONE tunnel
            assert f"URI={GW_ID}" in seen["headers"]["x-forwarded-client-cert"]
            assert seen["headers"]["x-forwarded-proto"] == "http"
            rc, out, _ = await sh(*curl("-H", "Host: my-service:20580", f"http://{GW}:20580/teapot"))
            assert out.rsplit("\n", 1) == ["short and stout\n", "418"]
            # an unknown host: 404 NR, answered by the gateway
            rc, out, _ = await sh(*curl("-H", "Host: unknown.example.com", f"http://{GW}:20580/"))
            assert out.endswith("\n404") and "takes host 'unknown.example.com'" in out
            n1 = bed.mesh.nodes["n1"]
            src = {"reporter": "source", "source_workload": "istio-ingressgateway", "source_principal": GW_ID}
            assert (
                metric(
                    n1,
                    "istio_requests_total",
                    response_code="200",
                    destination_service="my-service.default.svc.cluster.local",
                    **src,
                )
                == 1
            )
            assert metric(n1, "istio_requests_total", response_code="404", response_flags="NR", **src) == 1
            assert at_destination(bed, response_code="200") == 1

    run(main())


def test_https_redirect() -> None:
    async def main() -> None:
        async with gateway_bed():
            _, out, _ = await sh(
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{redirect_url}",
                "-H",
                "Host: shop.example.com:20581",
                f"http://{GW}:20581/cart?id=7",
            )
            assert out == "301 https://shop.example.com/cart?id=7"

    run(main())


def test_https_simple_and_mutual_with_curl_and_openssl() -> None:
    async def main() -> None:
        async with gateway_bed() as bed:
            ca = bed.pki.ca_file
            resolve = ["--resolve", f"secure.example.com:20543:{GW}", "--cacert", ca]
            rc, out, err = await sh(*curl(*resolve, "https://secure.example.com:20543/s"))
            assert rc == 0 and out.endswith("\n200"), err
            seen = json.loads(out.rsplit("\n", 1)[0])
            assert seen["path"] == "/s" and seen["headers"]["x-forwarded-proto"] == "https"
            # (ALPN offers http/1.1 only: requests keep their protocol upstream, and this pod is 1.1)
            rc, out, err = await sh(*curl("--http2", "-v", *resolve, "https://secure.example.com:20543/s2"))
            assert rc == 0 and out.endswith("\n200") and "ALPN: server accepted http/1.1" in err, err
            rc, out, _ = await sh(
                "openssl",
                "s_client",
                "-connect",
                f"{GW}:20543",
                "-servername",
                "secure.example.com",
                "-CAfile",
                ca,
                "-verify_return_error",
                "-brief",
                stdin=b"",
            )
            assert "Verification: OK" in out + _ and "secure.example.com" in out + _
            # one port, two servers: the SNI picks the server, so its certificate and its TLS floor
            _, out, err = await sh(
                "openssl",
                "s_client",
                "-connect",
                f"{GW}:20543",
                "-servername",
                "a.other.example.com",
                "-CAfile",
                ca,
                "-verify_return_error",
                "-brief",
                stdin=b"",
            )
            assert "Verification: OK" in out + err and "*.other.example.com" in out + err, out + err
            rc, _, err = await sh(
                "openssl",
                "s_client",
                "-connect",
                f"{GW}:20543",
                "-servername",
                "a.other.example.com",
                "-tls1_2",
                "-brief",
                stdin=b"",
            )
            assert rc != 0 and "Verification" not in err, err  # minProtocolVersion: TLSV1_3 refuses 1.2
            rc, out, err = await sh(
                *curl(
                    "--resolve",
                    f"a.other.example.com:20543:{GW}",
                    "--cacert",
                    ca,
                    "https://a.other.example.com:20543/o",
                )
            )
            assert rc == 0 and out.endswith("\n200"), err
            # MUTUAL: without a client certificate refused, with one served
            mres = ["--resolve", f"mtls.example.com:20544:{GW}", "--cacert", ca]
            rc, out, err = await sh(*curl(*mres, "https://mtls.example.com:20544/"))
            assert rc != 0 or not out.endswith("\n200")
            cert, key, _serial = bed.pki.leaf("client-1", client=True)
            cf, kf = os.path.join(bed.pki.dir, "client.crt"), os.path.join(bed.pki.dir, "client.key")
            for path, data in ((cf, cert), (kf, key)):
                with open(path, "wb") as f:
                    f.write(data)
            rc, out, err = await sh(
                *curl(*mres, "--cert", cf, "--key", kf, "https://mtls.example.com:20544/m")
            )
            assert rc == 0 and out.endswith("\n200"), err
            req = b"GET /o HTTP/1.1\r\nHost: mtls.example.com\r\nConnection: close\r\n\r\n"
            rc, out, err = await sh(
                "openssl",
                "s_client",
                "-quiet",
                "-connect",
                f"{GW}:20544",
                "-servername",
                "mtls.example.com",
                "-CAfile",
                ca,
                "-cert",
                cf,
                "-key",
                kf,
                "-verify_return_error",
                stdin=req,
            )
            assert out.startswith("HTTP/1.1 200"), out + err
            # the key file gone: the last good certificate keeps serving
            os.rename(os.path.join(bed.creds, "mutual-cred.key"), os.path.join(bed.creds, "gone.key"))
            await asyncio.sleep(0.6)  # (past the files' recheck interval)
            rc, out, err = await sh(
                *curl(*mres, "--cert", cf, "--key", kf, "https://mtls.example.com:20544/m")
            )
            assert rc == 0 and out.endswith("\n200"), err
            # ... but a credential that never loaded (a restarted gateway) takes no connection
            bed.gateway.credentials = Credentials(bed.creds)
            rc, out, err = await sh(
                *curl(*mres, "--cert", cf, "--key", kf, "https://mtls.example.com:20544/m")
            )
            assert rc != 0
            rc, out, _ = await sh(*curl(*resolve, "https://secure.example.com:20543/s"))
            assert out.endswith("\n200")

    run(main())


def test_certificate_rotation_under_a_client_loop_drops_nothing() -> None:
    async def main() -> None:
        async with gateway_bed() as bed:
            ctx = ssl.create_default_context(cafile=bed.pki.ca_file)
            served: list[int] = []
            failures: list[str] = []
            done = threading.Event()

            def loop() -> None:
                deadline = time.monotonic() + 15
                while not done.is_set() and time.monotonic() < deadline:
                    try:
                        raw = socket.create_connection((GW, 20543), timeout=5)
                        s = ctx.wrap_socket(raw, server_hostname="secure.example.com")
                        c = http.client.HTTPSConnection("secure.example.com", 20543, timeout=5)
                        c.sock = s
                        c.request("GET", "/rot")
                        r = c.getresponse()
                        r.read()
                        if r.status != 200:
                            failures.append(f"status {r.status}")
                        der = s.getpeercert(binary_form=True)
                        assert der is not None
                        served.append(x509.load_der_x509_certificate(der).serial_number)
                        c.close()
                    except Exception as e:
                        failures.append(repr(e))

            t = threading.Thread(target=loop)
            t.start()
            try:
                while len(served) < 20 and not failures:
                    await asyncio.sleep(0.05)
                new_serial = bed.pki.credential("simple-cred", "secure.example.com")
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and (not served or served[-1] != new_serial):
                    await asyncio.sleep(0.05)
                n = len(served)
                while len(served) < n + 20 and time.monotonic() < deadline + 5:
                    await asyncio.sleep(0.05)
            finally:
                done.set()
                await asyncio.to_thread(t.join)
            assert failures == []
            assert served[0] == bed.simple_serial and served[-1] == new_serial
            assert served.index(new_serial) >= 20 and len(served) >= 40
            assert bed.gateway.credentials.reloads == 1

    run(main())


def test_tls_passthrough_routed_by_sni() -> None:
    async def main() -> None:
        async with gateway_bed() as bed:
            ctx = ssl.create_default_context(cafile=bed.pki.ca_file)
            for name in ("a", "b"):  # a: over HBONE to n2; b: a pod on the gateway's node
                r, w = await asyncio.open_connection(
                    GW, 20545, ssl=ctx, server_hostname=f"{name}.pass.example.com"
                )
                w.write(b"x")
                assert await r.read() == f"pod {name}\n".encode()  # the pod's own certificate verified
                w.close()
            _, out, err = await sh(
                "openssl",
                "s_client",
                "-connect",
                f"{GW}:20545",
                "-servername",
                "a.pass.example.com",
                "-CAfile",
                bed.pki.ca_file,
                "-verify_return_error",
                "-brief",
                stdin=b"x",
            )
            assert "a.pass.example.com" in out + err and "Verification: OK" in out + err
            # an SNI no route takes: reset, counted NR
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                r, w = await asyncio.open_connection(GW, 20545, ssl=ctx, server_hostname="c.pass.example.com")
                assert await r.read() == b""
            n1 = bed.mesh.nodes["n1"]
            assert (
                metric(
                    n1,
                    "istio_tcp_connections_opened_total",
                    reporter="source",
                    source_workload="istio-ingressgateway",
                    destination_service="tls-a.default.svc.cluster.local",
                )
                >= 1
            )
            assert metric(n1, "nodemesh_outbound_failures_total", response_flags="NR") >= 1

    run(main())


def test_tcp_server_routed_by_the_bound_tcp_route() -> None:
    async def main() -> None:
        async with gateway_bed() as bed:
            r, w = await asyncio.open_connection(GW, 20546)
            w.write(b"ping")
            w.write_eof()
            assert await r.read() == b"echo:ping"  # the pod on n2, over HBONE
            w.close()
            # a TLS server in SIMPLE mode: the gateway terminates TLS, then its tcp route (in plain
            # TCP to the pod, over HBONE)
            ctx = ssl.create_default_context(cafile=bed.pki.ca_file)
            r, w = await asyncio.open_connection(GW, 20548, ssl=ctx, server_hostname="secure.example.com")
            w.write(b"over tls")
            # (TLS has no half-close: the pod's end closes nothing the client sees until it closes)
            assert await asyncio.wait_for(r.readexactly(14), 10) == b"greet:over tls"
            w.close()
            assert (
                metric(
                    bed.mesh.nodes["n2"],
                    "istio_tcp_connections_opened_total",
                    reporter="destination",
                    source_principal=GW_ID,
                )
                >= 1
            )

    run(main())


def test_a_port_it_cannot_listen_on_is_reported_and_taken_once_free() -> None:
    async def main() -> None:
        blocker = socket.create_server((GW, 20580))  # (as a predecessor still draining would)
        try:
            async with gateway_bed(ports=8) as bed:
                assert 20580 not in bed.gateway.ports
                (line,) = bed.gateway.problem_lines()
                assert line.startswith("gateway port 20580: cannot listen on 127.0.0.50:20580")
                blocker.close()
                for _ in range(100):  # retried each second
                    if 20580 in bed.gateway.ports:
                        break
                    await asyncio.sleep(0.05)
                assert bed.gateway.problem_lines() == []
                _, out, _ = await sh(*curl("-H", "Host: my-service", f"http://{GW}:20580/"))
                assert out.endswith("\n200")
        finally:
            blocker.close()

    run(main())


def test_grpc_by_http2_prior_knowledge_through_the_gateway() -> None:
    from concurrent import futures

    import grpc

    def say(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"grpc-1:" + request

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    srv.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
            ),
        )
    )
    srv.add_insecure_port("127.0.0.56:20556")
    srv.start()

    def calls(ca: bytes | None = None) -> tuple[list[bytes], grpc.StatusCode]:
        opts = [("grpc.default_authority", "grpc.example.com")]
        if ca is None:
            ch = grpc.insecure_channel(f"{GW}:20582", options=opts)
        else:  # over TLS: ALPN h2, offered since every route of that server leads to a grpc port
            opts.append(("grpc.ssl_target_name_override", "grpc.example.com"))
            ch = grpc.secure_channel(f"{GW}:20547", grpc.ssl_channel_credentials(root_certificates=ca), opts)
        with ch:
            got = [ch.unary_unary("/echo.Echo/Say")(b"hi%d" % i, timeout=10) for i in range(5)]
            try:
                ch.unary_unary("/echo.Echo/Missing")(b"x", timeout=10)
            except grpc.RpcError as e:
                return got, e.code()
        raise AssertionError("the fault did not abort the call")

    async def main() -> None:
        async with gateway_bed() as bed:
            with open(bed.pki.ca_file, "rb") as f:
                ca = f.read()
            for tls in (None, ca):
                got, code = await asyncio.to_thread(calls, tls)
                assert got == [b"grpc-1:hi%d" % i for i in range(5)]
                assert code == grpc.StatusCode.UNAVAILABLE  # the route's fault, as a gRPC status
            assert at_destination(bed, request_protocol="grpc", grpc_response_status="0") == 10

    try:
        run(main())
    finally:
        srv.stop(None)


def test_a_restarted_gateway_shares_its_ports_with_the_draining_one() -> None:
    async def main() -> None:
        async with gateway_bed() as bed:
            old = bed.gateway
            new = IngressGateway(old.config, "n1", "cluster.local", old.outbound, old.directory)
            stop = asyncio.Event()
            task = asyncio.create_task(new.run(stop, 0.5))
            try:
                for _ in range(100):
                    if len(new.ports) == len(old.ports):
                        break
                    await asyncio.sleep(0.02)
                assert sorted(new.ports) == sorted(old.ports) and new.problem_lines() == []
                await old.close(0.5)  # the predecessor stops; the successor already listens
                for i in range(10):
                    _, out, _ = await sh(*curl("-H", "Host: my-service", f"http://{GW}:20580/{i}"))
                    assert out.endswith("\n200")
            finally:
                stop.set()
                await task

    run(main())
