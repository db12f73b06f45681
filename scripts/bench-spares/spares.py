#!/usr/bin/env python3
"""kill -9 of a worker -> first answer of its replacement, without and with warm spares
(scripts/bench-spares.sh runs it; standard library only).

    spares.py --zygote BIN --model DIR --log-dir DIR [--workers N] [--spares K]
              [--kills R] [--clients C] [--backend host|cuda|auto] [--json OUT]

Loopback only, bounded: every wait has a deadline and each service is stopped (then its
session killed) on the way out.

Two services run side by side, `--spares 0` and `--spares K` (the same binary, model,
workers and load), and their kills alternate, so that the machine's other work weighs on both
alike. For each it:

1. starts `zygote start --backend B` (default host) on a free 127.0.0.1 port in a temporary
   runtime directory, and waits until every worker serves (and every spare is ready);
2. runs a load of C client threads (keep-alive POST /embed of one text) and two probe
   threads (fresh-connection GET /healthz in a loop), each answer stamped with the time it
   arrived and its X-Worker-Pid;
3. R times (in turn with the other service): waits for the service to be whole (workers
   serving, spares ready) and 1.5 s more (the spares' refill delay is 1 s), kills worker 0
   with SIGKILL, and measures the time from the kill to the first answer from a pid that was
   not a worker before the kill (the replacement: a fresh worker, or the activated spare),
   and counts the requests that failed until 0.2 s after that answer.

Prints one row per configuration: the kill -> first answer figures (median, min, max, in
ms), the supervisor's own view from its log (death seen -> the replacement's `ready`, or
the spare's activation: when the slot can accept again), the failed requests, the answers
served. Side by side on a small machine the two services do not get equal CPU (a run with
both at `--spares 0` split the answers 1 to 20, either way round), so the answered and failed
counts are not a comparison between them; the kill figures are per kill.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PID_HEADER = "X-Worker-Pid"
TIMEOUT = 60.0
REFILL_MARGIN = 1.5


def log(msg):
    print(f"bench-spares: {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Service:
    """One `zygote start` in its own session and runtime directory."""

    def __init__(self, args, spares, log_dir):
        self.args = args
        self.spares = spares
        self.port = free_port()
        self.runtime_dir = tempfile.mkdtemp(prefix="zygote-spares-rt.")
        os.chmod(self.runtime_dir, 0o700)
        path = os.path.join(log_dir, f"service-spares-{spares}.log")
        self.log_path = path
        cmd = [
            args.zygote,
            "start",
            "--model",
            args.model,
            "--workers",
            str(args.workers),
            "--spares",
            str(spares),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--runtime-dir",
            self.runtime_dir,
            "--backend",
            args.backend,
        ]
        with open(path, "wb") as logf:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def status(self):
        try:
            out = subprocess.run(
                [self.args.zygote, "status", "--runtime-dir", self.runtime_dir, "--json"],
                check=False,
                capture_output=True,
                text=True,
                timeout=5,
            )
        except subprocess.TimeoutExpired:
            return None
        if out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)
        except ValueError:
            return None

    def whole(self):
        """The status when every worker serves and every spare is ready, else None."""
        s = self.status()
        if s is None:
            return None
        procs = s.get("processes", [])
        workers = [p for p in procs if p["role"] == "worker" and p["state"] == "serving"]
        spares = [p for p in procs if p["role"] == "spare" and p["state"] == "ready"]
        starting = [p for p in procs if p["state"] in ("starting", "draining")]
        ok = len(workers) == self.args.workers and len(spares) == self.spares and not starting
        return s if ok else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(pred, timeout, step=0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(step)


class Load:
    """Client threads in a process of their own (so that two loads do not share one GIL);
    every answer is sent back as (arrival time, pid), every failure as None, and kept here.
    The arrival times are CLOCK_MONOTONIC, the same in every process."""

    def __init__(self, port, clients):
        self.port = port
        self.clients = clients
        self.answers = []
        self.failed = 0
        self.lock = threading.Lock()
        ctx = multiprocessing.get_context("fork")
        self.queue = ctx.Queue()
        self.done = ctx.Event()
        self.proc = ctx.Process(target=self.run, daemon=True)
        self.drainer = threading.Thread(target=self.drain, daemon=True)

    def start(self):
        self.proc.start()
        self.drainer.start()

    def stop(self):
        self.done.set()
        self.proc.join(timeout=TIMEOUT)
        if self.proc.is_alive():
            self.proc.kill()
        self.queue.put("end")
        self.drainer.join(timeout=TIMEOUT)

    def run(self):
        """The load process: the client threads, until `done`."""
        threads = [threading.Thread(target=self.embed_client) for _ in range(self.clients)]
        threads += [threading.Thread(target=self.probe) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def drain(self):
        while (item := self.queue.get()) != "end":
            with self.lock:
                if item is None:
                    self.failed += 1
                else:
                    self.answers.append(item)

    def record(self, resp):
        pid = resp.getheader(PID_HEADER)
        resp.read()
        now = time.monotonic()
        ok = resp.status == 200 and pid is not None
        self.queue.put((now, int(pid)) if ok else None)

    def fail(self):
        self.queue.put(None)

    def embed_client(self):
        body = json.dumps({"input": "A zygote forks workers that share one copy of the weights."})
        conn = None
        while not self.done.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
                conn.request("POST", "/embed", body, {"Content-Type": "application/json"})
                self.record(conn.getresponse())
            except (OSError, http.client.HTTPException):
                self.fail()
                if conn is not None:
                    conn.close()
                conn = None

    def probe(self):
        while not self.done.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
                conn.request("GET", "/healthz")
                self.record(conn.getresponse())
                conn.close()
            except (OSError, http.client.HTTPException):
                self.fail()

    def first_answer_after(self, t0, old_pids):
        with self.lock:
            for t, pid in self.answers:
                if t >= t0 and pid not in old_pids:
                    return t
        return None

    def snapshot(self):
        with self.lock:
            return len(self.answers), self.failed


def stamp(line):
    """Seconds since midnight of a log line's `HH:MM:SS.mmm` stamp, or None."""
    try:
        h, m, rest = line.split(" ", 1)[0].split(":")
        return int(h) * 3600 + int(m) * 60 + float(rest)
    except ValueError:
        return None


def supervisor_view(path):
    """From the service log: for each death of worker 0 while serving, the ms until its slot
    could accept again, as the supervisor saw it (a replacement's `ready`, or a spare's
    activation)."""
    out, died = [], None
    with open(path, errors="replace") as f:
        for line in f:
            if "[supervisor" not in line:
                continue
            t = stamp(line)
            if "worker 0 (pid" in line and "died while serving" in line:
                died = t
            elif died is not None and (
                ("] worker 0 (pid" in line and ") ready in " in line)
                or "] worker 0: spare" in line
                and "activated" in line
            ):
                out.append((t - died) * 1000)
                died = None
    return out


def kill_once(svc, load, label):
    """Kills worker 0 of a whole service; the ms to its replacement's first answer, and the
    requests that failed meanwhile."""
    if not wait_until(svc.whole, TIMEOUT):
        raise SystemExit(f"{label}: not whole")
    time.sleep(REFILL_MARGIN)
    s = wait_until(svc.whole, TIMEOUT)
    if not s:
        raise SystemExit(f"{label}: not whole")
    workers = [p for p in s["processes"] if p["role"] == "worker"]
    old = {p["pid"] for p in workers}
    victim = next(p["pid"] for p in workers if p["slot"] == 0)
    _, failed_before = load.snapshot()
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    t1 = wait_until(lambda: load.first_answer_after(t0, old), TIMEOUT, step=0.001)
    if t1 is None:
        raise SystemExit(f"{label}: no answer from a replacement")
    # Let the killed worker's failures reach the clients before counting them.
    time.sleep(0.2)
    _, failed_after = load.snapshot()
    return {"ms": (t1 - t0) * 1000, "failed": failed_after - failed_before}


def measure(args, log_dir):
    """Both services run side by side under their loads, and their kills alternate, so that
    the machine's other work weighs on both alike."""
    configs = [0, args.spares]
    services = [Service(args, k, log_dir) for k in configs]
    loads = []
    figures = {k: [] for k in configs}
    try:
        for svc in services:
            if not wait_until(svc.whole, 120):
                raise SystemExit(f"the service with --spares {svc.spares} did not start")
        loads = [Load(svc.port, args.clients) for svc in services]
        for load in loads:
            load.start()
        for i in range(args.kills):
            # Alternate which goes first.
            order = [0, 1] if i % 2 == 0 else [1, 0]
            for j in order:
                svc, label = services[j], f"--spares {services[j].spares}"
                f = kill_once(svc, loads[j], label)
                figures[svc.spares].append(f)
                log(
                    f"{label}: kill {i + 1}: first answer of the replacement after "
                    f"{f['ms']:.1f} ms, {f['failed']} failed"
                )
    finally:
        for load in loads:
            load.stop()
        for svc in services:
            svc.stop()
    results = []
    for svc, load in zip(services, loads, strict=True):
        answered, failed = load.snapshot()
        results.append(
            {
                "spares": svc.spares,
                "kills": figures[svc.spares],
                "supervisor_ms": supervisor_view(svc.log_path),
                "answered": answered,
                "failed": failed,
            }
        )
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zygote", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--spares", type=int, default=1)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--backend", default="host", choices=["host", "cuda", "auto"])
    ap.add_argument("--json")
    args = ap.parse_args()
    results = measure(args, args.log_dir)
    print(
        f"kill -9 of worker 0 -> first answer of its replacement; {args.workers} workers, "
        f"{args.clients} clients + 2 probes, {args.kills} kills each, {args.backend} backend"
    )
    print(
        f"{'spares':>6} {'median ms':>10} {'min ms':>8} {'max ms':>8} "
        f"{'slot back ms':>13} {'failed':>7} {'answered':>9}"
    )
    for r in results:
        ms = [k["ms"] for k in r["kills"]]
        back = statistics.median(r["supervisor_ms"]) if r["supervisor_ms"] else float("nan")
        print(
            f"{r['spares']:>6} {statistics.median(ms):>10.1f} {min(ms):>8.1f} "
            f"{max(ms):>8.1f} {back:>13.1f} {r['failed']:>7} {r['answered']:>9}"
        )
    print(
        "median/min/max: kill -> first answer from a pid that was no worker before, at the "
        "client; slot back: median of death seen -> replacement ready or spare activated, "
        "from the supervisor's log"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
