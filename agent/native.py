"""Which modules scripts/build_native.py compiles (mypyc, Cython), and the guard against a stale build.

How this works: the build records the sha256 of every compiled source in ``agent/native.json``.
:func:`drop_stale` (run by ``agent/__init__.py``, before any of these modules is imported)
hashes the sources again; if one changed, the whole build is removed (its modules call each
other's compiled code, so half a build would mix old and new) and the pure-Python modules
load instead, with a warning saying how to rebuild. Without ``native.json`` nothing is
compiled and nothing is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

STAMP = os.path.join("agent", "native.json")

# compiled with mypyc (typed, fastest): synchronous modules only (scripts/build_native.py says why)
MYPYC_MODULES: tuple[str, ...] = (
    "agent.proto.http1",
    "agent.proto.hbone",
    "agent.proto.h2.connection",
    "agent.proto.h2.frames",
    "agent.proto.h2.hpack_out",
    "agent.proto.h2.limits",
    "agent.dataplane.http.headers",
    "agent.dataplane.http.accesslog",
    "agent.dataplane.http.hashing",
    "agent.dataplane.http.normalize",
    "agent.dataplane.http.outlier",
    "agent.dataplane.http.retry",
    "agent.dataplane.http.routing",
    "agent.dataplane.report",
    "agent.dataplane.lb",
    "agent.dataplane.gatewayplan",
    "agent.metrics.istio",
    "agent.control.authz_decider",
)
# compiled with Cython (CPython's own semantics, annotations not enforced): the request loops,
# the tunnel and the relay, whose retries, resets and timeouts are exceptions through awaits
CYTHON_MODULES: tuple[str, ...] = (
    "agent.dataplane.http.h1",
    "agent.dataplane.http.h2",
    "agent.dataplane.http.h2session",
    "agent.dataplane.http.upstream",
    "agent.dataplane.tunnel",
    "agent.dataplane.tcp",
    "agent.dataplane.outbound",
    "agent.dataplane.inbound",
    "agent.dataplane.authorize",
    "agent.dataplane.protocol",
)
MODULES = MYPYC_MODULES + CYTHON_MODULES


def source_hashes(root: str, modules: tuple[str, ...] = MODULES) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in modules:
        path = os.path.join(root, *m.split(".")) + ".py"
        try:
            with open(path, "rb") as f:
                out[m] = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            out[m] = ""
    return out


def compiled_files(root: str, stamp: dict[str, object]) -> list[str]:
    files = stamp.get("files", [])
    return [os.path.join(root, str(p)) for p in files] if isinstance(files, list) else []


def drop_stale(root: str, modules: tuple[str, ...] = MODULES) -> str:
    """Remove a build whose sources changed since; returns why ("" when nothing was done)."""
    path = os.path.join(root, STAMP)
    try:
        with open(path) as f:
            stamp = json.load(f)
    except FileNotFoundError:
        return ""
    except (OSError, ValueError) as e:
        stamp, why = {}, f"{path} is unreadable ({e})"
    else:
        recorded = stamp.get("sources") if isinstance(stamp, dict) else None
        current = source_hashes(root, modules)
        if recorded == current and stamp.get("python") == sys.version:
            return ""
        if stamp.get("python") != sys.version:
            why = f"it was built for another Python ({stamp.get('python')!r})"
        else:
            old = recorded if isinstance(recorded, dict) else {}
            changed = sorted(m for m in current if old.get(m) != current[m])
            why = "changed since the build: " + ", ".join(changed)
    for p in [*compiled_files(root, stamp if isinstance(stamp, dict) else {}), path]:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ImportError(
                f"nodemesh: the compiled modules are stale ({why}) and {p} cannot be removed ({e}): "
                "run scripts/build_native.py (or --clean)"
            ) from e
    print(
        f"nodemesh: removed the stale compiled modules ({why}); running pure Python until "
        "scripts/build_native.py runs again",
        file=sys.stderr,
    )
    return why


def loaded() -> dict[str, bool]:
    """Module -> whether its compiled version is the one imported (status, tests)."""
    out: dict[str, bool] = {}
    for m in MODULES:
        mod = sys.modules.get(m)
        out[m] = bool(mod is not None and str(getattr(mod, "__file__", "")).endswith(".so"))
    return out
