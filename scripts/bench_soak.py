#!/usr/bin/env python3
"""Soak benchmark: minutes of mixed load, abnormal endings, floods and an agent restart on
a real three-node mesh; RSS, descriptors, stalls and failed requests over time.

Not a test (not in CI): run by hand, as root, from the repository root:

    .venv/bin/python scripts/bench_soak.py [--minutes 10] [--prefix soak]

The mesh is the chaos suite's (tests/chaos/test_chaos.py: three nodes, real eBPF capture,
real agents, HBONE mTLS, servers in n2-p1/n2-p2/n1-p2). While it runs, in parallel:

* probe: every second one ``curl`` from n1-p1 to the web VIP (node 2), time and result;
* endings: rounds of 20 of each abnormal ending across nodes, back to back: the server
  reads 1,000 bytes and closes (client must see a reset), the server resets after 100 kB
  (reset), the client resets (the stream must end); any other outcome is a failure;
* iperf3 ``-P 4 -t 1`` every 45 s;
* a hostile peer with a valid certificate every 40 s, in turn: rapid reset, PING flood,
  SETTINGS flood, 100 never-read streams (tests/chaos/attacker.py), each for 3 s;
* one restart of the destination agent (node 2, SIGKILL, then started again) at half time.

A sampler reads every agent's RSS and descriptors every 2 s and the counters of its
metrics endpoint. Failures inside the restart window (kill to ready + 5 s) are counted
apart: a killed agent is expected to cost the connections it carried.

Verdict (exit 1 when it fails): no failed probe and no wrong ending outside the restart
window, no probe slower than 1 s (a stall), and after a 20 s rest every agent's RSS within
16 MB and its descriptors within 16 of where it started (node 2: of its restart).

Output: JSON in bench-results/soak-<timestamp>.json, a PNG next to it, a markdown table
(one row per minute) on stdout. Everything the testbed made carries the prefix and is
removed at the end, also on failure or Ctrl-C; processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import benchplot  # noqa: E402  (scripts/, this script's own directory)

from tests.chaos.test_chaos import (  # noqa: E402
    IPERF_VIP,
    RESET_VIP,
    ROUNDS,
    SINK_VIP,
    STREAM_VIP,
    WEB_VIP,
    Chaos,
    chaos_mesh,
)

NODES = ("n1", "n2", "n3")
SLOW_S = 1.0  # a probe slower than this is a stall
ENDINGS = (
    ("early-close", SINK_VIP, 9000, "reset"),
    ("server-reset", RESET_VIP, 9003, "reset"),
    ("client-reset", STREAM_VIP, 9002, "reset-sent"),
)
ATTACKS = ("rapid-reset", "ping-flood", "settings-flood", "never-read")
EVENT_RE = re.compile(r'^nodemesh_tunnel_events_total\{kind="([a-z_]+)"\} ([0-9.e+]+)$', re.M)


@dataclass
class Soak:
    chaos: Chaos
    started: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    quiet: threading.Lock = field(default_factory=threading.Lock)  # no attack during the restart
    lock: threading.Lock = field(default_factory=threading.Lock)
    probes: list[dict[str, Any]] = field(default_factory=list)
    endings: list[dict[str, Any]] = field(default_factory=list)
    iperf: list[dict[str, Any]] = field(default_factory=list)
    attacks: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    restart: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def now(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def add(self, into: list[dict[str, Any]], row: dict[str, Any]) -> None:
        with self.lock:
            into.append({"t": self.now(), **row})

    def in_restart(self, row: dict[str, Any]) -> bool:
        """Whether the work in ``row`` (from ``t0`` to ``t``) overlapped the restart window."""
        r = self.restart
        return "kill" in r and row["t0"] <= r.get("ready", float("inf")) + 5.0 and row["t"] >= r["kill"]

    def every(self, period_s: float, fn: Callable[[], None], first_s: float = 0.0) -> None:
        """Run ``fn`` every ``period_s`` until stopped; an exception is recorded, not fatal."""
        if self.stop.wait(first_s):
            return
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                fn()
            except Exception as e:  # a worker must not end the soak; its failure is data
                with self.lock:
                    self.errors.append(f"{self.now()}: {fn.__name__}: {type(e).__name__}: {e}"[:500])
            self.stop.wait(max(0.0, period_s - (time.monotonic() - t0)))

    # -- workers -------------------------------------------------------------------------

    def probe(self) -> None:
        t = self.now()
        r = self.chaos.exec(
            "n1-p1",
            ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{time_total}",
             f"http://{WEB_VIP}/"],
            timeout_s=15,
        )
        ok = r.returncode == 0
        secs = float(r.stdout) if ok and r.stdout else None
        self.add(self.probes, {"t0": t, "ok": ok, "seconds": secs, "error": "" if ok else r.stderr[-200:]})

    def ending_rounds(self) -> None:
        for kind, vip, port, want in ENDINGS:
            if self.stop.is_set():
                return
            t = self.now()
            r = self.chaos.exec("n1-p1", [sys.executable, "-c", ROUNDS, kind, vip, str(port), "20"],
                                timeout_s=120)
            if r.returncode == 0:
                out = dict(json.loads(r.stdout))
                wrong = sum(v for k, v in out.items() if k != want)
            else:
                out, wrong = {"failed": r.stderr[-200:]}, 20
            self.add(self.endings, {"t0": t, "kind": kind, "outcomes": out, "wrong": wrong})

    def iperf3(self) -> None:
        t = self.now()
        r = self.chaos.exec("n1-p1", ["iperf3", "-c", IPERF_VIP, "-p", "5201", "-P", "4", "-t", "1", "-J"],
                            timeout_s=30)
        got = 0
        if r.returncode == 0:
            with contextlib.suppress(ValueError, KeyError):
                got = int(json.loads(r.stdout)["end"]["sum_received"]["bytes"])
        self.add(self.iperf, {"t0": t, "ok": r.returncode == 0 and got > 0, "bytes": got})

    def attack(self) -> None:
        mode = ATTACKS[len(self.attacks) % len(ATTACKS)]
        c = self.chaos
        common = ["--node-ip", c.node_ip("n2"), "--seconds", "3"]
        args = {
            "rapid-reset": ["--sa", "client", "--dst-sa", "web", "--target", f"{c.pod_ip('n2-p1')}:8080",
                            "--count", "30000"],
            "ping-flood": ["--count", "1000000"],
            "settings-flood": ["--count", "1000000"],
            "never-read": ["--target", f"{c.pod_ip('n2-p2')}:9002", "--count", "100"],
        }[mode]
        with self.quiet:
            t = self.now()
            try:
                out = c.attack(mode, *common, *args, timeout_s=60)
                ok = True
            except (AssertionError, subprocess.TimeoutExpired, ValueError) as e:
                out, ok = {"error": str(e)[-300:]}, False
        self.add(self.attacks, {"t0": t, "mode": mode, "ok": ok, "result": out})

    def sample(self) -> None:
        row: dict[str, Any] = {}
        for n in NODES:
            with contextlib.suppress(KeyError, OSError, AssertionError):
                row[f"rss_mb_{n}"] = round(self.chaos.rss_kb(n) / 1024, 1)
                row[f"fds_{n}"] = self.chaos.fds(n)
            with contextlib.suppress(Exception):
                text = self.chaos.metrics(n)
                row[f"events_{n}"] = {k: float(v) for k, v in EVENT_RE.findall(text)}
                m = re.search(r"^nodemesh_memory_trims_total ([0-9.e+]+)$", text, re.M)
                if m:
                    row[f"trims_{n}"] = float(m.group(1))
        self.add(self.samples, row)

    def restart_n2(self) -> None:
        c = self.chaos
        node = c.topo.node("n2")
        assert node is not None
        with self.quiet:
            self.restart["kill"] = self.now()
            c.bed.agents["n2"].send_signal(signal.SIGKILL)
            c.bed.stop_agent("n2")
            c.bed.start_agent(node)
            self.restart["ready"] = self.now()
            c.base.rss_kb["n2"] = c.rss_kb("n2")
            c.base.fds["n2"] = c.fds("n2")


# -- report ------------------------------------------------------------------------------


def per_minute(s: Soak, minutes: float) -> list[dict[str, Any]]:
    rows = []
    for m in range(int(minutes + 0.999)):
        lo, hi = m * 60.0, (m + 1) * 60.0
        pr = [p for p in s.probes if lo <= p["t0"] < hi]
        lat = [p["seconds"] for p in pr if p["ok"]]
        en = [e for e in s.endings if lo <= e["t0"] < hi]
        sm = [x for x in s.samples if lo <= x["t"] < hi]
        last = sm[-1] if sm else {}
        rows.append({
            "minute": m + 1,
            "rss_mb": {n: last.get(f"rss_mb_{n}") for n in NODES},
            "rss_mb_max": {n: max((x.get(f"rss_mb_{n}", 0) for x in sm), default=None) for n in NODES},
            "fds": {n: last.get(f"fds_{n}") for n in NODES},
            "probes": len(pr),
            "probes_failed": sum(1 for p in pr if not p["ok"]),
            "probe_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "probe_max_ms": round(1000 * max(lat), 1) if lat else None,
            "endings": 20 * len(en),
            "endings_wrong": sum(e["wrong"] for e in en),
            "attacks": [a["mode"] for a in s.attacks if lo <= a["t0"] < hi],
            "restart": "kill" in s.restart and lo <= s.restart["kill"] < hi,
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| min | RSS MB n1 / n2 / n3 (max) | fds n1 / n2 / n3 | probes (failed) | probe p50 / max ms "
        "| endings (wrong) | attacks, restart |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rss = " / ".join(f"{r['rss_mb'][n]:.0f} ({r['rss_mb_max'][n]:.0f})" if r["rss_mb"][n] else "-"
                         for n in NODES)
        fds = " / ".join(str(r["fds"][n]) if r["fds"][n] is not None else "-" for n in NODES)
        what = ", ".join(r["attacks"]) + (", **n2 agent killed and restarted**" if r["restart"] else "")
        out.append(
            f"| {r['minute']} | {rss} | {fds} | {r['probes']} ({r['probes_failed']}) | "
            f"{r['probe_p50_ms']} / {r['probe_max_ms']} | {r['endings']} ({r['endings_wrong']}) | {what} |"
        )
    return "\n".join(out)


def plot(s: Soak, png: str) -> str | None:
    plt = benchplot.pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for n, colour in zip(NODES, ("#37c", "#c52", "#2a7"), strict=True):
        pts = [(x["t"] / 60, x[f"rss_mb_{n}"]) for x in s.samples if f"rss_mb_{n}" in x]
        if pts:
            ax1.plot(*zip(*pts, strict=True), label=f"agent {n}", color=colour)
        pts = [(x["t"] / 60, x[f"fds_{n}"]) for x in s.samples if f"fds_{n}" in x]
        if pts:
            ax2.plot(*zip(*pts, strict=True), label=f"agent {n}", color=colour)
    ok = [(p["t0"] / 60, 1000 * p["seconds"]) for p in s.probes if p["ok"]]
    bad = [p["t0"] / 60 for p in s.probes if not p["ok"]]
    if ok:
        ax3.scatter(*zip(*ok, strict=True), s=6, color="#37c", label="curl probe")
    if bad:
        ax3.scatter(bad, [SLOW_S * 1000] * len(bad), marker="x", color="#c00", label="failed probe")
    for ax in (ax1, ax2, ax3):
        for a in s.attacks:
            ax.axvline(a["t0"] / 60, color="#bbb", lw=0.6)
        if "kill" in s.restart:
            ax.axvspan(s.restart["kill"] / 60, (s.restart.get("ready", s.restart["kill"]) + 5) / 60,
                       color="#fcc", alpha=0.6)
    ax1.set_ylabel("RSS MB")
    ax2.set_ylabel("open fds")
    ax3.set_ylabel("curl ms")
    ax3.set_yscale("log")
    ax3.set_xlabel("minutes (grey: hostile peer; red band: node-2 agent killed and restarted)")
    ax1.legend(loc="upper left")
    ax3.legend(loc="upper left")
    fig.suptitle("nodemesh soak: mixed load, abnormal endings, floods, a restart")
    return benchplot.save(fig, png, dpi=90)


def verdict(s: Soak, settled: dict[str, Any]) -> dict[str, Any]:
    outside = [p for p in s.probes if not s.in_restart(p)]
    failed = [p for p in outside if not p["ok"]]
    slow = [p for p in outside if p["ok"] and p["seconds"] > SLOW_S]
    wrong = [e for e in s.endings if e["wrong"] and not s.in_restart(e)]
    base = s.chaos.base
    grew = {
        n: v for n, v in settled.items()
        if v["rss_kb"] > base.rss_kb[n] + 16_000 or v["fds"] > base.fds[n] + 16
    }
    return {
        "ok": not (failed or slow or wrong or grew),
        "probes_outside_restart": len(outside),
        "probes_failed_outside_restart": len(failed),
        "probes_failed_in_restart": sum(1 for p in s.probes if not p["ok"] and s.in_restart(p)),
        "stalls_over_1s": len(slow),
        "endings": 20 * len(s.endings),
        "endings_wrong_outside_restart": sum(e["wrong"] for e in wrong),
        "endings_wrong_in_restart": sum(e["wrong"] for e in s.endings if s.in_restart(e)),
        "iperf_failed": sum(1 for i in s.iperf if not i["ok"]),
        "attacks_failed": sum(1 for a in s.attacks if not a["ok"]),
        "not_back_to_baseline": grew,
    }


def run(args: argparse.Namespace) -> int:
    prefix = f"{args.prefix}{secrets.token_hex(2)}"
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()  # what the agents run: the tree at the start
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    rev += "+changes" if dirty else ""
    load_before = os.getloadavg()
    with chaos_mesh(prefix) as chaos:
        s = Soak(chaos)
        chaos.base.rss_kb["n3"], chaos.base.fds["n3"] = chaos.rss_kb("n3"), chaos.fds("n3")
        base = {"rss_kb": dict(chaos.base.rss_kb), "fds": dict(chaos.base.fds)}
        total = args.minutes * 60.0
        workers = [
            threading.Thread(target=s.every, args=(1.0, s.probe), daemon=True),
            threading.Thread(target=s.every, args=(0.5, s.ending_rounds), daemon=True),
            threading.Thread(target=s.every, args=(45.0, s.iperf3, 20.0), daemon=True),
            threading.Thread(target=s.every, args=(40.0, s.attack, 10.0), daemon=True),
            threading.Thread(target=s.every, args=(2.0, s.sample), daemon=True),
        ]
        for w in workers:
            w.start()
        try:
            if not s.stop.wait(total / 2):
                try:
                    s.restart_n2()
                except Exception as e:
                    s.errors.append(f"restart failed: {type(e).__name__}: {e}"[:500])
                    raise
            s.stop.wait(max(0.0, total - (time.monotonic() - s.started)))
        finally:
            s.stop.set()
            for w in workers:
                w.join(timeout=150)
        time.sleep(20)  # rest: what the agents give back
        settled = {n: {"rss_kb": chaos.rss_kb(n), "fds": chaos.fds(n)} for n in NODES}
        rows = per_minute(s, args.minutes)
        v = verdict(s, settled)
        logs = {n: len(chaos.bed.log_text(n).splitlines()) for n in NODES}
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        os.makedirs(args.out_dir, exist_ok=True)
        json_path = os.path.join(args.out_dir, f"soak-{stamp}.json")
        png = plot(s, os.path.join(args.out_dir, f"soak-{stamp}.png"))
        doc = {
            "benchmark": "soak",
            "when": stamp,
            "revision": rev,
            "minutes": args.minutes,
            "host": {"cpus": os.cpu_count(), "kernel": os.uname().release},
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "baseline": base,
            "restart": s.restart,
            "settled_after_20s": settled,
            "agent_log_lines": logs,
            "verdict": v,
            "per_minute": rows,
            "probes": s.probes,
            "endings": s.endings,
            "iperf": s.iperf,
            "attacks": s.attacks,
            "samples": s.samples,
            "errors": s.errors,
            "plot": png,
        }
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
    print(f"\n## nodemesh soak, {args.minutes:g} minutes, 3 nodes ({os.cpu_count()} CPUs), revision {rev}\n")
    print(table(rows))
    print(
        f"\nbaseline RSS kB {base['rss_kb']}, fds {base['fds']}; after a 20 s rest: "
        + ", ".join(f"{n} {v2['rss_kb']} kB / {v2['fds']} fds" for n, v2 in settled.items())
    )
    print(f"agent log lines: {logs}; worker errors: {len(s.errors)}")
    print(f"verdict: {json.dumps(v)}")
    print(f"\nJSON: {os.path.relpath(json_path, ROOT)}"
          + (f"; plot: {os.path.relpath(png, ROOT)}" if png else "; no plot (matplotlib not installed)"))
    return 0 if v["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--prefix", default="sk", help="testbed prefix, 1-2 letters (a random suffix is added)")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "bench-results"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_soak: run as root (it builds network namespaces and loads eBPF)", file=sys.stderr)
        return 2
    if not 1 <= args.minutes <= 120:
        print(f"bench_soak: --minutes must be between 1 and 120, got {args.minutes:g}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
