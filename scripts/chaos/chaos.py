#!/usr/bin/env python3
"""Chaos under load for `zygote start` (scripts/chaos.sh runs it; standard library only).

    chaos.py --zygote BIN --model DIR --runtime-dir DIR --port P [--workers N]
             [--clients C] [--scale K] [--spawns S] [--json OUT]

Loopback only, and bounded: every wait has a deadline, every fault runs a fixed number of
times, and the service is stopped (then killed) on the way out whatever happened.

What it does, in order:

1. Starts the service and a mixed load of its own (C client threads: keep-alive POST /embed
   of one text, fresh-connection POST /v1/embeddings of four texts, GET /readyz), which
   records the outcome of every request: answered (2xx), an error answer (its status), reset
   (the connection broke or closed without an answer: ECONNRESET, EPIPE, EOF), refused
   (ECONNREFUSED: no listener), timed out.
2. Runs S spawns of the `idle` entry through `zygote spawn` (four at a time: read the pid,
   kill -9 the child, expect the CLI to report the signal), and prints the zygote's and the
   supervisor's open fds and RSS before and after.
3. In turn, each fault K times: kill -9 of a worker, of the owner, of the zygote; SIGHUP (a
   roll); kill -9 of the supervisor followed by a fresh start; SIGTERM (a stop) followed by a
   fresh start. After each fault it waits for the service to be whole again (the time to
   recover), lets the load run 0.5 s more, and counts what the load saw from the fault on.
   Zygote kills are spaced so that each zygote has lived 10.5 s: the supervisor stops a
   service whose zygote died 5 times in a row, each within 10 s of its start (a crash loop).
4. Prints one row per fault kind: failed requests (no 2xx answer), resets, refused
   connections, orphans left, time to recover (median, max); and the fd and RSS figures.

Orphans: processes running the service's binary that the service no longer lists, 2 s after
it recovered (after a supervisor kill or a stop: any process of the old service still alive 5 s
after its supervisor is gone). A worker kill may fail the requests that were in flight on
that worker; "on the killed worker" counts failures on connections whose last answer came
from it.
"""

import argparse
import http.client
import json
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

PID_HEADER = "X-Worker-Pid"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A zygote forks workers that share one copy of the weights.",
    "Sentence embeddings map text to vectors.",
    "Chaos testing kills processes while requests keep coming.",
]
RECOVER_TIMEOUT = 60.0
# Age past which the supervisor no longer counts a zygote's death towards a crash loop (10 s),
# with a margin.
ZYGOTE_SETTLED_MS = 10_500
# Times each fault runs (times --scale), in this order.
DEFAULT_COUNTS = {
    "worker": 10,
    "owner": 5,
    "zygote": 5,
    "roll": 5,
    "supervisor": 3,
    "stop": 5,
}
SETTLE = 0.5


def log(msg):
    print(f"chaos: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the service


class Service:
    """One `zygote start` in its own session, its output in a log file."""

    def __init__(self, args):
        self.args = args
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        cmd = [
            self.args.zygote,
            "start",
            "--model",
            self.args.model,
            "--workers",
            str(self.args.workers),
            "--listen",
            f"127.0.0.1:{self.args.port}",
            "--runtime-dir",
            self.args.runtime_dir,
            "--backend",
            "host",
            "--graceful-timeout",
            "10",
        ]
        path = os.path.join(self.args.log_dir, f"service-{self.starts}.log")
        with open(path, "wb") as logf:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def status(self):
        """The service's status, or None when it does not answer."""
        try:
            out = subprocess.run(
                [
                    self.args.zygote,
                    "status",
                    "--runtime-dir",
                    self.args.runtime_dir,
                    "--json",
                ],
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

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_all(self):
        """Stops the service for good: SIGTERM, then SIGKILL to its whole session."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(20) is None:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def by_role(status, role):
    return [p for p in status.get("processes", []) if p.get("role") == role]


def whole(status, workers):
    """True when the service is whole: zygote running, owner and every worker serving."""
    if status is None:
        return False
    z = by_role(status, "zygote")
    o = by_role(status, "owner")
    w = [p for p in by_role(status, "worker") if p.get("state") == "serving"]
    return (
        len(z) == 1
        and z[0].get("state") == "running"
        and len(o) >= 1
        and all(p.get("state") == "serving" for p in o)
        and len(w) == workers
    )


def whole_status(svc, workers):
    """The service's status if it is whole, else None."""
    s = svc.status()
    return s if whole(s, workers) else None


def wait_until(pred, timeout, step=0.02):
    """Polls `pred` until it returns a true value or `timeout` passes; returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(step)


def service_pids(status):
    return {p["pid"] for p in status.get("processes", [])} if status else set()


def binary_processes(exe):
    """Pids of live processes (not zombies) running the executable `exe`."""
    pids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/exe") != exe:
                continue
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            pids.add(int(name))
    return pids


def port_free(port):
    """True when 127.0.0.1:port can be bound (with SO_REUSEADDR, as the supervisor binds)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return f.read().split()
    except OSError:
        return []


def fds_and_rss(pid):
    """(open fds, RSS in KiB) of a process, or (None, None)."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return fds, rss
    except (OSError, StopIteration):
        return None, None


# ------------------------------------------------------------------ the load


class Load:
    """C client threads over loopback; every request's outcome with its time and connection."""

    def __init__(self, port, clients):
        self.port = port
        self.clients = clients
        self.events = []  # (monotonic time, outcome, pid of the connection's last answer)
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.threads = []

    def start(self):
        for i in range(self.clients):
            t = threading.Thread(target=self.client, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=35)

    def record(self, outcome, last_pid):
        with self.lock:
            self.events.append((time.monotonic(), outcome, last_pid))

    def since(self, t0, t1):
        with self.lock:
            return [e for e in self.events if t0 <= e[0] <= t1]

    def client(self, i):
        rng = random.Random(i)
        conn, last_pid = None, None
        while not self.stop_flag.is_set():
            r = rng.random()
            if r < 0.7:
                method, path, fresh = "POST", "/embed", False
                body = json.dumps({"input": [rng.choice(SENTENCES)]})
            elif r < 0.9:
                method, path, fresh = "POST", "/v1/embeddings", True
                body = json.dumps({"input": rng.sample(SENTENCES, 4), "model": "all-MiniLM-L6-v2"})
            else:
                method, path, fresh, body = "GET", "/readyz", False, None
            if fresh and conn is not None:
                conn.close()
                conn, last_pid = None, None
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                headers = {"Content-Type": "application/json"} if body else {}
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                pid = resp.getheader(PID_HEADER)
                pid = int(pid) if pid and pid.isdigit() else None
                if 200 <= resp.status < 300:
                    outcome = "ok"
                elif path == "/readyz" and resp.status == 503:
                    outcome = "ok"  # a draining worker says so: an answer, not a failure
                else:
                    outcome = f"http_{resp.status}"
                self.record(outcome, last_pid)
                last_pid = pid
                if fresh or resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn, last_pid = None, None
            except ConnectionRefusedError:
                self.record("refused", last_pid)
                conn.close()
                conn, last_pid = None, None
                time.sleep(0.02)  # nothing listens: do not spin
            except (
                ConnectionResetError,
                BrokenPipeError,
                ConnectionAbortedError,
                http.client.RemoteDisconnected,
                http.client.IncompleteRead,
                http.client.BadStatusLine,
            ):
                self.record("reset", last_pid)
                conn.close()
                conn, last_pid = None, None
            except TimeoutError:
                self.record("timeout", last_pid)
                conn.close()
                conn, last_pid = None, None
            except OSError as e:
                self.record(f"error_{e.errno}", last_pid)
                conn.close()
                conn, last_pid = None, None
                time.sleep(0.02)
            time.sleep(0.002)


# ------------------------------------------------------------------ the faults


def kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def run_fault(kind, svc, load, args):
    """Applies one fault, waits for recovery; returns its row (a dict)."""
    if kind == "zygote":
        # The supervisor counts a zygote that lived less than 10 s as a crash, and stops the
        # service after 5 in a row (its crash-loop rule): let each zygote live past that.
        def settled():
            s = whole_status(svc, args.workers)
            return s if s and by_role(s, "zygote")[0]["age_ms"] > ZYGOTE_SETTLED_MS else None

        before = wait_until(settled, ZYGOTE_SETTLED_MS / 1000 + RECOVER_TIMEOUT, 0.2)
    else:
        before = wait_until(lambda: whole_status(svc, args.workers), RECOVER_TIMEOUT)
    if not before:
        raise RuntimeError(f"the service is not whole before a {kind} fault")
    old_pids = service_pids(before)
    victim = None
    t0 = time.monotonic()
    fresh_start = False
    if kind == "worker":
        victim = random.choice(by_role(before, "worker"))["pid"]
        kill(victim)
    elif kind == "owner":
        victim = by_role(before, "owner")[0]["pid"]
        kill(victim)
    elif kind == "zygote":
        victim = by_role(before, "zygote")[0]["pid"]
        kill(victim)
    elif kind == "roll":
        kill(svc.proc.pid, signal.SIGHUP)
    elif kind in ("supervisor", "stop"):
        victim = svc.proc.pid
        kill(victim, signal.SIGKILL if kind == "supervisor" else signal.SIGTERM)
        code = svc.wait_exit(RECOVER_TIMEOUT)
        stopped = time.monotonic() - t0
        # Everything of the old service must end by itself (the lifeline), within 5 s.
        gone = wait_until(lambda: not (binary_processes(args.zygote) & old_pids), 5.0)
        gone_s = time.monotonic() - t0
        orphan_pids = set() if gone else binary_processes(args.zygote) & old_pids
        for p in orphan_pids:  # leave nothing behind for the next round
            kill(p)
        # A zombie leader can still have threads exiting, holding the listener: the fresh
        # start would fail to bind. Wait for the port as its bind will see it.
        row_port = wait_until(lambda: port_free(args.port), 5.0)
        fresh_start = True
        svc.start()
    old_workers = {p["pid"] for p in by_role(before, "worker")}

    def recovered():
        s = svc.status()
        if not whole(s, args.workers):
            return None
        if kind == "worker" and victim in service_pids(s):
            return None
        if kind in ("owner", "zygote") and victim in service_pids(s):
            return None
        if kind == "roll" and old_workers & {p["pid"] for p in by_role(s, "worker")}:
            return None
        return s

    after = wait_until(recovered, RECOVER_TIMEOUT)
    t_rec = time.monotonic() - t0
    if not after:
        raise RuntimeError(
            f"the service did not recover from a {kind} fault in {RECOVER_TIMEOUT:.0f} s"
        )
    time.sleep(SETTLE)
    events = load.since(t0, time.monotonic())
    if not fresh_start:
        # Anything running our binary that the service does not list, given 2 s to go away.
        def strays():
            return binary_processes(args.zygote) - service_pids(svc.status())

        orphan_pids = set() if wait_until(lambda: not strays(), 2.0) else strays()
    row = {
        "fault": kind,
        "requests": len(events),
        "failed": sum(1 for e in events if e[1] not in ("ok", "refused")),
        "refused": sum(1 for e in events if e[1] == "refused"),
        "resets": sum(1 for e in events if e[1] == "reset"),
        "on_victim": sum(
            1 for e in events if e[1] != "ok" and victim is not None and e[2] == victim
        ),
        "outcomes": sorted({e[1] for e in events if e[1] != "ok"}),
        "orphans": len(orphan_pids),
        "recover_s": t_rec,
    }
    if kind in ("supervisor", "stop"):
        row["stop_s"] = stopped
        row["old_service_gone_s"] = gone_s
        row["port_free"] = bool(row_port)
        row["exit"] = code
    return row


def read_line(p, deadline):
    """The next line of `p`'s stdout, or b"" at EOF or when `deadline` passes."""
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
        return b""
    return p.stdout.readline()


def spawn_once(args):
    """One `zygote spawn --entry idle`: read its pid, kill -9 the child, and expect the CLI to
    report the signal (the exit status reaching the requester). True when it did."""
    p = subprocess.Popen(
        [args.zygote, "spawn", "--runtime-dir", args.runtime_dir, "--entry", "idle"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    ok = False
    try:
        line = read_line(p, deadline)
        if line.startswith(b"pid "):
            kill(int(line.split()[1]))
            while line := read_line(p, deadline):
                if line.startswith(b"killed by signal 9"):
                    ok = True
                    break
    finally:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()
    return ok


def spawn_churn(svc, args):
    """S spawns through `zygote spawn`, 4 at a time; fds and RSS before and after."""
    status = svc.status()
    z = by_role(status, "zygote")[0]["pid"]
    sup = svc.proc.pid
    before = {"zygote": fds_and_rss(z), "supervisor": fds_and_rss(sup)}
    t0 = time.monotonic()
    counts = {"done": 0, "failed": 0}
    lock = threading.Lock()

    def spawner():
        while True:
            with lock:
                if counts["done"] >= args.spawns:
                    return
                counts["done"] += 1
                if counts["done"] % 1000 == 0:
                    log(f"{counts['done']} spawns")
            if not spawn_once(args):
                with lock:
                    counts["failed"] += 1

    threads = [threading.Thread(target=spawner) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done, failed = counts["done"], counts["failed"]
    elapsed = time.monotonic() - t0
    # Let the last idle children end and the zygote reap them: it is left with the owner and
    # the workers.
    wait_until(lambda: len(children(z)) <= 1 + args.workers, 10.0, 0.1)
    after = {"zygote": fds_and_rss(z), "supervisor": fds_and_rss(sup)}
    return {
        "spawns": done,
        "failed": failed,
        "seconds": elapsed,
        "zygote_pid": z,
        "supervisor_pid": sup,
        "before": before,
        "after": after,
    }


# ------------------------------------------------------------------ report


def table(rows):
    kinds = []
    for r in rows:
        if r["fault"] not in kinds:
            kinds.append(r["fault"])
    names = {
        "worker": "kill -9 worker",
        "owner": "kill -9 owner",
        "zygote": "kill -9 zygote",
        "roll": "SIGHUP (roll)",
        "supervisor": "kill -9 supervisor, fresh start",
        "stop": "SIGTERM (stop), fresh start",
    }
    out = [
        (
            "| fault | times | requests | failed (max per fault) | on the killed worker"
            " | resets | refused | orphans left | time to recover: median, max |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for k in kinds:
        rs = [r for r in rows if r["fault"] == k]
        rec = [r["recover_s"] for r in rs]
        failed = [r["failed"] for r in rs]
        on_victim = sum(r["on_victim"] for r in rs) if k == "worker" else "-"
        outcomes = sorted({o for r in rs for o in r["outcomes"] if o not in ("reset", "refused")})
        extra = f" ({', '.join(outcomes)})" if outcomes else ""
        out.append(
            f"| {names[k]} | {len(rs)} | {sum(r['requests'] for r in rs)}"
            f" | {sum(failed)} ({max(failed)}){extra}"
            f" | {on_victim} | {sum(r['resets'] for r in rs)} | {sum(r['refused'] for r in rs)}"
            f" | {sum(r['orphans'] for r in rs)}"
            f" | {fmt_s(statistics.median(rec))}, {fmt_s(max(rec))} |"
        )
    ends = [r for r in rows if "stop_s" in r]
    if ends:
        out += [
            "",
            (
                "| fault | supervisor exited: median, max | old service gone: median, max"
                " | exit statuses |"
            ),
            "| --- | --- | --- | --- |",
        ]
        for k in ("supervisor", "stop"):
            rs = [r for r in ends if r["fault"] == k]
            if not rs:
                continue
            st = [r["stop_s"] for r in rs]
            gone = [r["old_service_gone_s"] for r in rs]
            codes = sorted({str(r["exit"]) for r in rs})
            out.append(
                f"| {names[k]} | {fmt_s(statistics.median(st))}, {fmt_s(max(st))}"
                f" | {fmt_s(statistics.median(gone))}, {fmt_s(max(gone))}"
                f" | {', '.join(codes)} |"
            )
    return "\n".join(out)


def fmt_s(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--zygote", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--runtime-dir", required=True)
    ap.add_argument("--log-dir", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument(
        "--scale",
        type=int,
        default=1,
        help="multiplies the number of times each fault runs",
    )
    ap.add_argument("--spawns", type=int, default=10000)
    ap.add_argument(
        "--faults",
        help="instead of the default counts: KIND=N,... (kinds: worker, owner, zygote, "
        "roll, supervisor, stop)",
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    args.zygote = os.path.realpath(args.zygote)
    random.seed(1)

    counts = [(k, n * args.scale) for k, n in DEFAULT_COUNTS.items()]
    if args.faults:
        counts = [(k, int(n)) for k, n in (f.split("=") for f in args.faults.split(","))]
        unknown = [k for k, _ in counts if k not in DEFAULT_COUNTS]
        if unknown:
            ap.error(f"unknown fault {unknown[0]!r} (known: {', '.join(DEFAULT_COUNTS)})")
    svc = Service(args)
    load = Load(args.port, args.clients)
    result = {"workers": args.workers, "clients": args.clients}
    rows = []
    try:
        svc.start()
        if not wait_until(lambda: whole(svc.status(), args.workers), RECOVER_TIMEOUT):
            raise RuntimeError("the service did not start")
        log("service up")
        if args.spawns:
            result["spawn_churn"] = spawn_churn(svc, args)
            log(f"spawn churn: {json.dumps(result['spawn_churn'])}")
        load.start()
        time.sleep(1.0)
        sup = svc.proc.pid
        z = by_role(svc.status(), "zygote")[0]["pid"]
        result["supervisor_before_faults"] = fds_and_rss(sup)
        for kind, n in counts:
            for _ in range(n):
                if kind in ("supervisor", "stop") and "supervisor_after" not in result:
                    result["supervisor_after"] = fds_and_rss(sup)
                row = run_fault(kind, svc, load, args)
                log(json.dumps(row))
                rows.append(row)
        result.setdefault("supervisor_after", fds_and_rss(sup))
        load.stop()
        result["zygote_first_pid"] = z
        result["faults"] = rows
        total = load.since(0, time.monotonic())
        result["load_requests"] = len(total)
        result["load_ok"] = sum(1 for e in total if e[1] == "ok")
    finally:
        load.stop()
        svc.kill_all()
    print(table(rows))
    churn = result.get("spawn_churn")
    if churn:
        print()
        print(
            f"{churn['spawns']} spawns of `idle` via `zygote spawn` in {churn['seconds']:.1f} s, "
            f"{churn['failed']} failed"
        )
        for role in ("zygote", "supervisor"):
            (fb, rb), (fa, ra) = churn["before"][role], churn["after"][role]
            print(f"  {role}: fds {fb} -> {fa}, RSS {rb} -> {ra} KiB")
    sb, sa = (
        result["supervisor_before_faults"],
        result["supervisor_after"],
    )
    print(
        "supervisor across the in-place faults (worker, owner, zygote, roll): "
        f"fds {sb[0]} -> {sa[0]}, RSS {sb[1]} -> {sa[1]} KiB"
    )
    print(f"load: {result['load_requests']} requests, {result['load_ok']} answered")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
