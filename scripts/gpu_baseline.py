#!/usr/bin/env python3
"""The anchor of the GPU check: N processes that each load the model onto the GPU themselves.

This is what a pre-forking server without the zygote does today (every worker loads its own
copy). Each process initialises CUDA through torch, reads the safetensors file, copies every
tensor to the device (widened to f32 like the zygote's CUDA backend, unless --native), and
reports how long that took; the parent reads the device's memory use with nvidia-smi once all
of them hold their copy, prints one JSON object, and ends them.

    python3 scripts/gpu_baseline.py --model PATH [--procs N] [--device D] [--native]
"""

import argparse
import json
import mmap
import os
import struct
import subprocess
import sys
import time


def vram_used_mib(device):
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            "-i",
            str(device),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip().splitlines()[0])


def per_process_mib(device):
    """pid -> MiB from nvidia-smi (empty inside PID namespaces that hide the pids)."""
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
            "-i",
            str(device),
        ],
        capture_output=True,
        text=True,
    ).stdout
    result = {}
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            result[int(parts[0])] = int(parts[1])
    return result


def child(model, device, native):
    import torch

    dtypes = {
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F64": torch.float64,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    t0 = time.perf_counter()
    dev = torch.device(f"cuda:{device}")
    torch.zeros(1, device=dev)  # the context
    t_ctx = time.perf_counter()
    weights = {}
    with open(model, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + n])
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = dtypes[info["dtype"]]
            start, end = info["data_offsets"]
            count = (end - start) // torch.empty((), dtype=dt).element_size()
            t = torch.frombuffer(mm, dtype=dt, count=count, offset=base + start)
            t = t.reshape(info["shape"]).to(dev, non_blocking=False)
            if not native and dt in (torch.float16, torch.bfloat16):
                t = t.float()
            weights[name] = t
        torch.cuda.synchronize(dev)
    t_end = time.perf_counter()
    allocated = torch.cuda.memory_allocated(dev)
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "load_ms": (t_end - t0) * 1e3,
                "context_ms": (t_ctx - t0) * 1e3,
                "allocated_mib": allocated / 2**20,
            }
        ),
        flush=True,
    )
    sys.stdin.read()  # hold the copy until the parent closes our stdin
    return 0


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--native", action="store_true", help="keep f16/bf16 as they are")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.model, a.device, a.native)
    try:
        import torch  # noqa: F401  (only to fail early with a clear message)
    except ImportError:
        print(json.dumps({"error": "torch is not installed"}))
        return 2
    before = vram_used_mib(a.device)
    procs = []
    started = time.perf_counter()
    for _ in range(a.procs):
        cmd = [sys.executable, __file__, "--child", "--model", a.model, "--device", str(a.device)]
        if a.native:
            cmd.append("--native")
        procs.append(
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    reports = []
    try:
        for pr in procs:
            line = pr.stdout.readline()
            if not line:
                raise RuntimeError(f"a loader (pid {pr.pid}) ended without reporting")
            reports.append(json.loads(line))
        all_ready_ms = (time.perf_counter() - started) * 1e3
        time.sleep(1.0)  # let nvidia-smi catch up
        after = vram_used_mib(a.device)
        per_pid = per_process_mib(a.device)
    finally:
        for pr in procs:
            try:
                pr.stdin.close()
            except OSError:
                pass
        for pr in procs:
            try:
                pr.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pr.kill()
    loads = sorted(r["load_ms"] for r in reports)
    print(
        json.dumps(
            {
                "procs": a.procs,
                "dtype": "native" if a.native else "f32",
                "vram_before_mib": before,
                "vram_after_mib": after,
                "vram_delta_mib": after - before,
                "per_process_mib": [per_pid.get(r["pid"]) for r in reports],
                "load_ms_p50": loads[len(loads) // 2],
                "load_ms": [round(x, 1) for x in loads],
                "context_ms": [round(r["context_ms"], 1) for r in reports],
                "allocated_mib": [round(r["allocated_mib"], 1) for r in reports],
                "all_ready_ms": round(all_ready_ms, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
