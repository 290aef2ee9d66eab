"""Mesh CA, workload certs, trust bundle rotation, pure peer verification, renewal on a fake clock."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.bundle import TrustBundle
from agent.identity.ca import KEY_FILE, MeshCA, make_csr
from agent.identity.certs import WorkloadCert, new_key, sign_leaf
from agent.identity.clock import FakeClock
from agent.identity.errors import (
    CaExistsError,
    CaFileError,
    CaNotFoundError,
    IdentityError,
    IssuanceError,
    PeerRejected,
    RejectReason,
)
from agent.identity.spiffe import SpiffeId
from agent.identity.store import CertManager, LocalIssuer
from agent.identity.verify import CLIENT_AUTH, SERVER_AUTH, verify_node_chain, verify_workload_chain

T0 = datetime(2030, 1, 1, tzinfo=UTC)
TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.create(TD, now=T0 - timedelta(days=30))


def der(cert: WorkloadCert | x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    if isinstance(cert, WorkloadCert):
        return cert.cert_der
    return cert.public_bytes(Encoding.DER)


def custom(ca: MeshCA, uris: Sequence[str], **kw: object) -> x509.Certificate:
    """A leaf signed by ``ca`` with non-standard fields (what a broken or hostile CA would make)."""
    return sign_leaf(ca.root, ca.key, new_key().public_key(), uris=uris,
                     not_before=T0 - timedelta(hours=1), not_after=T0 + timedelta(hours=1), **kw)  # type: ignore[arg-type]


def test_issued_cert_fields(ca: MeshCA) -> None:
    w = ca.issue(WEB, now=T0)
    cert = x509.load_pem_x509_certificate(w.cert_pem)
    key = x509.load_pem_x509_certificate(w.chain_pem[0])
    assert key == ca.root
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB.uri)]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc == T0 + timedelta(hours=24)
    assert w.not_before <= T0 < w.not_after and w.lifetime_s <= 24 * 3600 + 60
    cert.verify_directly_issued_by(ca.root)
    assert "key_pem" not in repr(w) and "PRIVATE" not in repr(w)
    # the key belongs to the cert
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    assert load_pem_private_key(w.key_pem, None).public_key() == pub


def test_issue_refuses_other_trust_domain_and_bad_ttl(ca: MeshCA) -> None:
    with pytest.raises(IssuanceError, match=r"expected trust domain 'cluster\.local'"):
        ca.issue(SpiffeId("evil.org", "default", "web"), now=T0)
    with pytest.raises(IssuanceError, match="expected ttl_s between"):
        ca.issue(WEB, now=T0, ttl_s=30 * 24 * 3600)
    with pytest.raises(IssuanceError, match="CA root is valid"):
        ca.issue(WEB, now=T0 - timedelta(days=365))


def test_ca_files_mode_refuse_overwrite_and_reload(tmp_path: object) -> None:
    d = os.path.join(str(tmp_path), "ca")
    created = MeshCA.init(d, TD, now=T0)
    key_path = os.path.join(d, KEY_FILE)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    with pytest.raises(CaExistsError, match="refusing to overwrite"):
        MeshCA.init(d, TD, now=T0)
    loaded = MeshCA.load(d)
    assert loaded.root == created.root and loaded.trust_domain == TD
    replaced = MeshCA.init(d, TD, now=T0, force=True)
    assert replaced.root != created.root
    os.chmod(key_path, 0o644)
    with pytest.raises(CaFileError, match="expected mode 0600, got 0644"):
        MeshCA.load(d)
    with pytest.raises(CaNotFoundError):
        MeshCA.load(os.path.join(str(tmp_path), "missing"))


def test_corrupt_pem_names_the_file(tmp_path: object) -> None:
    d = os.path.join(str(tmp_path), "ca")
    MeshCA.init(d, TD, now=T0)
    path = os.path.join(d, "ca.crt")
    with open(path, "wb") as f:
        f.write(b"-----BEGIN CERTIFICATE-----\nnot base64!!\n-----END CERTIFICATE-----\n")
    with pytest.raises(CaFileError) as e:
        MeshCA.load(d)
    assert path in e.value.message and "corrupt" in e.value.message


def test_bundle_with_two_roots_verifies_both(ca: MeshCA, tmp_path: object) -> None:
    old_cert = ca.issue(WEB, now=T0)
    new_ca = ca.rotated(now=T0)
    assert len(new_ca.bundle) == 2 and new_ca.bundle.roots[0] == new_ca.root
    new_cert = new_ca.issue(WEB, now=T0)
    for w in (old_cert, new_cert):
        assert verify_workload_chain([w.cert_der], new_ca.bundle, now=T0, trust_domain=TD,
                                     usage=CLIENT_AUTH) == WEB
    # the old bundle does not know the new root yet
    with pytest.raises(PeerRejected) as e:
        verify_workload_chain([new_cert.cert_der], ca.bundle, now=T0, trust_domain=TD, usage=CLIENT_AUTH)
    assert e.value.reason is RejectReason.UNKNOWN_CA
    # dropping the old root stops its certs
    only_new = new_ca.bundle.without_root(new_ca.bundle.fingerprints[1])
    with pytest.raises(PeerRejected):
        verify_workload_chain([old_cert.cert_der], only_new, now=T0, trust_domain=TD, usage=CLIENT_AUTH)
    # PEM file round trip
    path = os.path.join(str(tmp_path), "bundle.pem")
    new_ca.bundle.save(path)
    assert TrustBundle.load(path) == new_ca.bundle


def test_rotate_on_disk_keeps_old_root_in_bundle(tmp_path: object) -> None:
    d = os.path.join(str(tmp_path), "ca")
    first = MeshCA.init(d, TD, now=T0)
    second = MeshCA.load(d).rotate_on_disk(d, now=T0)
    reloaded = MeshCA.load(d)
    assert reloaded.root == second.root and first.root in reloaded.bundle.roots
    retired = [n for n in os.listdir(d) if n.startswith("ca.key.retired-")]
    assert len(retired) == 1 and stat.S_IMODE(os.stat(os.path.join(d, retired[0])).st_mode) == 0o600


def _reason(chain: list[bytes], bundle: TrustBundle, *, now: datetime = T0,
            usage: x509.ObjectIdentifier = CLIENT_AUTH, expected: SpiffeId | None = None) -> RejectReason:
    with pytest.raises(PeerRejected) as e:
        verify_workload_chain(chain, bundle, now=now, trust_domain=TD, usage=usage, expected=expected)
    assert "expected" in e.value.message
    return e.value.reason


def test_verification_rejections(ca: MeshCA) -> None:
    good = ca.issue(WEB, now=T0)
    b = ca.bundle
    assert verify_workload_chain([good.cert_der], b, now=T0, trust_domain=TD, usage=SERVER_AUTH) == WEB
    other_ca = MeshCA.create(TD, now=T0 - timedelta(days=1))
    foreign = MeshCA.create("other.example", now=T0 - timedelta(days=1))
    federated = b.with_root(foreign.root)
    foreign_cert = foreign.issue(SpiffeId("other.example", "default", "web"), now=T0)
    assert _reason([other_ca.issue(WEB, now=T0).cert_der], b) is RejectReason.UNKNOWN_CA
    assert _reason([foreign_cert.cert_der], federated) is RejectReason.WRONG_TRUST_DOMAIN
    # a root of one trust domain may not sign for another, even if the leaf claims ours
    assert _reason([der(custom(foreign, [WEB.uri]))], federated) is RejectReason.WRONG_TRUST_DOMAIN
    assert _reason([good.cert_der], b, now=T0 + timedelta(days=2)) is RejectReason.EXPIRED
    assert _reason([good.cert_der], b, now=T0 - timedelta(hours=2)) is RejectReason.NOT_YET_VALID
    two = custom(ca, [WEB.uri, "spiffe://cluster.local/ns/default/sa/admin"])
    assert _reason([der(two)], b) is RejectReason.SAN_COUNT
    assert _reason([der(custom(ca, []))], b) is RejectReason.SAN_COUNT
    assert _reason([der(custom(ca, [WEB.uri], eku=None))], b) is RejectReason.BAD_EKU
    server_only = custom(ca, [WEB.uri], eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    assert _reason([der(server_only)], b, usage=CLIENT_AUTH) is RejectReason.BAD_EKU
    assert _reason([der(custom(ca, [WEB.uri], digital_signature=False))], b) is RejectReason.BAD_KEY_USAGE
    assert _reason([der(custom(ca, [WEB.uri], is_ca=True))], b) is RejectReason.IS_CA
    assert _reason([der(custom(ca, ["spiffe://cluster.local/node/n1"]))], b) is RejectReason.WRONG_KIND
    assert _reason([der(custom(ca, ["https://cluster.local/x"]))], b) is RejectReason.BAD_SPIFFE_ID
    assert _reason([good.cert_der], b, expected=SpiffeId(TD, "default", "db")) is \
        RejectReason.UNEXPECTED_IDENTITY
    assert _reason([], b) is RejectReason.NO_PEER_CERT
    assert _reason([b"\x30\x03garbage"], b) is RejectReason.MALFORMED_CERT


def test_node_identity_and_kinds_do_not_mix(ca: MeshCA) -> None:
    from agent.identity.spiffe import NodeId

    cert_pem, _ = ca.issue_node(NodeId(TD, "n1"), now=T0)
    node_der = der(x509.load_pem_x509_certificate(cert_pem))
    assert verify_node_chain([node_der], ca.bundle, now=T0, trust_domain=TD) == NodeId(TD, "n1")
    # a node cert is not a workload identity, and a workload cert cannot act as a node
    assert _reason([node_der], ca.bundle) is RejectReason.WRONG_KIND
    with pytest.raises(PeerRejected) as e:
        verify_node_chain([ca.issue(WEB, now=T0).cert_der], ca.bundle, now=T0, trust_domain=TD)
    assert e.value.reason is RejectReason.WRONG_KIND


def test_csr_signing_uses_only_key_and_san(ca: MeshCA) -> None:
    key = new_key()
    sid, cert = ca.sign_csr(make_csr(WEB, key), now=T0, ttl_s=3600)
    assert sid == WEB and cert.public_key() == key.public_key()
    assert cert.not_valid_after_utc == T0 + timedelta(hours=1)
    with pytest.raises(IssuanceError, match="expected a PEM certificate request"):
        ca.sign_csr(b"nope", now=T0)
    with pytest.raises(IssuanceError, match="expected trust domain"):
        ca.sign_csr(make_csr(SpiffeId("evil.org", "a", "b"), key), now=T0)


class CountingIssuer(LocalIssuer):
    def __init__(self, ca: MeshCA) -> None:
        super().__init__(ca)
        self.calls = 0
        self.fail = False

    async def issue(self, spiffe_id: SpiffeId, *, now: datetime, ttl_s: int) -> WorkloadCert:
        self.calls += 1
        if self.fail:
            raise IdentityError("CA unreachable (test)")
        return await super().issue(spiffe_id, now=now, ttl_s=ttl_s)


def test_renewal_at_half_life_with_fake_clock(ca: MeshCA) -> None:
    async def scenario() -> None:
        clock = FakeClock(T0)
        issuer = CountingIssuer(ca)
        mgr = CertManager(issuer, clock, ttl_s=24 * 3600, retry_s=30)
        seen: list[WorkloadCert] = []
        mgr.subscribe(seen.append)
        first, same = await asyncio.gather(mgr.ensure(WEB), mgr.ensure(WEB))
        assert same is first and await mgr.ensure(WEB) is first and issuer.calls == 1
        half = (first.renew_at - T0).total_seconds()
        assert first.renew_at == first.not_before + (first.not_after - first.not_before) / 2
        clock.advance(half - 1)
        assert mgr.due() == [] and await mgr.renew_due() == []
        assert mgr.sleep_s() == pytest.approx(1)
        clock.advance(1)
        assert mgr.due() == [WEB]
        # a failed renewal keeps the old cert and retries after retry_s
        issuer.fail = True
        assert await mgr.renew_due() == []
        assert mgr.current(WEB) is first and mgr.status()[0].last_error
        assert mgr.due() == [] and mgr.sleep_s() == pytest.approx(30)
        issuer.fail = False
        clock.advance(30)
        (second,) = await mgr.renew_due()
        assert mgr.current(WEB) is second and second.not_after > first.not_after
        assert seen == [first, second] and mgr.status()[0].last_error is None
        mgr.forget(WEB)
        assert mgr.current(WEB) is None and mgr.next_wakeup() is None

    asyncio.run(scenario())


def test_run_loop_renews_on_fake_clock_without_sleeping(ca: MeshCA) -> None:
    async def scenario() -> None:
        clock = FakeClock(T0)
        issuer = CountingIssuer(ca)
        mgr = CertManager(issuer, clock, ttl_s=3600)
        await mgr.ensure(WEB)
        task = asyncio.create_task(mgr.run())
        try:
            for expected_calls in (2, 3, 4):
                clock.advance(1800 + 31)  # past half life (backdating adds 30 s to the half)
                for _ in range(100):
                    if issuer.calls == expected_calls:
                        break
                    await asyncio.sleep(0)
                assert issuer.calls == expected_calls
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(asyncio.wait_for(scenario(), 10))
