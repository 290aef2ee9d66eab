"""Input validation (pure) and the CLI's answers to bad input, as a new user would try."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli.main import cli
from agent.control.apply import plan
from agent.control.consul import parse_consul
from agent.control.errors import InputError
from agent.control.model import Health
from agent.control.validate import parse_duration_s, parse_vip_range, parse_yaml

NET = parse_vip_range("10.96.0.0/16")

GOOD = """\
apiVersion: nodemesh.io/v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: http
    protocol: http
---
apiVersion: nodemesh.io/v1
kind: Workload
metadata: {name: web-1, labels: {app: web}}
spec:
  address: 10.244.1.2
  ports: {http: 8080}
  checks:
  - http: http://10.244.1.2:8080/healthz
    interval: 5s
    timeout: 1s
    failuresBeforeCritical: 3
"""


def err(text: str, file: str = "in.yaml") -> InputError:
    with pytest.raises(InputError) as ei:
        parse_yaml(text, file, NET)
    return ei.value


def test_good_documents_parse() -> None:
    svc, wl = parse_yaml(GOOD, "in.yaml", NET)
    assert svc.resource.name == "web" and svc.resource.vip == ""  # allocated by apply
    assert wl.line == 13
    (check,) = wl.resource.checks  # type: ignore[union-attr]
    assert (check.interval_s, check.timeout_s, check.failures_before_critical) == (5.0, 1.0, 3)
    assert check.initial_status == Health.CRITICAL


@pytest.mark.parametrize(("text", "line", "path", "reason"), [
    ("kind: [unclosed\n", 2, "", "invalid YAML"),
    (GOOD.replace("kind: Service", "kind: Servise"), 2, "kind", "unknown kind 'Servise'"),
    (GOOD.replace("  name: web\n", ""), 3, "metadata.name", "missing required field 'name'"),
    (GOOD.replace("port: 80\n", "port: 80000\n"), 9, "spec.ports[0].port", "out of range"),
    (GOOD.replace("port: 80\n", "port: eighty\n"), 9, "spec.ports[0].port", "expected an integer"),
    (GOOD.replace("  selector", "  vip: 10.1.0.1\n  selector"), 6, "spec.vip",
     "outside the service range 10.96.0.0/16"),
    (GOOD.replace("  selector", "  vip: banana\n  selector"), 6, "spec.vip", "not an IP address"),
    (GOOD.replace("address: 10.244.1.2", "adress: 10.244.1.2"), 17, "spec.adress",
     "unknown field 'adress'"),
    (GOOD.replace("protocol: http", "protocol: udp"), 11, "spec.ports[0].protocol",
     "unknown protocol"),
    (GOOD.replace("interval: 5s", "interval: soon"), 21, "spec.checks[0].interval",
     "not a duration"),
    (GOOD.replace("nodemesh.io/v1\nkind: Service", "v1\nkind: Service"), 1, "apiVersion",
     "unsupported apiVersion"),
])
def test_bad_yaml_names_file_line_path_and_reason(
    text: str, line: int, path: str, reason: str,
) -> None:
    e = err(text)
    assert e.file == "in.yaml" and e.line == line and e.path == path
    assert reason in e.reason
    assert e.message.startswith(f"in.yaml:{line}")


def test_cidr_that_is_not_a_network() -> None:
    with pytest.raises(InputError) as ei:
        parse_vip_range("10.96.0.1/16")
    assert "host bits set" in ei.value.message and ei.value.hint == "did you mean 10.96.0.0/16?"
    with pytest.raises(InputError):
        parse_vip_range("10.96.0.0/33")


def test_plan_allocates_vips_and_rejects_taken_ones() -> None:
    two = GOOD.split("---")[0] + "---\n" + GOOD.split("---")[0].replace("name: web", "name: api")
    p = plan({}, parse_yaml(two, "a.yaml", NET), NET)
    vips = sorted(json.loads(v)["vip"] for k, v in p.puts.items())
    assert vips == ["10.96.0.1", "10.96.0.2"]
    taken = GOOD.split("---")[0].replace("name: web", "name: other").replace(
        "  selector", "  vip: 10.96.0.1\n  selector")
    with pytest.raises(InputError) as ei:
        plan(dict(p.puts), parse_yaml(taken, "b.yaml", NET), NET)
    assert "already taken by Service default/" in ei.value.reason and ei.value.path == "spec.vip"


def test_durations() -> None:
    assert parse_duration_s("1m30s") == 90 and parse_duration_s("500ms") == 0.5
    with pytest.raises(ValueError):
        parse_duration_s("10 parsecs")


CONSUL_HCL = """
service {
  name    = "web"
  id      = "web-1"
  address = "10.244.1.7"
  port    = 8080
  meta { protocol = "http" }
  check {
    http = "http://127.0.0.1:8080/health"
    interval = "1s"
    timeout = "500ms"
    success_before_passing = 2
    failures_before_critical = 3
    deregister_critical_service_after = "1m"
  }
}
"""


def test_consul_hcl_and_json_give_the_same_resources() -> None:
    hcl = parse_consul(CONSUL_HCL, "web.hcl", existing_services={}, node="n1", vip_range=NET)
    as_json = json.dumps({"service": {
        "name": "web", "id": "web-1", "address": "10.244.1.7", "port": 8080,
        "meta": {"protocol": "http"}, "checks": [{
            "http": "http://127.0.0.1:8080/health", "interval": "1s", "timeout": "500ms",
            "success_before_passing": 2, "failures_before_critical": 3,
            "deregister_critical_service_after": "1m"}]}})
    js = parse_consul(as_json, "web.json", existing_services={}, node="n1", vip_range=NET)
    assert [x.resource for x in hcl] == [x.resource for x in js]
    wl = hcl[0].resource
    (c,) = wl.checks  # type: ignore[union-attr]
    assert (c.success_before_passing, c.failures_before_critical,
            c.deregister_critical_after_s, c.timeout_s) == (2, 3, 60.0, 0.5)


def test_consul_hcl_syntax_error_has_line() -> None:
    with pytest.raises(InputError) as ei:
        parse_consul(CONSUL_HCL.replace('port    = 8080', 'port    = '), "web.hcl",
                     existing_services={}, node="n1", vip_range=NET)
    assert ei.value.file == "web.hcl" and ei.value.line == 7 and "invalid HCL" in ei.value.reason


def test_consul_unsupported_check_kind() -> None:
    with pytest.raises(InputError) as ei:
        parse_consul(CONSUL_HCL.replace("http = ", "script = "), "web.hcl",
                     existing_services={}, node="n1", vip_range=NET)
    assert ei.value.path == "service.check.script" and ei.value.line == 9


# -- the CLI, end to end on an embedded registry in a temp dir --------------------------


def run(args: list[str], reg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, [*args], env={"NODEMESH_REGISTRY_DIR": str(reg)})
    return r.exit_code, r.output


def test_cli_bad_inputs_apply_nothing(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert run(["apply", "-f", str(good)], reg)[0] == 0
    state = (reg / "state.json").read_bytes()
    second_good = GOOD.split("---")[0].replace("name: web", "name: api")
    cases = {
        "invalid.yaml": ("kind: [", "invalid YAML"),
        "kind.yaml": (GOOD.replace("kind: Workload", "kind: Pod"), "unknown kind 'Pod'"),
        "missing.yaml": (GOOD.replace("  address: 10.244.1.2\n", ""),
                         "missing required field 'address'"),
        "range.yaml": (GOOD.replace("port: 80\n", "port: 0\n"), "out of range 1-65535"),
        "outside.yaml": (second_good.replace("  selector", "  vip: 192.168.0.1\n  selector"),
                         "outside the service range"),
        "taken.yaml": (second_good + "---\n" + second_good.replace("name: api", "name: b").replace(
            "  selector", "  vip: 10.96.0.1\n  selector"), "already taken by Service default/web"),
    }
    for name, (text, reason) in cases.items():
        f = tmp_path / name
        f.write_text(text)
        code, out = run(["apply", "-f", str(f)], reg)
        assert code == 2, (name, out)
        assert f"error: {f}:" in out and reason in out, (name, out)
        assert (reg / "state.json").read_bytes() == state, f"{name} changed the registry"
    code, out = run(["apply", "-f", str(good), "--vip-range", "10.96.0.1/16"], reg)
    assert code == 2 and "not a network" in out and "did you mean 10.96.0.0/16" in out
    hclf = tmp_path / "bad.hcl"
    hclf.write_text('service {\n  name = "x"\n  port = \n}\n')
    code, out = run(["register", str(hclf)], reg)
    assert code == 2 and f"{hclf}:4" in out and "invalid HCL" in out
    assert (reg / "state.json").read_bytes() == state
    (reg / "state.json").write_text("{garbage")
    code, out = run(["get", "services"], reg)
    assert code == 2 and f"{reg / 'state.json'} is corrupted" in out and "hint:" in out


def test_cli_get_describe_delete_register(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert run(["apply", "-f", str(tmp_path)], reg)[0] == 0
    code, out = run(["get", "svc"], reg)
    assert code == 0 and "10.96.0.1" in out and "0/1" in out  # check not run yet: critical
    hclf = tmp_path / "web2.hcl"
    hclf.write_text(CONSUL_HCL.replace("web-1", "web-2").replace('"web"', '"shop"'))
    code, out = run(["register", str(hclf), "--node", "n1"], reg)
    assert code == 0 and "Service default/shop created" in out, out
    code, out = run(["describe", "svc", "shop", "-o", "json"], reg)
    assert code == 0 and json.loads(out)["vip"] == "10.96.0.2"
    code, out = run(["delete", "workload", "web-1"], reg)
    assert code == 0
    code, out = run(["delete", "workload", "web-1"], reg)
    assert code == 3 and "not found" in out


def test_service_load_balancer_policy_is_validated() -> None:
    from agent.control.model import Service
    from agent.control.validate import parse_vip_range, parse_yaml

    base = """apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80}]
"""
    (svc,) = parse_yaml(base + "  loadBalancer: least_request\n", "f.yaml", parse_vip_range("10.96.0.0/16"))
    assert isinstance(svc.resource, Service) and svc.resource.lb_policy == "LEAST_REQUEST"
    import pytest as _pytest

    from agent.control.errors import InputError

    with _pytest.raises(InputError, match=r"spec\.loadBalancer.*unknown load-balancing policy 'FASTEST'"):
        parse_yaml(base + "  loadBalancer: FASTEST\n", "f.yaml", parse_vip_range("10.96.0.0/16"))


_SCALARS = ["80", "0x1F", "0o17", "017", "1_000", "-3", "+4", "1.5", "1e3", "6.02e+23", ".inf", "-.Inf",
            ".nan", "1:30", "190:20:30", "true", "True", "yes", "No", "on", "OFF", "y", "n", "null", "~",
            "Null", "", "2002-12-14", "2001-12-14t21:59:43.10-05:00", "10.1.2.3", "w-1", "abc",
            "'80'", '"true"', "!!str 80", "!!int '7'", "! 80", "<<", "=", "-", "0", "00", "-0",
            "|\n  block\n", ">-\n  folded\n  text\n"]


@pytest.mark.parametrize("scalar", _SCALARS)
def test_fast_loader_reads_scalars_exactly_like_pyyaml_safe_load(scalar: str) -> None:
    import yaml

    from agent.control.validate import _FastLoader, _to_python
    text = f"v: {scalar}\nlist: [{scalar if chr(10) not in scalar else 'x'}]\n"
    try:
        want = yaml.safe_load(text)
    except yaml.YAMLError:
        with pytest.raises(yaml.YAMLError):
            _to_python(yaml.compose(text, Loader=_FastLoader), yaml.SafeLoader(""))
        with pytest.raises(InputError, match=r"f\.yaml:2: invalid YAML"):
            parse_yaml(f"apiVersion: nodemesh.io/v1\nkind: {scalar}\n", "f.yaml", NET)
        return
    got = _to_python(yaml.compose(text, Loader=_FastLoader), yaml.SafeLoader(""))
    assert got == want and [type(v) for v in got.values()] == [type(v) for v in want.values()]
