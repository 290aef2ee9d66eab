"""The mypyc build (scripts/build_native.py): the suite runs the compiled modules, and a build
its sources no longer match is removed, never imported."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import sys

import pytest

from agent import native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_suite_runs_the_compiled_modules_that_setup_built() -> None:
    if os.environ.get("NODEMESH_NATIVE") == "0":  # setup was told not to build: all pure Python
        assert not os.path.exists(os.path.join(ROOT, native.STAMP))
        return
    assert os.path.exists(os.path.join(ROOT, native.STAMP)), "setup.sh did not run build_native.py"
    for m in native.MODULES:
        importlib.import_module(m)
    assert native.loaded() == {m: True for m in native.MODULES}
    assert set(native.MYPYC_MODULES).isdisjoint(native.CYTHON_MODULES)


def _tree(tmp: str, source: str) -> tuple[str, str]:
    """A fake checkout: agent/m.py, its 'compiled' agent/m.so and a stamp of the build."""
    os.makedirs(os.path.join(tmp, "agent"))
    src, so = os.path.join(tmp, "agent", "m.py"), os.path.join(tmp, "agent", "m.cpython-311.so")
    with open(src, "w") as f:
        f.write("X = 1\n")
    with open(so, "wb") as f:
        f.write(b"\x7fELF")
    stamp = {
        "python": sys.version,
        "sources": native.source_hashes(tmp, ("agent.m",)),
        "files": ["agent/m.cpython-311.so"],
    }
    with open(os.path.join(tmp, native.STAMP), "w") as f:
        json.dump(stamp, f)
    with open(src, "w") as f:
        f.write(source)
    return src, so


def test_a_build_that_matches_its_sources_is_kept(tmp_path: pathlib.Path) -> None:
    _, so = _tree(str(tmp_path), "X = 1\n")
    assert native.drop_stale(str(tmp_path), ("agent.m",)) == ""
    assert os.path.exists(so) and os.path.exists(os.path.join(str(tmp_path), native.STAMP))


def test_an_edited_source_removes_the_whole_build_with_a_warning(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, so = _tree(str(tmp_path), "X = 2  # edited after the build\n")
    why = native.drop_stale(str(tmp_path), ("agent.m",))
    assert why == "changed since the build: agent.m"
    assert not os.path.exists(so) and not os.path.exists(os.path.join(str(tmp_path), native.STAMP))
    err = capsys.readouterr().err
    assert "removed the stale compiled modules (changed since the build: agent.m)" in err
    assert "scripts/build_native.py" in err
    assert native.drop_stale(str(tmp_path), ("agent.m",)) == ""  # nothing left to do


def test_a_build_for_another_python_is_removed(tmp_path: pathlib.Path) -> None:
    _, so = _tree(str(tmp_path), "X = 1\n")
    path = os.path.join(str(tmp_path), native.STAMP)
    with open(path) as f:
        stamp = json.load(f)
    stamp["python"] = "3.10.0"
    with open(path, "w") as f:
        json.dump(stamp, f)
    assert "another Python" in native.drop_stale(str(tmp_path), ("agent.m",))
    assert not os.path.exists(so)
