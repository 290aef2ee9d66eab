#!/usr/bin/env python3
"""Registry propagation benchmark (not a test): apply on one host -> snapshot on 3 agents.

What it measures: the time from the start of an apply (reading the YAML file,
parsing and validating it, planning against etcd, the one atomic commit) until
the snapshot holding that commit's revision is published on *every* one of
three agents. Each agent is its own process (as on real hosts): a
``Registry(EtcdBackend(url))`` with its own watch stream, reporting over a pipe
the CLOCK_MONOTONIC time (shared by all processes on the host) at which it
published each revision, and its RSS.

The writer is, by default, the library calls ``nodemesh apply -f FILE`` makes
(read file -> ``parse_yaml`` -> ``apply``, with a fresh etcd connection per
apply like the CLI), run in the benchmark process; ``--writer cli`` runs the
real ``nodemesh apply -f FILE --etcd URL`` as a subprocess instead, which adds
the interpreter start, imports and exit (~0.15 s here) to every sample.

For each size (10, 1,000, 10,000 endpoints) it applies a Service plus N
Workloads, every workload with a new address each round (so each round
changes N keys); one untimed warm-up round per size creates the keys first.
Then, separately, "one change at N": a single workload changed in a registry
of N (a health flap or a scale step on a big mesh).

Memory: a fresh agent process per size, RSS after gc on the empty registry vs
after it holds N endpoints (Δ RSS per 1,000 endpoints), plus tracemalloc of
one decoded builder state and snapshot in this process.

etcd is started on 127.0.0.1 with random free ports and a temp data dir and is
killed by PID at the end, like the agents.

    .venv/bin/python scripts/bench_registry.py [--rounds 100] [--sizes 10,1000,10000]
        [--writer library|cli] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchplot  # noqa: E402  (scripts/, this script's own directory)

from agent.control import apply as apply_mod  # noqa: E402
from agent.control.etcd import EtcdBackend  # noqa: E402
from agent.control.registry import Registry  # noqa: E402
from agent.control.snapshot import Snapshot, SnapshotBuilder  # noqa: E402
from agent.control.validate import parse_vip_range, parse_yaml  # noqa: E402
from agent.gcpause import freeze_startup_objects  # noqa: E402
from tests.integration.etcd_fixture import running_etcd  # noqa: E402

NET = parse_vip_range("10.96.0.0/16")
WAIT_S = 60.0


def docs(n: int, generation: int, first: int = 0) -> str:
    out = ["""apiVersion: nodemesh.io/v1
kind: Service
metadata: {name: bench, namespace: bench}
spec:
  selector: {app: bench}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]
"""]
    for i in range(first, n):
        out.append(f"""apiVersion: nodemesh.io/v1
kind: Workload
metadata: {{name: w-{i}, namespace: bench, labels: {{app: bench}}}}
spec: {{address: 10.{generation % 200}.{i // 250}.{2 + i % 250}, node: node{i % 3}}}
""")
    return "---\n".join(out)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


# -- one agent process -----------------------------------------------------------------

def agent_main(url: str) -> int:
    """Run one registry watcher; report every snapshot on stdout; stdin commands."""
    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def report(s: Snapshot) -> None:
        say(f"snap {s.revision} {time.monotonic_ns()} {len(s.workloads)} "
            f"{time.process_time_ns()}")

    reg = Registry(EtcdBackend(url), poll_timeout_s=0.5, on_snapshot=report)
    reg.start()
    deadline = time.monotonic() + 10
    while reg.stale and time.monotonic() < deadline:  # first read done, as at an agent's "ready"
        time.sleep(0.01)
    freeze_startup_objects()
    try:
        for line in sys.stdin:  # the parent closes stdin to stop us
            if line.strip() == "mem":
                gc.collect()
                say(f"mem {rss_kib()} {len(reg.snapshot.workloads)}")
    finally:
        reg.stop()
    return 0


class Agent:
    """The parent's handle on one agent process."""

    def __init__(self, url: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--agent", url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.snaps: list[tuple[int, int]] = []  # (revision, monotonic ns)
        self.cpu: dict[int, int] = {}  # revision -> process CPU ns used so far
        self.mem: list[int] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            f = line.split()
            with self._cond:
                if f[0] == "snap":
                    self.snaps.append((int(f[1]), int(f[2])))
                    self.cpu[int(f[1])] = int(f[4])
                elif f[0] == "mem":
                    self.mem.append(int(f[1]))
                self._cond.notify_all()

    def seen_at(self, revision: int, timeout_s: float = WAIT_S) -> int:
        """Monotonic ns at which this agent first published a revision >= ``revision``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for rev, t in self.snaps:
                    if rev >= revision:
                        return t
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise SystemExit(f"agent {self.proc.pid} did not reach revision {revision}")
                self._cond.wait(min(left, 1.0))

    def cpu_ms(self, revision: int) -> float:
        """Process CPU spent from the snapshot before ``revision`` to the one holding it."""
        with self._cond:
            revs = sorted(self.cpu)
            at = next(r for r in revs if r >= revision)
            before = [r for r in revs if r < at]
            return (self.cpu[at] - self.cpu[before[-1]]) / 1e6 if before else 0.0

    def rss_kib(self, timeout_s: float = 30.0) -> int:
        assert self.proc.stdin is not None
        with self._cond:
            before = len(self.mem)
        self.proc.stdin.write("mem\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.mem) == before:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"agent {self.proc.pid} did not report memory")
                self._cond.wait(left)
            return self.mem[-1]

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def agents(url: str, count: int) -> Iterator[list[Agent]]:
    started: list[Agent] = []
    try:
        for _ in range(count):
            started.append(Agent(url))
        yield started
    finally:
        for a in started:
            a.stop()


# -- the writer ------------------------------------------------------------------------

class Writer:
    def __init__(self, url: str, mode: str, workdir: Path):
        self.url = url
        self.mode = mode
        self.file = workdir / "bench.yaml"
        self.cli = [sys.executable, "-m", "agent.cli.main", "apply", "-f", str(self.file),
                    "--etcd", url, "--output", "json"]

    def apply(self, text: str) -> tuple[int, int, int, int]:
        """Apply ``text``; (t0, t_parsed, t_committed, revision). Times in monotonic ns."""
        self.file.write_text(text)
        if self.mode == "cli":
            t0 = time.monotonic_ns()
            subprocess.run(self.cli, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            t2 = time.monotonic_ns()
            probe = EtcdBackend(self.url)  # the only writer: the current revision is ours
            try:
                rev = probe.read().revision
            finally:
                probe.close()
            return t0, t2, t2, rev
        # what `nodemesh apply -f FILE --etcd URL` runs, minus click and output
        t0 = time.monotonic_ns()
        resources = parse_yaml(self.file.read_text(encoding="utf-8"), str(self.file), NET)
        t1 = time.monotonic_ns()
        backend = EtcdBackend(self.url)
        try:
            plan = apply_mod.apply(backend, resources, NET)
        finally:
            backend.close()
        return t0, t1, time.monotonic_ns(), plan.revision

    def clear(self) -> None:
        b = EtcdBackend(self.url)
        try:
            st = b.read()
            b.commit({}, [k for k in st.items if "/bench/" in k])
        finally:
            b.close()


def measure(writer: Writer, agents_: list[Agent], text: str) -> dict[str, float]:
    t0, t1, t2, rev = writer.apply(text)
    last = max(a.seen_at(rev) for a in agents_)
    cpu = statistics.mean(a.cpu_ms(rev) for a in agents_)
    return {"total": (last - t0) / 1e6, "parse": (t1 - t0) / 1e6,
            "commit": (t2 - t1) / 1e6, "to_agents": (last - t2) / 1e6, "agent_cpu": cpu}


def summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    tot = [s["total"] for s in samples]
    return {
        "rounds": len(samples), "p50_ms": round(statistics.median(tot), 1),
        "p99_ms": round(pct(tot, 99), 1), "max_ms": round(max(tot), 1),
        "parse_validate_p50_ms": round(statistics.median(s["parse"] for s in samples), 1),
        "plan_commit_p50_ms": round(statistics.median(s["commit"] for s in samples), 1),
        "commit_to_last_agent_p50_ms": round(
            statistics.median(s["to_agents"] for s in samples), 1),
        "commit_to_last_agent_p99_ms": round(pct([s["to_agents"] for s in samples], 99), 1),
        "agent_cpu_per_update_p50_ms": round(statistics.median(s["agent_cpu"] for s in samples), 1),
    }


def line(r: dict[str, Any], writer: str) -> str:
    head = f"apply->3 agents p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms"
    if writer == "cli":  # the subprocess hides its phases; it exits after agents have it
        return head + " (a whole `nodemesh apply` process per sample)"
    return (head + f" (parse+validate p50 {r['parse_validate_p50_ms']} ms; plan+commit p50 "
            f"{r['plan_commit_p50_ms']} ms; commit->last agent p50 "
            f"{r['commit_to_last_agent_p50_ms']} p99 {r['commit_to_last_agent_p99_ms']} ms; "
            f"agent CPU per update p50 {r['agent_cpu_per_update_p50_ms']} ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--sizes", default="10,1000,10000")
    ap.add_argument("--writer", choices=("library", "cli"), default="library")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--agent", metavar="URL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.agent:
        return agent_main(a.agent)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the teardowns
    sizes = [int(x) for x in a.sizes.split(",")]
    results: dict[str, Any] = {"writer": a.writer, "cpus": os.cpu_count(),
                               "loadavg_before": os.getloadavg()[0]}
    print(f"writer: {a.writer}; {os.cpu_count()} CPUs shared by etcd, the writer and 3 agents; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with running_etcd() as etcd, tempfile.TemporaryDirectory(prefix="nodemesh-bench-") as tmp, \
            agents(etcd.url, 3) as ags:
        writer = Writer(etcd.url, a.writer, Path(tmp))
        gen = 0
        for n in sizes:
            rounds = a.rounds if n <= 1000 else max(5, a.rounds // 3)
            gen += 1
            measure(writer, ags, docs(n, gen))  # warm-up: creates the keys
            samples = []
            for _ in range(rounds):
                gen += 1
                samples.append(measure(writer, ags, docs(n, gen)))
            r = summary(samples)
            results[f"all_{n}"] = r
            print(f"{n:>6} endpoints, all changed: {line(r, a.writer)}; {rounds} rounds", flush=True)
            # one workload changed in a registry of n
            one = []
            for _ in range(rounds):
                gen += 1
                one.append(measure(writer, ags, docs(1, gen)))
            r = summary(one)
            results[f"one_of_{n}"] = r
            print(f"{n:>6} endpoints, one changed: {line(r, a.writer)}", flush=True)
            writer.clear()
        results["memory"] = memory(etcd.url, writer, [n for n in sizes if n >= 1000])
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
        cases = [k for k in results if k.startswith(("all_", "one_of_"))]
        benchplot.bars(benchplot.png_next_to(a.json), "registry update: apply -> every agent has it", cases,
                       [results[k]["p50_ms"] for k in cases], "ms",
                       second=[results[k]["p99_ms"] for k in cases], legend=("p50", "p99"), rotate=20)
    return 0


def memory(url: str, writer: Writer, sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in sizes:
        with agents(url, 1) as (ag,):
            b = EtcdBackend(url)
            try:
                ag.seen_at(b.read().revision)
            finally:
                b.close()
            before = ag.rss_kib()
            _, _, _, rev = writer.apply(docs(n, 7))
            ag.seen_at(rev)
            after = ag.rss_kib()
            writer.clear()
        per = (after - before) / 1024 / (n / 1000)
        out[f"rss_delta_mib_per_1000_at_{n}"] = round(per, 2)
        print(f"agent RSS at {n} endpoints: {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
              f"{per:.2f} MiB per 1,000 endpoints", flush=True)
    for n in sizes:
        items = {}
        for loc in parse_yaml(docs(n, 1), "m.yaml", NET):
            r = loc.resource
            d = r.to_doc()
            if "vip" in d:
                d["vip"] = "10.96.0.1"
            items[r.key] = json.dumps(d)
        gc.collect()
        tracemalloc.start()
        builder = SnapshotBuilder()
        builder.reset(items)
        snap = builder.build(1)
        cur, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del snap, builder
        per = cur / 1024 / 1024 / (n / 1000)
        out[f"tracemalloc_mib_per_1000_at_{n}"] = round(per, 2)
        print(f"tracemalloc at {n} endpoints: {per:.2f} MiB per 1,000 endpoints "
              "(decoded state + raw values + indexes + one snapshot)", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
