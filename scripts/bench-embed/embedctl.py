#!/usr/bin/env python3
"""Measurement steps of scripts/bench-embed.sh (standard library only).

    embedctl.py bodies SENTENCES OUT
    embedctl.py wait-ready --url URL --workers N --since EPOCH --timeout S
                           [--zygote BIN --runtime-dir DIR]
    embedctl.py restart --url URL --trials K --timeout S [--pollers P]
                        (--gunicorn-master PID | --zygote BIN --runtime-dir DIR [--log F])
    embedctl.py merge --service S --workers N [--note T] --rounds R OUT/TAG
    embedctl.py zygote-pids --zygote BIN --runtime-dir DIR
    embedctl.py idle-wait --max S [--threshold CORES]
    embedctl.py cpu-monitor --seconds S PID...
    embedctl.py report RESULTS.jsonl

Every loop here is bounded by a deadline. Results go to stdout as one JSON
object; progress goes to stderr.

How a restarted worker is recognised: both services answer with an
`X-Worker-Pid` header, so "serving again" is the first answer that carries a
pid that was not a worker before the kill (the replacement), seen by P
threads (--pollers, default 2) that POST /embed on fresh connections every
2 ms. bench-embed.sh runs as many as its load has connections (2 per worker):
with fewer, an idle replacement wins each fresh connection only against the
other idle workers, and that accept lottery (not the restart) decides when
it is first seen. For gunicorn the
new pid is also read from the master's children; for zygote from
`zygote status --json` once it answered (to record its slot). A zygote app
without the header falls back to polling the status until the slot's new pid
is in state `serving` (the supervisor marks a worker serving only after its
ready message, when its listener is live).
"""

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

PID_HEADER = "X-Worker-Pid"
PROBE_BODY = json.dumps({"input": ["Hello, world!"]})


def log(msg):
    print(f"embedctl: {msg}", file=sys.stderr, flush=True)


def post_embed(host, port, body=PROBE_BODY, timeout=30.0):
    """One POST /embed on a fresh connection: (status, pid header or None)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/embed", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        pid = resp.getheader(PID_HEADER)
        return resp.status, (int(pid) if pid and pid.isdigit() else None)
    finally:
        conn.close()


def split_url(url):
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host, int(port)


def zygote_status(zbin, rdir):
    out = subprocess.run(
        [zbin, "status", "--runtime-dir", rdir, "--json"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if out.returncode != 0:
        raise RuntimeError(f"zygote status failed ({out.returncode}): {out.stderr.strip()}")
    return json.loads(out.stdout)


def zygote_workers(status):
    return [p for p in status.get("processes", []) if p.get("role") == "worker"]


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(x) for x in f.read().split()}
    except OSError:
        return set()


# ---------------------------------------------------------------- bodies


def cmd_bodies(args):
    with open(args.sentences, encoding="utf-8") as f:
        sentences = [s.rstrip("\n") for s in f if s.strip()]
    with open(args.out, "w", encoding="utf-8") as f:
        for s in sentences:
            f.write(json.dumps({"input": [s]}, ensure_ascii=False) + "\n")
    print(json.dumps({"bodies": len(sentences), "file": args.out}))


# ------------------------------------------------------------ wait-ready


def cmd_wait_ready(args):
    host, port = split_url(args.url)
    deadline = args.since + args.timeout
    seen, first_answer, lock = set(), [None], threading.Lock()
    stop = threading.Event()
    header_seen = [False]

    def prober():
        while not stop.is_set() and time.time() < deadline:
            try:
                status, pid = post_embed(host, port, timeout=max(1.0, deadline - time.time()))
            except OSError:
                time.sleep(0.05)
                continue
            if status != 200:
                time.sleep(0.05)
                continue
            with lock:
                if first_answer[0] is None:
                    first_answer[0] = time.time()
                if pid is not None:
                    header_seen[0] = True
                    seen.add(pid)

    threads = [threading.Thread(target=prober, daemon=True) for _ in range(args.workers)]
    for t in threads:
        t.start()
    ready_at = None
    try:
        while time.time() < deadline:
            with lock:
                have_first = first_answer[0] is not None
                enough_pids = len(seen) >= args.workers
                header = header_seen[0]
            if args.zygote and have_first:
                st = zygote_status(args.zygote, args.runtime_dir)
                serving = [w for w in zygote_workers(st) if w.get("state") == "serving"]
                if len(serving) >= args.workers and (enough_pids or not header):
                    ready_at = time.time()
                    break
            elif not args.zygote and enough_pids:
                ready_at = time.time()
                break
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=35)
    if ready_at is None:
        log(
            f"not ready after {args.timeout} s: {len(seen)} worker pid(s) answered, "
            f"first answer {'yes' if first_answer[0] else 'no'}"
        )
        print(json.dumps({"ready": False}))
        return 1
    print(
        json.dumps(
            {
                "ready": True,
                "first_answer_s": round(first_answer[0] - args.since, 3),
                "all_ready_s": round(ready_at - args.since, 3),
                "pids_answered": sorted(seen),
            }
        )
    )
    return 0


# --------------------------------------------------------------- restart


class AnswerWatch:
    """Pollers that POST /embed on fresh connections and note answering pids."""

    def __init__(self, host, port, threads=2, interval=0.002):
        self.host, self.port, self.interval = host, port, interval
        self.lock = threading.Lock()
        self.first_by_pid = {}
        self.header = False
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stop.is_set():
            try:
                status, pid = post_embed(self.host, self.port, timeout=5)
            except (OSError, http.client.HTTPException):
                # A killed worker's connection: refused, reset, or cut in the middle of an
                # answer (IncompleteRead). The poller goes on.
                status, pid = None, None
            now = time.time()
            if status == 200 and pid is not None:
                with self.lock:
                    self.header = True
                    self.first_by_pid.setdefault(pid, now)
            self.stop.wait(self.interval)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def first_answer(self, pid):
        with self.lock:
            return self.first_by_pid.get(pid)

    def first_answers_except(self, pids):
        """{pid: time of its first answer} for the answering pids not in `pids`."""
        with self.lock:
            return {p: t for p, t in self.first_by_pid.items() if p not in pids}

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)


def restart_gunicorn(args, host, port):
    master = args.gunicorn_master
    old = children(master)
    if not old:
        raise RuntimeError(f"gunicorn master {master} has no workers")
    victim = min(old)
    watch = AnswerWatch(host, port, threads=args.pollers).start()
    try:
        time.sleep(0.2)
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        deadline = t0 + args.timeout
        new_pid, spawned_at = None, None
        while time.time() < deadline:
            if new_pid is None:
                fresh = children(master) - old
                if fresh:
                    new_pid, spawned_at = min(fresh), time.time()
            if new_pid is not None:
                t = watch.first_answer(new_pid)
                if t is not None:
                    return {
                        "victim": victim,
                        "new_pid": new_pid,
                        "respawned_ms": round((spawned_at - t0) * 1000, 1),
                        "serving_ms": round((t - t0) * 1000, 1),
                        "method": "first answer from the new pid",
                    }
            time.sleep(0.005)
        raise RuntimeError(f"worker {victim} not replaced and answering within {args.timeout} s")
    finally:
        watch.close()


READY_LINE = re.compile(
    r"^(\d\d):(\d\d):(\d\d\.\d+) .*\[supervisor \d+\] "
    r"worker \d+ \(pid (\d+)\) ready in "
)


def ready_in_log(path, pid, t0, wait=1.0):
    """Milliseconds from `t0` (epoch seconds) to the supervisor's log line saying that worker
    `pid` is ready (its listener live, its ready message received), or None. The log's times
    are UTC times of day to the millisecond."""
    deadline = time.time() + wait
    while True:
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    m = READY_LINE.match(line)
                    if m and int(m.group(4)) == pid:
                        tod = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
                        ms = (tod - t0 % 86400) * 1000
                        if ms < -43_200_000:  # the day turned between the kill and the line
                            ms += 86_400_000
                        return round(ms, 1)
        except OSError:
            return None
        if time.time() >= deadline:
            return None
        time.sleep(0.02)


def wait_spare_ready(args, timeout=30.0):
    """With warm spares (`zygote start --spares K`), waits until one is ready, so that every
    trial's kill finds the pool refilled after the previous trial's activation (the refill
    starts a second after it). Returns the seconds waited, or None without spares."""
    deadline = time.time() + timeout
    t0 = time.time()
    while True:
        st = zygote_status(args.zygote, args.runtime_dir)
        spares = [p for p in st.get("processes", []) if p.get("role") == "spare"]
        if not spares:
            return None
        if any(p.get("state") == "ready" for p in spares):
            return round(time.time() - t0, 2)
        if time.time() >= deadline:
            raise RuntimeError(f"no spare ready within {timeout} s")
        time.sleep(0.05)


def restart_zygote(args, host, port):
    spare_wait = wait_spare_ready(args)
    st = zygote_status(args.zygote, args.runtime_dir)
    workers = zygote_workers(st)
    serving = sorted(
        (w for w in workers if w.get("state") == "serving"),
        key=lambda w: w.get("slot") if w.get("slot") is not None else 1 << 30,
    )
    if not serving:
        raise RuntimeError("no worker in state serving")
    victim = serving[0]
    slot, vpid = victim.get("slot"), victim["pid"]
    known = {w["pid"] for w in workers}
    watch = AnswerWatch(host, port, threads=args.pollers).start()
    try:
        time.sleep(0.2)
        header = watch.header
        t0 = time.time()
        os.kill(vpid, signal.SIGKILL)
        deadline = t0 + args.timeout
        if header:
            # The answers name their worker: the first answer from a pid that was not a worker
            # before the kill is the replacement serving. Nothing else runs meanwhile (polling
            # `zygote status` would start a process every few ms beside the restarting worker).
            while time.time() < deadline:
                fresh = watch.first_answers_except(known)
                if fresh:
                    new_pid, answered = min(fresh.items(), key=lambda kv: kv[1])
                    st = zygote_status(args.zygote, args.runtime_dir)
                    w = next((w for w in zygote_workers(st) if w["pid"] == new_pid), {})
                    trial = {
                        "victim": vpid,
                        "slot": slot,
                        "new_pid": new_pid,
                        "new_slot": w.get("slot"),
                        "killed_at": round(t0, 3),
                        "serving_ms": round((answered - t0) * 1000, 1),
                        "method": "first answer from the new pid",
                    }
                    if spare_wait is not None:
                        trial["spare_wait_s"] = spare_wait
                    if args.log:
                        trial["ready_ms"] = ready_in_log(args.log, new_pid, t0)
                    return trial
                time.sleep(0.002)
            raise RuntimeError(
                f"no answer from a new worker within {args.timeout} s after killing pid {vpid}"
            )
        # No pid header: the new pid in the victim's slot turning "serving" in `zygote status`.
        while time.time() < deadline:
            asked = time.time()
            for w in zygote_workers(zygote_status(args.zygote, args.runtime_dir)):
                if w.get("slot") == slot and w["pid"] != vpid and w.get("state") == "serving":
                    serving_at = time.time()
                    return {
                        "victim": vpid,
                        "slot": slot,
                        "new_pid": w["pid"],
                        "serving_ms": round((serving_at - t0) * 1000, 1),
                        # the worker turned serving at most this long before
                        "status_call_ms": round((serving_at - asked) * 1000, 1),
                        "method": "zygote status: new pid in state serving",
                    }
            time.sleep(0.002)
        raise RuntimeError(
            f"worker slot {slot} (pid {vpid}) not serving again within {args.timeout} s"
        )
    finally:
        watch.close()


def cmd_restart(args):
    host, port = split_url(args.url)
    trials = []
    for i in range(args.trials):
        if args.gunicorn_master:
            r = restart_gunicorn(args, host, port)
        else:
            r = restart_zygote(args, host, port)
        log(f"restart trial {i + 1}/{args.trials}: {r}")
        trials.append(r)
        time.sleep(args.pause)
    ms = [t["serving_ms"] for t in trials]
    summary = {
        "trials": trials,
        "median_ms": statistics.median(ms),
        "max_ms": max(ms),
        "method": trials[0]["method"],
    }
    ready = [t["ready_ms"] for t in trials if t.get("ready_ms") is not None]
    if ready:
        summary["ready_median_ms"] = statistics.median(ready)
        summary["ready_max_ms"] = max(ready)
    print(json.dumps(summary))
    return 0


def cmd_zygote_pids(args):
    st = zygote_status(args.zygote, args.runtime_dir)
    print(" ".join(str(p["pid"]) for p in st.get("processes", []) if p.get("pid")))
    return 0


# ------------------------------------------------------------ CPU share

HZ = os.sysconf("SC_CLK_TCK")


def busy_ticks():
    """Busy jiffies of all CPUs together (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)


def proc_ticks(pid):
    """utime + stime of PID in jiffies and its comm, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12]), comm


def descendants(roots):
    kids = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            kids.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(name))
    out, stack = set(), list(roots)
    while stack:
        p = stack.pop()
        if p not in out:
            out.add(p)
            stack.extend(kids.get(p, []))
    return out


def cmd_idle_wait(args):
    """Wait (bounded) until the machine is nearly idle: other sessions' builds
    or benchmarks on a 2-core machine would distort every figure."""
    deadline = time.time() + args.max
    while True:
        b0 = busy_ticks()
        time.sleep(1.0)
        cores = (busy_ticks() - b0) / HZ
        if cores <= args.threshold or time.time() >= deadline:
            break
    print(json.dumps({"idle": cores <= args.threshold, "busy_cores": round(cores, 2)}))
    return 0


def cmd_cpu_monitor(args):
    """CPU used during a window, split into the service's process tree, wrk
    and everything else (other work on the machine that competed with it)."""
    start_busy, t0 = busy_ticks(), time.time()
    first, last = {}, {}

    def sample():
        svc = descendants(args.pids)
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            r = proc_ticks(pid)
            if r is None:
                continue
            ticks, comm = r
            kind = "service" if pid in svc else "wrk" if comm == "wrk" else None
            if kind:
                first.setdefault(pid, (ticks, kind))
                last[pid] = (ticks, kind)

    deadline = t0 + args.seconds
    sample()
    while time.time() < deadline:
        time.sleep(min(0.25, max(0.0, deadline - time.time())))
        sample()
    secs = time.time() - t0
    total = (busy_ticks() - start_busy) / HZ
    used = {"service": 0.0, "wrk": 0.0}
    for pid, (ticks, kind) in last.items():
        used[kind] += (ticks - first[pid][0]) / HZ
    me = os.times()
    own = me.user + me.system
    other = max(0.0, total - used["service"] - used["wrk"] - own)
    print(
        json.dumps(
            {
                "seconds": round(secs, 2),
                "busy_cores": round(total / secs, 2),
                "service_cores": round(used["service"] / secs, 2),
                "wrk_cores": round(used["wrk"] / secs, 2),
                "other_cores": round(other / secs, 2),
            }
        )
    )
    return 0


# ---------------------------------------------------------------- report


def fmt_ms(us):
    return f"{us / 1000:.1f}"


def read_wrk(path):
    """The WRKJSON summary line embed.lua prints, or {}."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("WRKJSON "):
                    return json.loads(line[8:])
    except (OSError, ValueError):
        pass
    return {}


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


WRK_ERRORS = ("err_connect", "err_read", "err_write", "err_status", "err_timeout")


def cmd_merge(args):
    """One results line for a service: its rounds of load merged (requests and time summed,
    the median of the rounds' p50, the highest p99, CPU averaged over the measured time), with
    its PSS, restart and start-up figures."""
    base = args.base
    rounds, cpus = [], []
    for r in range(1, args.rounds + 1):
        w = read_wrk(f"{base}.wrk.{r}.txt")
        if w and w.get("duration_us"):
            rounds.append(w)
        c = load_json(f"{base}.cpu.{r}.json")
        if c:
            cpus.append(c)
    wrk = {}
    if rounds:
        wrk = {
            "requests": sum(w["requests"] for w in rounds),
            "duration_us": sum(w["duration_us"] for w in rounds),
            "p50_us": statistics.median(w["p50_us"] for w in rounds),
            "p99_us": max(w["p99_us"] for w in rounds),
            "max_us": max(w["max_us"] for w in rounds),
        }
        for k in WRK_ERRORS:
            wrk[k] = sum(w.get(k, 0) for w in rounds)
    cpu = {}
    secs = sum(c["seconds"] for c in cpus)
    if secs > 0:
        cpu = {"seconds": round(secs, 2)}
        for k in ("busy_cores", "service_cores", "wrk_cores", "other_cores"):
            cpu[k] = round(sum(c[k] * c["seconds"] for c in cpus) / secs, 2)
    print(
        json.dumps(
            {
                "service": args.service,
                "workers": args.workers,
                "note": args.note,
                "wrk": wrk,
                "rounds": [
                    {
                        "rps": round(w["requests"] / (w["duration_us"] / 1e6), 1),
                        "p50_us": w["p50_us"],
                        "p99_us": w["p99_us"],
                    }
                    for w in rounds
                ],
                "pss": load_json(base + ".pss.json"),
                "restart": load_json(base + ".restart.json"),
                "ready": load_json(base + ".ready.json"),
                "cpu": cpu,
            }
        )
    )
    return 0


def cmd_report(args):
    rows = []
    with open(args.results) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    out = [
        "| service | workers | req/s (rounds: lowest-highest) | p50 ms | p99 ms | errors "
        "| total PSS MiB | processes "
        "| kill → first answer of the replacement (median, max) | start → all workers answering "
        "| CPU cores: service / wrk / other |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in rows:
        w = r.get("wrk") or {}
        if w:
            errs = sum(w.get(k, 0) for k in WRK_ERRORS)
            rps = w["requests"] / (w["duration_us"] / 1e6)
            spread = [x["rps"] for x in r.get("rounds") or []]
            rps_cell = f"{rps:.1f}"
            if len(spread) > 1:
                rps_cell += f" ({min(spread):.0f}-{max(spread):.0f})"
            perf = f"{rps_cell} | {fmt_ms(w['p50_us'])} | {fmt_ms(w['p99_us'])} | {errs}"
        else:
            perf = "– | – | – | –"
        p = r.get("pss") or {}
        pss = f"{p['total']['pss_kib'] / 1024:.0f} | {p['count']}" if p else "– | –"
        rs = r.get("restart") or {}
        if rs:
            unit = "ms" if rs["max_ms"] < 2000 else "s"
            scale = 1 if unit == "ms" else 1000
            rst = (
                f"{rs['median_ms'] / scale:.{1 if unit == 's' else 0}f} {unit}, "
                f"{rs['max_ms'] / scale:.{1 if unit == 's' else 0}f} {unit} "
                f"({len(rs['trials'])} kills)"
            )
            if rs.get("ready_max_ms") is not None:
                rst += f"; ready {rs['ready_median_ms']:.0f} ms, {rs['ready_max_ms']:.0f} ms"
        else:
            rst = "–"
        rd = r.get("ready") or {}
        ready = f"{rd['all_ready_s']:.1f} s" if rd.get("ready") else "–"
        c = r.get("cpu") or {}
        cpu = (
            f"{c['service_cores']:.2f} / {c['wrk_cores']:.2f} / {c['other_cores']:.2f}"
            if c
            else "–"
        )
        note = f" ({r['note']})" if r.get("note") else ""
        out.append(
            f"| {r['service']}{note} | {r['workers']} | {perf} | {pss} | {rst} | {ready} | {cpu} |"
        )

    # Against the target: each zygote service (one per --host-weights form) against the
    # baselines at the same worker count.
    lines = []
    for n in sorted({r["workers"] for r in rows}):
        zs = [r for r in rows if r["workers"] == n and r["service"] == "zygote"]
        py = [r for r in rows if r["workers"] == n and r["service"] == "python"]
        if not py:
            continue
        for z in zs:
            parts = against(z, py)
            if parts:
                note = f" ({z['note']})" if z.get("note") else ""
                lines.append(f"- {n} workers{note}: " + "; ".join(parts))
    if lines:
        out += ["", "zygote against the Python baseline:"] + lines
    print("\n".join(out))
    return 0


def rps(r):
    """A results line's requests per second over its measured rounds (None without wrk)."""
    w = r.get("wrk") or {}
    return w["requests"] / (w["duration_us"] / 1e6) if w else None


def per_core_ok(r):
    return bool(rps(r)) and (r.get("cpu") or {}).get("service_cores", 0) > 0


def against(z, py):
    """What the report says of one zygote service against the baselines of its worker count:
    compared with the best baseline variant (highest req/s, lowest PSS, fastest restart)."""
    parts = []
    best_rps = max((rps(r) for r in py if rps(r)), default=None)
    if rps(z) and best_rps:
        parts.append(
            f"throughput {rps(z) / best_rps:.2f}x the best baseline ({best_rps:.1f} req/s)"
        )
    # Per core of the service's own CPU: on a busy machine the services get unequal
    # shares of the cores (the CPU column), and this ratio leaves that out.
    per_core = [(rps(r) / r["cpu"]["service_cores"], r) for r in py if per_core_ok(r)]
    if per_core_ok(z) and per_core:
        best_pc = max(x for x, _ in per_core)
        z_pc = rps(z) / z["cpu"]["service_cores"]
        parts.append(
            f"per core of its own CPU {z_pc / best_pc:.2f}x "
            f"({z_pc:.1f} against {best_pc:.1f} req per service CPU-s)"
        )
    best_pss = min((r["pss"]["total"]["pss_kib"] for r in py if r.get("pss")), default=None)
    if z.get("pss") and best_pss:
        parts.append(
            f"PSS {z['pss']['total']['pss_kib'] / best_pss:.3f} of the smallest baseline "
            f"(1/{best_pss / z['pss']['total']['pss_kib']:.1f})"
        )
    best_rs = min((r["restart"]["median_ms"] for r in py if r.get("restart")), default=None)
    if z.get("restart") and best_rs:
        parts.append(f"restart {z['restart']['median_ms']:.0f} ms vs {best_rs / 1000:.1f} s")
    return parts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bodies")
    b.add_argument("sentences")
    b.add_argument("out")
    b.set_defaults(fn=cmd_bodies)

    w = sub.add_parser("wait-ready")
    w.add_argument("--url", required=True)
    w.add_argument("--workers", type=int, required=True)
    w.add_argument("--since", type=float, required=True, help="start time, seconds since the epoch")
    w.add_argument("--timeout", type=float, default=180)
    w.add_argument("--zygote")
    w.add_argument("--runtime-dir")
    w.set_defaults(fn=cmd_wait_ready)

    mg = sub.add_parser("merge")
    mg.add_argument("--service", required=True)
    mg.add_argument("--workers", type=int, required=True)
    mg.add_argument("--note", default="")
    mg.add_argument("--rounds", type=int, required=True)
    mg.add_argument("base", help="path prefix of the service's files (OUT/TAG)")
    mg.set_defaults(fn=cmd_merge)

    r = sub.add_parser("restart")
    r.add_argument("--url", required=True)
    r.add_argument("--trials", type=int, default=3)
    r.add_argument("--timeout", type=float, default=120, help="per kill")
    r.add_argument("--pause", type=float, default=1.0, help="seconds between kills")
    r.add_argument(
        "--pollers",
        type=int,
        default=2,
        help="threads posting on fresh connections during each kill",
    )
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--gunicorn-master", type=int)
    g.add_argument("--zygote")
    r.add_argument("--runtime-dir")
    r.add_argument(
        "--log",
        help="the service's log (zygote: also report kill -> ready from the supervisor's lines)",
    )
    r.set_defaults(fn=cmd_restart)

    z = sub.add_parser("zygote-pids")
    z.add_argument("--zygote", required=True)
    z.add_argument("--runtime-dir", required=True)
    z.set_defaults(fn=cmd_zygote_pids)

    iw = sub.add_parser("idle-wait")
    iw.add_argument("--max", type=float, default=60, help="seconds to wait at most")
    iw.add_argument("--threshold", type=float, default=0.15, help="busy CPU cores")
    iw.set_defaults(fn=cmd_idle_wait)

    cm = sub.add_parser("cpu-monitor")
    cm.add_argument("--seconds", type=float, required=True)
    cm.add_argument("pids", nargs="+", type=int)
    cm.set_defaults(fn=cmd_cpu_monitor)

    rep = sub.add_parser("report")
    rep.add_argument("results")
    rep.set_defaults(fn=cmd_report)

    args = ap.parse_args()
    try:
        return args.fn(args)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        log(f"{args.cmd}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
