#!/usr/bin/env python3
"""Sum the memory of a service's processes: PSS (and RSS) over process trees.

    scripts/pss.py PID [PID...]            # each PID and all its descendants
    scripts/pss.py --no-tree PID [PID...]  # exactly these PIDs
    scripts/pss.py --json PID              # machine-readable, per process too

PSS (proportional set size) charges each resident page to the processes that
map it in equal shares, so the PSS of all a service's processes adds up to the
memory the service really holds: pages shared by N workers (a shared model
mapping, shared libraries, copy-on-write pages after fork) count once in the
total, not N times as RSS would. Figures come from /proc/PID/smaps_rollup
(Linux >= 4.14); reading another user's processes needs root or ptrace rights.

Standard library only: it runs with any python3.
"""

import argparse
import json
import os
import sys

FIELDS = (
    "Rss",
    "Pss",
    "Pss_Anon",
    "Pss_File",
    "Pss_Shmem",
    "Shared_Clean",
    "Shared_Dirty",
    "Private_Clean",
    "Private_Dirty",
    "Swap",
    "SwapPss",
)


def rollup(pid):
    """The smaps_rollup fields of PID in KiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in FIELDS and parts:
            out[key] = int(parts[0])
    return out


def comm(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        if cmd:
            return cmd[:100]
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def children_map():
    """ppid -> [pid] for every process now alive."""
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may hold spaces and parentheses: fields start after the last ')'.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(roots):
    """The roots and all their descendants, roots first, each once."""
    kids = children_map()
    seen, order, stack = set(), [], list(reversed(roots))
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        order.append(pid)
        stack.extend(sorted(kids.get(pid, []), reverse=True))
    return order


def measure(roots, follow_tree=True):
    pids = tree(roots) if follow_tree else list(dict.fromkeys(roots))
    procs, total, unreadable = [], {k: 0 for k in FIELDS}, []
    for pid in pids:
        try:
            r = rollup(pid)
        except PermissionError:
            unreadable.append(pid)
            continue
        if r is None:
            continue
        procs.append(
            {"pid": pid, "cmd": comm(pid), **{k.lower() + "_kib": r.get(k, 0) for k in FIELDS}}
        )
        for k in FIELDS:
            total[k] += r.get(k, 0)
    if unreadable:
        print(f"pss.py: no permission to read {unreadable}: left out of the total", file=sys.stderr)
    return {
        "processes": procs,
        "count": len(procs),
        "unreadable": unreadable,
        "total": {k.lower() + "_kib": v for k, v in total.items()},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pids", nargs="+", type=int)
    ap.add_argument(
        "--no-tree", action="store_true", help="only the PIDs given, not their descendants"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    m = measure(args.pids, follow_tree=not args.no_tree)
    if not m["processes"]:
        print(f"pss.py: none of {args.pids} is alive", file=sys.stderr)
        return 1
    if args.json:
        json.dump(m, sys.stdout)
        print()
        return 0
    print(f"{'pid':>8} {'pss MiB':>9} {'rss MiB':>9}  command")
    for p in m["processes"]:
        print(f"{p['pid']:>8} {p['pss_kib'] / 1024:9.1f} {p['rss_kib'] / 1024:9.1f}  {p['cmd']}")
    t = m["total"]
    print(
        f"{'total':>8} {t['pss_kib'] / 1024:9.1f} {t['rss_kib'] / 1024:9.1f}  "
        f"({m['count']} processes; PSS anon {t['pss_anon_kib'] / 1024:.1f}, "
        f"file {t['pss_file_kib'] / 1024:.1f}, shmem {t['pss_shmem_kib'] / 1024:.1f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
