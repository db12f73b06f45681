"""The single-thread forward pass of the Python baselines, and the cosine of services' vectors.

    forward.py speed [--seconds S] [--rounds R] [--forward-bench BIN --model DIR
                     [--host-weights f32,f16,bf16]]
        texts per second of CPU time (the thread's, not the wall clock's, so that a
        shared machine's other work weighs less) of ONNX Runtime
        (scripts/baseline/onnx_encoder.py) and of
        sentence-transformers on torch, one thread each, one text per call, the
        benchmark's sentences (sentences.txt) in turn, tokenisation and pooling included,
        each warmed up over the whole list first. With --forward-bench, every round
        also runs zygote's `forward_bench DIR S mix/1` (the same measure of its encoder)
        once per dot kernel (ZYGOTE_EMBED_DOT_KERNEL: the one chosen at run time, then
        avx2), so all engines share each round's machine load; with --host-weights
        (default f32), once per kernel and form of the host compute copy
        (`forward_bench --host-weights F`: f16 and bf16 keep the matrices in f16 or bf16;
        bf16 runs on AMX where the processor has it, and once more without, ZYGOTE_EMBED_AMX=0).
        Prints JSON
        lines, one per engine, and last a markdown table.
    forward.py cosine --url [NAME=]URL [--url ...]
        POSTs every sentence to each service's /embed and prints, per service, the
        lowest cosine of its vectors to sentence-transformers' (in this process, on
        torch), as JSON lines.
    forward.py cosine --onnx
        the same for ONNX Runtime in this process.

Run with the baseline venv's python (scripts/baseline/setup.sh).
"""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "baseline"))

import numpy as np  # noqa: E402
from export_onnx import default_path  # noqa: E402
from model_dir import model_dir  # noqa: E402


def sentences() -> list[str]:
    lines = (HERE / "sentences.txt").read_text().splitlines()
    return [s for s in lines if s.strip()]


def reference():
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    st = SentenceTransformer(str(model_dir()), device="cpu")
    return st


def onnx_encoder():
    from onnx_encoder import OnnxEncoder

    model = model_dir()
    return OnnxEncoder(model, Path(os.environ.get("BASELINE_ONNX") or default_path(model)), 1)


def rate(encode, texts, seconds):
    """Texts per second of this thread's CPU time (time.thread_time): with one intra-op
    thread both ONNX Runtime and torch compute in the calling thread, and on a shared
    machine the wall clock would also count the time spent waiting for a core."""
    for t in texts:
        encode([t])
    n, start, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < seconds:
        encode([texts[n % len(texts)]])
        n += 1
    return n / (time.thread_time() - cpu)


def forward_bench(binary, model, seconds, kernel, form):
    """zygote's texts per CPU-second; `kernel` is "" (the run-time choice), "avx2", or
    "no-amx" (the AVX-512 kernels where the run-time choice would be AMX)."""
    env = dict(os.environ)
    env.pop("ZYGOTE_EMBED_DOT_KERNEL", None)
    env.pop("ZYGOTE_EMBED_AMX", None)
    if kernel == "no-amx":
        env["ZYGOTE_EMBED_AMX"] = "0"
    elif kernel:
        env["ZYGOTE_EMBED_DOT_KERNEL"] = kernel
    out = subprocess.run(
        [binary, "--host-weights", form, str(model), str(seconds), "mix/1"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120 + 10 * seconds,
    ).stdout
    # "mix  TOKENS  1  SENTENCES/S  MS/CALL  PER-CPU-S": the rate per second of CPU time.
    row = next(line.split() for line in out.splitlines() if line.startswith("mix"))
    return float(row[5])


def cmd_speed(args):
    texts = sentences()
    ort_enc = onnx_encoder()
    st = reference()
    engines = [("onnxruntime", lambda: rate(ort_enc.encode, texts, args.seconds))]
    engines.append(("torch", lambda: rate(st.encode, texts, args.seconds)))
    forms = args.host_weights.split(",")
    if args.forward_bench:
        for form in forms:
            # The f32 form keeps the labels of the runs before the f16 one existed.
            name = "zygote" if form == "f32" else f"zygote, {form} weights"
            kernels = [(f"{name} (run-time choice)", ""), (f"{name} (avx2)", "avx2")]
            if form == "bf16":
                # bf16 weights run on AMX where the processor has it; its AVX-512 fallback too.
                kernels.insert(1, (f"{name} (avx-512, no AMX)", "no-amx"))
            for label, kernel in kernels:
                engines.append(
                    (
                        label,
                        lambda k=kernel, f=form: forward_bench(
                            args.forward_bench, args.model, args.seconds, k, f
                        ),
                    )
                )
    out = {name: [] for name, _ in engines}
    # Every engine once per round, so a change of the machine's load weighs on all alike.
    for _ in range(args.rounds):
        for name, measure in engines:
            out[name].append(measure())
    for name, rates in out.items():
        print(json.dumps({"engine": name, "texts_per_s": [round(x, 1) for x in rates]}))
    base = out["onnxruntime"]
    print(
        "\n| engine (1 thread, one text per call) | texts per CPU-s, per round | × ONNX Runtime |"
    )
    print("| --- | --- | --- |")
    for name, rates in out.items():
        ratios = [a / b for a, b in zip(rates, base, strict=True)]
        print(
            f"| {name} | {' / '.join(f'{x:.1f}' for x in rates)} | "
            f"{min(ratios):.2f}-{max(ratios):.2f} |"
        )


def post(url, text):
    body = json.dumps({"input": [text]}).encode()
    req = urllib.request.Request(
        url.rstrip("/") + "/embed", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return np.array(json.load(resp)["data"][0]["embedding"], dtype=np.float64)


def cmd_cosine(args):
    texts = sentences()
    want = reference().encode(texts).astype(np.float64)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    sources = []
    for spec in args.url:
        name, _, url = spec.rpartition("=")
        sources.append((name or url, lambda t, url=url: post(url, t)))
    if args.onnx:
        enc = onnx_encoder()
        sources.append(("onnxruntime", lambda t: enc.encode([t])[0].astype(np.float64)))
    for name, get in sources:
        worst = 1.0
        for t, w in zip(texts, want, strict=True):
            v = get(t)
            worst = min(worst, float(v @ w / np.linalg.norm(v)))
        print(json.dumps({"source": name, "min_cosine": round(worst, 6), "texts": len(texts)}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--seconds", type=float, default=5.0)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--forward-bench", help="zygote's forward_bench example binary")
    s.add_argument("--model", type=Path, help="the model directory forward_bench loads")
    s.add_argument(
        "--host-weights",
        default="f32",
        help="forms of the host compute copy for forward_bench, comma-separated (f32,f16,bf16)",
    )
    c = sub.add_parser("cosine")
    c.add_argument("--url", action="append", default=[])
    c.add_argument("--onnx", action="store_true")
    args = p.parse_args()
    {"speed": cmd_speed, "cosine": cmd_cosine}[args.cmd](args)


if __name__ == "__main__":
    main()
