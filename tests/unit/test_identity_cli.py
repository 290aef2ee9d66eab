"""`nodemesh ca init/inspect/rotate/issue-node` through click's CliRunner, including bad input."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from agent.cli.main import cli
from agent.identity.ca import MeshCA


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_init_then_inspect(tmp_path: Path) -> None:
    d = str(tmp_path / "ca")
    code, out, _ = invoke("ca", "init", "--dir", d, "--trust-domain", "cluster.local")
    assert code == 0 and "cluster.local" in out
    assert stat.S_IMODE(os.stat(os.path.join(d, "ca.key")).st_mode) == 0o600
    code, out, _ = invoke("ca", "inspect", "--dir", d)
    assert code == 0
    assert "spiffe://cluster.local" in out and "in 9y 364d" in out and "sha256" in out
    code, out, _ = invoke("ca", "inspect", "--dir", d, "--output", "json")
    (doc,) = json.loads(out)
    assert doc["spiffe_id"] == "spiffe://cluster.local" and doc["is_ca"] is True
    assert 9.9 * 365 * 86400 < doc["expires_in_s"] <= 10 * 365 * 86400 + 60
    assert doc["sha256_fingerprint"].count(":") == 31


def test_init_refuses_overwrite_without_force(tmp_path: Path) -> None:
    d = str(tmp_path / "ca")
    assert invoke("ca", "init", "--dir", d, "--trust-domain", "td")[0] == 0
    before = MeshCA.load(d).root
    code, _, err = invoke("ca", "init", "--dir", d, "--trust-domain", "td")
    assert code == 2 and "refusing to overwrite" in err and "--force" in err
    assert MeshCA.load(d).root == before
    assert invoke("ca", "init", "--dir", d, "--trust-domain", "td", "--force")[0] == 0
    assert MeshCA.load(d).root != before


def test_bad_input(tmp_path: Path) -> None:
    code, _, err = invoke("ca", "init", "--dir", str(tmp_path / "x"), "--trust-domain", "Not A Domain")
    assert code == 2 and "trust domain" in err and "expected" in err
    code, _, err = invoke("ca", "inspect", "--dir", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA====\n-----END CERTIFICATE-----\n")
    code, _, err = invoke("ca", "inspect", "--cert", str(bad))
    assert code == 2 and str(bad) in err and "corrupt" in err
    empty = tmp_path / "empty.pem"
    empty.write_text("hello\n")
    code, _, err = invoke("ca", "inspect", "--cert", str(empty))
    assert code == 2 and str(empty) in err
    code, _, err = invoke("ca", "inspect", "--cert", str(tmp_path / "nope.pem"))
    assert code == 2 and "nope.pem" in err and "does not exist" in err
    code, _, err = invoke("ca", "inspect")
    assert code == 2 and "exactly one of --dir or --cert" in err
    # a directory without a CA: not found
    (tmp_path / "emptydir").mkdir()
    code, _, err = invoke("ca", "inspect", "--dir", str(tmp_path / "emptydir"))
    assert code == 3 and "ca.crt" in err and "hint: create one" in err
    # a corrupt root in a CA directory names the file
    d = str(tmp_path / "ca")
    invoke("ca", "init", "--dir", d, "--trust-domain", "td")
    Path(d, "bundle.pem").write_text("garbage")
    code, _, err = invoke("ca", "inspect", "--dir", d)
    assert code == 2 and os.path.join(d, "bundle.pem") in err


def test_rotate_and_issue_node(tmp_path: Path) -> None:
    d, out_dir = str(tmp_path / "ca"), str(tmp_path / "node1")
    invoke("ca", "init", "--dir", d, "--trust-domain", "td")
    code, out, _ = invoke("ca", "rotate", "--dir", d)
    assert code == 0 and "2 roots" in out
    code, out, _ = invoke("ca", "inspect", "--dir", d, "-o", "json")
    assert [r["role"] for r in json.loads(out)] == ["current root", "bundle root"]
    code, out, _ = invoke("ca", "issue-node", "--dir", d, "--node", "n1", "--out", out_dir)
    assert code == 0, out
    assert stat.S_IMODE(os.stat(os.path.join(out_dir, "node.key")).st_mode) == 0o600
    code, out, _ = invoke("ca", "inspect", "--cert", os.path.join(out_dir, "node.crt"), "-o", "json")
    (doc,) = json.loads(out)
    assert doc["spiffe_id"] == "spiffe://td/node/n1" and doc["is_ca"] is False
    code, _, err = invoke("ca", "issue-node", "--dir", d, "--node", "../etc", "--out", out_dir)
    assert code == 2 and "node name" in err
