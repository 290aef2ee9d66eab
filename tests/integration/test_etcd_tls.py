"""etcd over TLS with client certificates (etcd's --client-cert-auth), as a production
cluster runs: agents, applies and the CLI work with the right files and say why not
with the wrong ones."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.control import apply as apply_mod
from agent.control.errors import BackendUnavailable, RegistryError
from agent.control.etcd import EtcdBackend, EtcdTls
from agent.control.registry import Registry
from agent.control.validate import parse_vip_range, parse_yaml
from tests.integration.etcd_fixture import Etcd, running_etcd
from tests.integration.etcd_tls import TlsFiles, make_tls_files

NET = parse_vip_range("10.96.0.0/16")
ROOT = Path(__file__).resolve().parents[2]
DOC = """apiVersion: nodemesh.io/v1
kind: Workload
metadata: {name: w-1, namespace: tls, labels: {app: tls}}
spec: {address: 10.244.7.2, node: node1}
"""


@pytest.fixture(scope="module")
def files() -> Iterator[tuple[TlsFiles, TlsFiles]]:
    with tempfile.TemporaryDirectory(prefix="nodemesh-etcd-tls-") as d:
        yield make_tls_files(os.path.join(d, "good")), make_tls_files(os.path.join(d, "other"), "other")


@pytest.fixture(scope="module")
def etcd(files: tuple[TlsFiles, TlsFiles]) -> Iterator[Etcd]:
    with running_etcd(tls=files[0]) as e:
        yield e


def client(f: TlsFiles) -> EtcdTls:
    return EtcdTls(f.ca, f.client_cert, f.client_key)


def test_agents_applies_and_the_cli_work_over_tls(etcd: Etcd, files: tuple[TlsFiles, TlsFiles]) -> None:
    good, _ = files
    assert etcd.url.startswith("https://")
    reg = Registry(EtcdBackend(etcd.url, timeout_s=2.0, tls=client(good)), poll_timeout_s=0.2)
    reg.start()
    try:
        writer = EtcdBackend(etcd.url, tls=client(good))
        apply_mod.apply(writer, parse_yaml(DOC, "w.yaml", NET), NET)
        writer.close()
        assert reg.wait_for(lambda s: ("tls", "w-1") in s.workloads, 10) is not None, reg.status()
        assert not reg.stale
    finally:
        reg.stop()
    env = {**os.environ, "NODEMESH_ETCD_CA": good.ca, "NODEMESH_ETCD_CERT": good.client_cert,
           "NODEMESH_ETCD_KEY": good.client_key}
    out = subprocess.run([sys.executable, "-m", "agent.cli.main", "get", "workloads", "-n", "tls",
                          "--etcd", etcd.url, "--output", "json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '"w-1"' in out.stdout, out.stderr


@pytest.mark.parametrize("case, says", [
    ("other CA", "certificate is not trusted"),
    ("no client cert", "does it require a client certificate"),
    ("plain http", "is it an https:// endpoint"),
])
def test_wrong_tls_settings_say_why(etcd: Etcd, files: tuple[TlsFiles, TlsFiles], case: str,
                                    says: str) -> None:
    good, other = files
    url, tls = etcd.url, client(good)
    if case == "other CA":
        tls = replace(tls, ca=other.ca)
    elif case == "no client cert":
        tls = EtcdTls(good.ca)
    else:
        url, tls = url.replace("https://", "http://"), EtcdTls()
    b = EtcdBackend(url, timeout_s=2.0, tls=tls)
    try:
        with pytest.raises(BackendUnavailable, match=f"etcd at {url} is unreachable: .*{says}"):
            b.read()
    finally:
        b.close()


def test_bad_tls_files_are_refused_before_connecting(files: tuple[TlsFiles, TlsFiles]) -> None:
    good, _ = files
    with pytest.raises(RegistryError, match=r"cannot use /nonexistent\.pem as the etcd CA"):
        EtcdBackend("https://127.0.0.1:2379", tls=EtcdTls("/nonexistent.pem"))
    with pytest.raises(RegistryError, match="as the etcd client certificate"):
        EtcdBackend("https://127.0.0.1:2379", tls=EtcdTls(good.ca, good.client_cert, good.server_key))
    with pytest.raises(RegistryError, match="needs its key"):
        EtcdBackend("https://127.0.0.1:2379", tls=EtcdTls(good.ca, good.client_cert))
    with pytest.raises(RegistryError, match="is http://: use https://"):
        EtcdBackend("http://127.0.0.1:2379", tls=EtcdTls(good.ca))
