"""Compile the data path's hot modules to C extensions (scripts/setup.sh runs this).

Why: the node proxy's per-request work is Python bytecode (the bench's perf profile: the
interpreter's eval loop was most of the agents' CPU). Compiled, the same source runs with
the same behaviour and less CPU per request; nothing else changes.

Which (agent/native.py): modules without ``async def`` (HTTP/1.1 and HTTP/2 cores, header
work, routing, balancing, metrics, the authorization decider) with mypyc, which uses our
mypy-strict annotations for native attribute access and arithmetic. The request loops, the
tunnel and the relay with Cython (annotations not enforced): mypyc's generated coroutines
have had exception-flow bugs (here: an exception re-raised after it was caught, a retried
request answered with its first try's 503), and the data path's retries, resets and
timeouts are exceptions through awaits; Cython's coroutines follow CPython's.

Where: each ``<module>.cpython-*.so`` lands next to its ``.py`` (Python imports the .so
first), the runtime library as ``agent/native__mypyc*.so``, and ``agent/native.json``
records the sha256 of every compiled source. ``agent/__init__.py`` compares those at import:
a stale build (a source edited since) is removed, with a warning, and the pure-Python
modules run, so an edit is never shadowed by old compiled code.

    .venv/bin/python scripts/build_native.py            # build if any source changed
    .venv/bin/python scripts/build_native.py --clean    # remove the build: pure Python
    NODEMESH_NATIVE=0 scripts/setup.sh                  # setup without building
    build_native.py --root SITE_PACKAGES                # an installed copy (scripts/install.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CHECKOUT)
ROOT = CHECKOUT  # the directory holding the agent package to build in (--root)

from agent.native import CYTHON_MODULES, MODULES, MYPYC_MODULES, STAMP, compiled_files, source_hashes  # noqa: E402


def up_to_date() -> bool:
    try:
        with open(os.path.join(ROOT, STAMP)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    if stamp.get("python") != sys.version or stamp.get("sources") != source_hashes(ROOT):
        return False
    return all(os.path.exists(p) for p in compiled_files(ROOT, stamp))


def clean() -> int:
    try:
        with open(os.path.join(ROOT, STAMP)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        stamp = {}
    for path in [*compiled_files(ROOT, stamp), os.path.join(ROOT, STAMP)]:
        if os.path.exists(path):
            os.remove(path)
    return len(stamp.get("files", []))


def build() -> None:
    from Cython.Build import cythonize  # (the test extra installs both compilers)
    from mypyc.build import mypycify
    from setuptools import Distribution

    def compile_(exts: list[Any], tmp: str) -> None:
        # a Distribution of our own: setuptools would otherwise read pyproject.toml
        dist = Distribution({"name": "nodemesh-native", "ext_modules": exts})
        dist.script_args = ["-q", "build_ext", "--inplace", "-j", str(os.cpu_count() or 1),
                            "--build-temp", os.path.join(tmp, "o"), "--build-lib", os.path.join(tmp, "lib")]
        dist.parse_command_line()
        dist.run_commands()

    def paths(modules: tuple[str, ...]) -> list[str]:
        return [m.replace(".", "/") + ".py" for m in modules]

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="nodemesh-native-") as tmp:
        # built in a copy of the package: mypy must not take an installed copy's
        # site-packages for the source tree (it would type-check every library there)
        stage = os.path.join(tmp, "src")
        shutil.copytree(os.path.join(ROOT, "agent"), os.path.join(stage, "agent"),
                        ignore=shutil.ignore_patterns("*.so", "__pycache__", "native.json"))
        os.chdir(stage)  # the compilers name modules by path from here
        try:
            # (the checkout's mypy settings, also for an installed copy, which has none)
            config = "--config-file=" + os.path.join(CHECKOUT, "pyproject.toml")
            exts = mypycify([config, *paths(MYPYC_MODULES)], opt_level="3",
                            target_dir=os.path.join(tmp, "c"), group_name="agent.native")
            compile_(exts, os.path.join(tmp, "mypyc"))
            directives = {"language_level": 3, "annotation_typing": False, "binding": True}
            compile_(cythonize(paths(CYTHON_MODULES), compiler_directives=directives,
                               build_dir=os.path.join(tmp, "cy"), quiet=True, nthreads=os.cpu_count() or 1),
                     os.path.join(tmp, "cython"))
        finally:
            os.chdir(cwd)
        for dirpath, _dirs, names in os.walk(os.path.join(stage, "agent")):
            for n in names:
                if n.endswith(".so"):
                    rel = os.path.relpath(os.path.join(dirpath, n), stage)
                    shutil.copy2(os.path.join(stage, rel), os.path.join(ROOT, rel))
    files = sorted(os.path.relpath(p, ROOT) for p in _so_files())
    stamp = {
        "python": sys.version,
        "sources": source_hashes(ROOT),
        "files": files,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(ROOT, STAMP), "w") as f:
        json.dump(stamp, f, indent=1)
        f.write("\n")


def _so_files() -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(os.path.join(ROOT, "agent")):
        out += [os.path.join(dirpath, n) for n in names if n.endswith(".so")]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules (pure Python)")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ap.add_argument("--root", default=CHECKOUT, help="directory of the agent package (default: here)")
    a = ap.parse_args()
    global ROOT
    ROOT = os.path.abspath(a.root)
    if not os.path.isfile(os.path.join(ROOT, "agent", "native.py")):
        ap.error(f"--root {a.root}: no agent package there (agent/native.py)")
    if a.clean:
        print(f"build_native: removed {clean()} compiled files")
        return 0
    if not a.force and up_to_date():
        print(f"build_native: {len(MODULES)} modules already compiled")
        return 0
    clean()
    t = time.monotonic()
    try:
        build()
    except BaseException:
        clean()  # never half a build: pure Python instead
        raise
    print(f"build_native: compiled {len(MODULES)} modules in {time.monotonic() - t:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
