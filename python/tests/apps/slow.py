"""A test app (Flask): slow and busy requests, what the worker sees of the weights, and
whether it ran its warmup (a spare does, a worker started into its slot does not)."""

import os
import sys
import time

from flask import Flask, request

import zygote

app = Flask(__name__)
seen: dict[str, object] = {}


@zygote.post_fork
def remember() -> None:
    w = zygote.weights()
    seen["tensors"] = len(w)
    seen["generation"] = w.generation
    # Right after the fork: what the template had imported (the server's modules, if any).
    seen["modules_at_fork"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("uvicorn", "a2wsgi")
    )
    seen["warmed"] = False


@zygote.warmup
def warm() -> None:
    # Runs after post_fork in a warm spare only.
    seen["warmed"] = True


@app.route("/info")
def info() -> dict[str, object]:
    return {**seen, "pid": os.getpid()}


@app.route("/modules")
def modules() -> list[str]:
    return [m.split(".")[0] for m in seen["modules_at_fork"]]


@app.route("/sleep")
def sleep() -> str:
    # A test waits for these marks to know its requests are in flight (never a fixed sleep).
    marks = os.environ.get("SLOW_APP_MARKS")
    if marks:
        with open(os.path.join(marks, f"{os.getpid()}-{time.monotonic_ns()}"), "w"):
            pass
    time.sleep(float(request.args.get("s", "1")))
    return "slept"


@app.route("/spin")
def spin() -> str:
    # Pure Python holding the GIL (except at the interpreter's switch interval): heartbeats
    # must still go out from the control thread.
    end = time.monotonic() + float(request.args.get("s", "1"))
    n = 0
    while time.monotonic() < end:
        n += 1
    return f"spun {n}"
