"""``zygote start --app``: Python workers serving WSGI and ASGI apps from the shared weights.

The ported seed 002 app against sentence-transformers; four workers sharing one copy of the
weights (PSS); a killed worker replaced; SIGTERM with requests in flight; a request that
computes for twice ``--timeout``; an app that fails to import; the FastAPI example."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import APPS, FIXTURE, REPO, get, model_dir, post_json, wait_for

SEED002 = REPO / "examples/python/seed002"
FASTAPI = REPO / "examples/python/fastapi"


def app_args(app: str, app_dir: Path, *more: str) -> list[str]:
    return ["--model", str(model_dir()), "--app", app, "--app-dir", str(app_dir), *more]


def smaps_rollup_of_mapping(pid: int, name: str) -> tuple[int, int]:
    """(Pss, Rss) in KiB of the mappings of ``pid`` whose path contains ``name``."""
    pss = rss = 0
    current = False
    for line in open(f"/proc/{pid}/smaps"):
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            current = name in line
        elif current and first == "Pss:":
            pss += int(line.split()[1])
        elif current and first == "Rss:":
            rss += int(line.split()[1])
    return pss, rss


def test_seed002_port_four_workers_one_copy(service):
    s = service(app_args("main:app", SEED002), workers=4)
    s.wait_serving()
    ref = json.loads(FIXTURE.read_text())
    sentences = ref["sentences"]
    pids = set()
    got = []
    for i in range(0, len(sentences), 8):
        status, headers, body = post_json(s.url + "/embed", {"input": sentences[i : i + 8]})
        assert status == 200
        pids.add(int(headers["x-worker-pid"]))
        got += [d["embedding"] for d in body["data"]]
    cos = torch.nn.functional.cosine_similarity(torch.tensor(got), torch.tensor(ref["embeddings"]))
    assert cos.min().item() >= 0.9999, cos.min()
    workers = s.worker_pids()
    assert len(workers) == 4 and pids <= set(workers)
    # Every worker maps the model memfd (the host compute copy, in place) and has read it...
    model_kib = (model_dir() / "model.safetensors").stat().st_size / 1024
    per = [smaps_rollup_of_mapping(pid, "memfd:zygote-model") for pid in workers]
    assert all(rss > 0 for _, rss in per), per
    # ...and the four together are charged about one copy of it, not four.
    assert sum(pss for pss, _ in per) <= 1.05 * model_kib, (per, model_kib)
    # The app's libraries log at Python's default level, as under gunicorn: at INFO,
    # sentence-transformers would draw a progress bar into the log on every encode.
    assert "post_fork done" in s.text() and "Batches" not in s.text(), s.text()[-2000:]
    assert s.stop() == 0


def test_kill_9_of_a_worker_is_replaced_and_serves(service):
    s = service(app_args("slow:app", APPS), workers=2)
    s.wait_serving()
    victim = s.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        pids = s.worker_pids()
        return len(pids) == 2 and victim not in pids and pids

    pids = wait_for("a replacement worker", replaced, 120, s.log)
    seen = set()
    for _ in range(40):
        _, headers, body = get(s.url + "/info")
        seen.add(int(headers["x-worker-pid"]))
        assert json.loads(body)["tensors"] == 104
        if seen == set(pids):
            break
    assert victim not in seen
    assert s.stop() == 0


def test_sigterm_finishes_the_requests_in_flight(service, tmp_path):
    s = service(app_args("slow:app", APPS), workers=2, env={"SLOW_APP_MARKS": str(tmp_path)})
    s.wait_serving()
    results: list[object] = []

    def call():
        try:
            results.append(get(s.url + "/sleep?s=2")[2])
        except Exception as e:  # noqa: BLE001 - recorded and asserted on below
            results.append(e)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    # All six are in flight (4 threads per worker) once the app marked each one's start.
    wait_for("six requests in flight", lambda: len(list(tmp_path.iterdir())) >= 6, 30, s.log)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert results == [b"slept"] * 6, results
    assert s.proc.wait(60) == 0
    assert "drain requested" in s.text()


def test_a_worker_whose_request_threads_are_busy_leaves_new_connections_to_the_others(
    service, tmp_path
):
    # One request thread each: while worker A sleeps through a request, every new connection
    # goes to worker B and is answered at once, instead of waiting in A behind the sleep.
    env = {"SLOW_APP_MARKS": str(tmp_path)}
    s = service(app_args("slow:app", APPS, "--threads", "1"), workers=2, env=env)
    s.wait_serving()
    slept: list[object] = []
    sleeper = threading.Thread(target=lambda: slept.append(get(s.url + "/sleep?s=4")))
    sleeper.start()
    wait_for("the sleep in flight", lambda: any(tmp_path.iterdir()), 30, s.log)
    busy = int(next(tmp_path.iterdir()).name.split("-")[0])
    answered = []
    for _ in range(8):
        began = time.monotonic()
        status, headers, _ = get(s.url + "/info")
        answered.append((int(headers["x-worker-pid"]), time.monotonic() - began))
        assert status == 200
    assert all(pid != busy for pid, _ in answered), (busy, answered)
    assert max(t for _, t in answered) < 2.0, answered
    sleeper.join(30)
    assert slept and slept[0][0] == 200
    assert s.stop() == 0


def test_a_request_computing_twice_the_timeout_keeps_its_worker(service):
    s = service(app_args("slow:app", APPS, "--timeout", "2"), workers=1)
    s.wait_serving()
    before = s.worker_pids()
    status, headers, body = get(s.url + "/spin?s=4")
    assert status == 200 and body.startswith(b"spun")
    assert int(headers["x-worker-pid"]) == before[0]
    assert s.worker_pids() == before
    assert "no heartbeat" not in s.text()
    assert s.stop() == 0


def test_an_app_that_fails_to_import_stops_the_start(service):
    s = service(app_args("broken:app", APPS), workers=1)
    code = s.proc.wait(240)
    log = s.text()
    assert code == 1, log
    assert "failed to import" in log
    assert "RuntimeError: this app is broken on purpose" in log
    # The app template imports it once, before any worker: the start fails at once.
    assert "template (pid" in log and "failed before it was ready" in log, log


def test_a_failing_post_fork_stops_the_start(service):
    s = service(app_args("bad_post_fork:app", APPS), workers=1)
    code = s.proc.wait(240)
    log = s.text()
    assert code == 1, log
    assert "a @zygote.post_fork function of bad_post_fork:app raised" in log
    assert "ValueError: this post_fork fails on purpose" in log
    assert "crash loop" in log


def test_fastapi_example(service, tmp_path):
    weights = tmp_path / "classifier.safetensors"
    subprocess.run([sys.executable, str(FASTAPI / "model.py"), str(weights)], check=True)
    s = service(["--model", str(weights), "--app", "app:app", "--app-dir", str(FASTAPI)], workers=2)
    s.wait_serving()
    x = [0.1 * i for i in range(16)]
    status, headers, body = post_json(s.url + "/predict", {"x": x})
    assert status == 200 and "x-worker-pid" in headers
    sys.path.insert(0, str(FASTAPI))
    try:
        from model import Classifier
    finally:
        sys.path.remove(str(FASTAPI))
    from safetensors.torch import load_file

    local = Classifier()
    local.load_state_dict(load_file(str(weights)))
    with torch.inference_mode():
        want = local(torch.tensor([x]))[0]
    assert torch.allclose(torch.tensor(body["scores"]), want, atol=1e-6)
    _, _, health = get(s.url + "/health")
    assert json.loads(health)["tensors"] == 4
    with pytest.raises(Exception, match="422"):
        post_json(s.url + "/predict", {"x": [1.0]})
    assert s.stop() == 0


def test_sighup_rolls_python_workers_without_a_failed_request(service):
    s = service(app_args("slow:app", APPS), workers=2)
    s.wait_serving()
    before = set(s.worker_pids())
    failures: list[object] = []
    answered = [0]
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                status, _, _ = get(s.url + "/info", timeout=30)
                answered[0] += 1
                if status != 200:
                    failures.append(status)
            except Exception as e:  # noqa: BLE001 - recorded and asserted on below
                failures.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        s.proc.send_signal(signal.SIGHUP)

        def rolled():
            pids = set(s.worker_pids())
            return len(pids) == 2 and not pids & before and pids

        wait_for("both workers replaced", rolled, 240, s.log)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == [], failures[:5]
    assert answered[0] > 0
    assert s.stop() == 0


def test_an_app_whose_import_calls_cuda_is_refused_with_the_fix(service):
    s = service(app_args("cuda_at_import:app", APPS), workers=1)
    code = s.proc.wait(240)
    log = s.text()
    assert code == 1, log
    # On this machine without a GPU the import raises; with one it would initialise CUDA and
    # the template's checks would refuse it. Either way the error names the fix.
    assert "@zygote.post_fork" in log, log
    assert "PYTORCH_NVML_BASED_CUDA_CHECK=1" in log, log
    assert "failed before it was ready" in log, log


def test_cuda_checks_of_the_template():
    from zygote import template

    # This process never touched CUDA.
    assert template.cuda_state() == []
    assert template.looks_like_cuda(RuntimeError("Found no NVIDIA driver on your system"))
    assert not template.looks_like_cuda(ValueError("bad config"))


def test_workers_fork_from_the_template_which_imports_once(service):
    s = service(app_args("slow:app", APPS), workers=2, env={"ZYGOTE_LOG": "debug"})
    s.wait_serving()
    template = s.template_pid()
    workers = s.worker_pids()
    # Every worker is a child of the template: a fork, not an exec of its own interpreter.
    for pid in workers:
        assert ppid(pid) == template, (pid, ppid(pid), template)
    log = s.text()
    assert log.count("imported slow:app in") == 1, log
    assert "forking with" in log, "the template's threads are logged at each fork"
    assert "ms after the fork" in log
    # uvicorn and a2wsgi were imported before the fork, not in each worker.
    assert "uvicorn" in modules_of(s.url) and "a2wsgi" in modules_of(s.url)
    status, headers, body = get(s.url + "/info")
    assert status == 200 and json.loads(body)["tensors"] > 0
    assert s.stop() == 0


def modules_of(url: str) -> set[str]:
    """The modules the template had imported when it forked the worker answering ``url``."""
    status, _, body = get(url + "/modules")
    assert status == 200, body
    return set(json.loads(body))


def private_clean_kib(pid: int) -> int:
    """KiB of clean pages (file pages, in practice) that only ``pid`` maps."""
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Private_Clean:"):
            return int(line.split()[1])
    raise AssertionError(f"no Private_Clean in /proc/{pid}/smaps_rollup")


def test_the_template_hands_back_the_library_pages_of_its_import(service):
    # torch's import leaves some 300 MiB of its libraries' pages (CUDA's among them) resident
    # in the template alone; the template hands back those no other process maps, unless told
    # not to. (How many that is here depends on what this test's own process has imported:
    # the pages it maps too are shared, and stay.)
    kib = {}
    for pageout in ("0", "1"):
        env = {"ZYGOTE_TEMPLATE_PAGEOUT": pageout}
        s = service(app_args("main:app", SEED002), workers=1, env=env)
        s.wait_serving()
        kib[pageout] = private_clean_kib(s.template_pid())
        status, _, body = post_json(s.url + "/embed", {"input": ["a sentence"]})
        assert status == 200 and len(body["data"][0]["embedding"]) == 384
        said = re.findall(r"handed back (\d+) MiB of library pages", s.text())
        if pageout == "1":
            # The figure may be 0 here: in the full suite this process has imported the same
            # libraries and maps their pages too.
            assert said, s.text()[-2000:]
            # What only the template maps is what it touched since (its fork loop's pages).
            assert kib["1"] < 16 * 1024, kib
        else:
            assert not said and "pages stay resident" in s.text(), s.text()[-2000:]
        assert s.stop() == 0


def test_kill_9_of_the_template_restarts_it_and_the_workers_keep_serving(service):
    s = service(app_args("slow:app", APPS), workers=2)
    s.wait_serving()
    template = s.template_pid()
    workers = set(s.worker_pids())
    os.kill(template, signal.SIGKILL)
    new = wait_for(
        "a new template",
        lambda: (t := s.template_pid(default=None)) not in (None, template) and t,
        120,
        s.log,
    )
    # The workers forked by the old template never stopped serving.
    assert set(s.worker_pids()) == workers
    for _ in range(10):
        status, headers, _ = get(s.url + "/info")
        assert status == 200 and int(headers["x-worker-pid"]) in workers
    # A worker that dies now is forked from the new template.
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        pids = set(s.worker_pids())
        return len(pids) == 2 and victim not in pids and pids

    pids = wait_for("a replacement worker", replaced, 120, s.log)
    (fresh,) = pids - workers
    assert ppid(fresh) == new
    assert s.stop() == 0


def test_reload_imports_the_new_code_and_keeps_the_owner(service, tmp_path):
    app = tmp_path / "reloaded.py"
    app.write_text(RELOADED.format(version=1))
    s = service(app_args("reloaded:app", tmp_path), workers=2)
    s.wait_serving()
    owner = s.owner_pid()
    _, _, body = get(s.url + "/")
    assert json.loads(body)["version"] == 1
    generation = json.loads(body)["generation"]
    app.write_text(RELOADED.format(version=2))
    s.proc.send_signal(signal.SIGHUP)

    def new_code():
        _, _, body = get(s.url + "/")
        return json.loads(body)["version"] == 2 and json.loads(body)

    wait_for("the workers to serve the new code", new_code, 240, s.log)
    for _ in range(10):
        _, _, body = get(s.url + "/")
        got = json.loads(body)
        assert got["version"] == 2 and got["generation"] == generation
    assert s.owner_pid() == owner, "the owner (and its weights) are not touched"
    assert s.stop() == 0


def test_a_reload_whose_import_fails_leaves_the_old_code_serving(service, tmp_path):
    app = tmp_path / "reloaded.py"
    app.write_text(RELOADED.format(version=1))
    s = service(app_args("reloaded:app", tmp_path), workers=1)
    s.wait_serving()
    template = s.template_pid()
    app.write_text("raise RuntimeError('the new code is broken')\n")
    s.proc.send_signal(signal.SIGHUP)
    wait_for("the reload to fail", lambda: "reload failed" in s.text(), 120, s.log)
    assert "RuntimeError: the new code is broken" in s.text()
    assert "reload failed" in s.status()["reload_error"]
    assert s.template_pid() == template
    _, _, body = get(s.url + "/")
    assert json.loads(body)["version"] == 1
    assert s.proc.poll() is None
    assert s.stop() == 0


RELOADED = """
import zygote
from flask import Flask

app = Flask(__name__)
seen = {{}}


@zygote.post_fork
def bind():
    seen["generation"] = zygote.weights().generation


@app.route("/")
def index():
    return {{"version": {version}, **seen}}
"""


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_the_execd_worker_program_still_serves_an_app(service):
    # For an app that cannot be preloaded: every worker imports it itself, no template.
    s = service(
        [
            "--model",
            str(model_dir()),
            "--",
            sys.executable,
            "-m",
            "zygote.serve",
            "slow:app",
            "--app-dir",
            str(APPS),
        ],
        workers=1,
    )
    s.wait_serving()
    assert s.pid_of("template") == []
    status, _, body = get(s.url + "/info")
    assert status == 200 and json.loads(body)["tensors"] > 0
    assert s.stop() == 0


def test_a_python_spare_answers_nothing_until_a_dead_worker_leaves_it_the_slot(service):
    s = service(app_args("slow:app", APPS, "--spares", "1"), workers=1)
    s.wait_serving()

    def spares() -> list[int]:
        return [
            p["pid"]
            for p in s.status()["processes"]
            if p.get("role") == "spare" and p.get("state") == "ready"
        ]

    (spare,) = wait_for("a ready spare", spares, 120, s.log)
    assert ppid(spare) == s.template_pid(), "the spare forks from the template too"
    (worker,) = s.worker_pids()
    answers = [get(s.url + "/info") for _ in range(20)]
    assert {int(a[1]["x-worker-pid"]) for a in answers} == {worker}, "the spare accepts nothing"
    assert not json.loads(answers[0][2])["warmed"], "a worker started into its slot skips warmup"
    os.kill(worker, signal.SIGKILL)

    def first_answer():
        try:
            _, headers, body = get(s.url + "/info", timeout=5)
            return int(headers["x-worker-pid"]), json.loads(body)["warmed"]
        except OSError:
            return None

    assert wait_for("an answer after the kill", first_answer, 60, s.log) == (spare, True), (
        "the activated spare answers, having run its warmup before it was ready"
    )
    assert s.worker_pids() == [spare], "the spare took worker 0's slot"
    comm = Path(f"/proc/{spare}/comm").read_text().strip()
    assert comm == "zygote-w0", f"ps names the slot the activated spare serves: {comm}"
    (refill,) = wait_for(
        "the pool refilled", lambda: [p for p in spares() if p != spare], 120, s.log
    )
    assert refill not in (spare, worker)
    assert "activated as worker 0" in s.text()
    assert "warmup done in" in s.text()
    assert s.stop() == 0
