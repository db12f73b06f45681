"""The app template: ``python -m zygote.template MODULE:ATTR`` imports the app once and forks
the workers.

``zygote start --app MODULE:ATTR`` runs this program as one child of the zygote (so it holds
the model memfd like any child). In order, it:

1. attaches to the supervisor (:func:`zygote.attach`, tagged ``template N``);
2. imports ``MODULE`` and takes ``ATTR`` (no :func:`zygote.post_fork` function runs here),
   and the server's modules (:func:`zygote.serve.import_server`);
3. checks that the import did not initialise CUDA (:func:`cuda_state`): a process that
   forks must never have, or every child inherits a broken context. It refuses to serve,
   with the fix in the error, if it did;
4. ``gc.freeze()``: the objects of the import move to the permanent generation, so no
   collection in a worker writes to their pages and the heap stays shared;
5. hands back the library pages only the import touched (:func:`page_out`);
6. serves the zygote protocol on ``RUNTIME_DIR/--socket`` (the zygote server of
   ``zygote-server``, hosted through the extension) and reports ready; each ``spawn`` of
   entry ``app`` forks with ``os.fork()`` and runs, in the child, the worker program of
   :mod:`zygote.serve` without the import (:func:`run_forked`);
7. on ``drain`` stops forking and exits 0; the workers it forked go on until they are
   drained.

An app that initialises CUDA at import can still run under the exec'd worker program,
``zygote start -- python -m zygote.serve MODULE:ATTR`` (every worker imports it itself).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import sys
import time
import traceback
import warnings
from typing import Any

import zygote
from zygote import serve

from . import _native

log = logging.getLogger("zygote")

#: Exit code of a template whose import initialised CUDA.
EXIT_CUDA = 6

#: What a template that touched CUDA tells its author.
CUDA_FIX = (
    "move the CUDA work (model.to('cuda'), torch.cuda calls, anything that creates a CUDA "
    "tensor) into a @zygote.post_fork function, which runs in each worker after the fork; "
    "for torch.cuda.is_available() at import time set PYTORCH_NVML_BASED_CUDA_CHECK=1 (it "
    "asks NVML and leaves CUDA uninitialised)"
)


def cuda_state() -> list[str]:
    """Why this process counts as having initialised CUDA (empty: it did not)."""
    found = []
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                found.append("torch.cuda.is_initialized() is true")
            if torch._C._cuda_isInBadFork():
                found.append("torch._C._cuda_isInBadFork() is true")
        except AttributeError:  # a torch build without CUDA
            pass
    try:
        with open("/proc/self/maps") as maps:
            if any("libcuda.so" in line for line in maps):
                found.append("libcuda is mapped into the process (/proc/self/maps)")
    except OSError:
        pass
    return found


def looks_like_cuda(exc: BaseException) -> bool:
    """Whether an import failed because it asked for CUDA (on a machine without a GPU)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(w in text for w in ("cuda", "nvidia driver", "nvml"))


def threads_now() -> list[str]:
    """The threads of this process by kernel name (``/proc/self/task/*/comm``)."""
    names = []
    try:
        for tid in sorted(os.listdir("/proc/self/task"), key=int):
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
    except OSError:
        pass
    return names


class Template:
    """The loaded app and how its workers serve it."""

    def __init__(self, app: Any, spec: str, threads: int, interface: str):
        self.app = app
        self.spec = spec
        self.threads = threads
        self.interface = interface
        self.forks = 0

    def fork(self) -> int:
        """The server's fork: logs the threads the child will not have, then ``os.fork()``."""
        if log.isEnabledFor(logging.DEBUG):
            names = threads_now()
            log.debug("forking with %d threads: %s", len(names), ", ".join(names))
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.forks += 1
        return os.fork()

    def run_forked(self, worker: zygote.Worker) -> int:
        """In a forked child: the worker program after the import. Never returns."""
        code = 1
        try:
            code = serve.run_worker(
                worker,
                self.app,
                self.spec,
                threads=self.threads,
                interface=self.interface,
                started=time.monotonic(),
            )
        except BaseException:
            log.error("the worker failed:\n%s", traceback.format_exc().rstrip())
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            # Not a return into the template's frames (they belong to the parent's server
            # loop), and no interpreter teardown of the template's objects.
            os._exit(code)
        return code


#: Environment variable that keeps the import's library pages resident in the template
#: (``0``); by default the template hands them back (:func:`page_out`).
PAGEOUT_ENV = "ZYGOTE_TEMPLATE_PAGEOUT"


def page_out() -> None:
    """Hands back the library pages only the import touched (``zygote_runtime::pageout``).

    The import maps torch's libraries, CUDA's among them even on a CPU-only machine, and
    touches pages of them (relocations, symbol tables, initialisers) that the template never
    runs again and the workers never map: resident, and charged to the template alone (about
    290 MiB for the seed 002 app). The kernel reclaims only pages no other process maps, so
    what the workers run stays; a page needed later is read back from its file once.
    """
    if os.environ.get(PAGEOUT_ENV, "1") == "0":
        log.info("%s=0: the import's library pages stay resident", PAGEOUT_ENV)
        return
    try:
        done = _native.page_out_file_mappings()
    except zygote.ZygoteError as e:
        log.warning("the import's library pages stay resident: %s", e)
        return
    log.info(
        "handed back %d MiB of library pages only the import touched (%d mappings, "
        "%.0f MiB before, %.0f MiB left) in %d ms",
        # Pages faulted back in meanwhile can leave more than before: never a negative figure.
        max(0, done["rss_before_kib"] - done["rss_after_kib"]) // 1024,
        done["mappings"],
        done["rss_before_kib"] / 1024,
        done["rss_after_kib"] / 1024,
        done["ms"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zygote.template",
        description="The app template of `zygote start --app`: imports once, forks workers.",
    )
    parser.add_argument("app", help="MODULE:ATTR of the app object, e.g. main:app")
    parser.add_argument("--app-dir", help="directory put first on sys.path (default: cwd)")
    parser.add_argument("--threads", type=int, default=4, help="request threads (default 4)")
    parser.add_argument("--interface", choices=["auto", "wsgi", "asgi"], default="auto")
    parser.add_argument("--socket", default="template.sock", help="socket name in the run dir")
    args = parser.parse_args(argv)

    serve.setup_logging("template")
    faulthandler.enable(all_threads=True)
    try:
        worker = zygote.attach(role="template")
    except zygote.ZygoteError as e:
        log.error("%s", e)
        return serve.EXIT_ATTACH
    serve.setup_logging(f"template {worker.id}")
    # torch.cuda.is_available() at import (the seed's apps call it) then asks NVML instead of
    # initialising the CUDA driver, which would make every fork unsound.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    started = time.monotonic()
    try:
        app = serve.load_app(args.app, args.app_dir or os.getcwd())
    except BaseException as e:
        hint = (
            f"\nIt looks like the import asked for CUDA: {CUDA_FIX}." if looks_like_cuda(e) else ""
        )
        log.error(
            "the app %s failed to import in the template; fix the error below (the service "
            "stops after repeated failures):\n%s%s",
            args.app,
            traceback.format_exc().rstrip(),
            hint,
        )
        return serve.EXIT_IMPORT
    cuda = cuda_state()
    if cuda:
        log.error(
            "the import of %s initialised CUDA (%s), so workers cannot be forked from it: %s",
            args.app,
            "; ".join(cuda),
            CUDA_FIX,
        )
        return EXIT_CUDA
    serve.import_server(app, args.interface)
    gc.collect()
    gc.freeze()
    names = threads_now()
    log.info(
        "imported %s in %.0f ms; %d objects frozen; %d threads (%s)",
        args.app,
        (time.monotonic() - started) * 1000,
        gc.get_freeze_count(),
        len(names),
        ", ".join(names),
    )
    # The fork happens with the imports' C threads alive (that is the point of the checks
    # and of the per-worker pool sizes in serve.run_worker); Python's warning about it says
    # nothing the template does not already handle.
    warnings.filterwarnings(
        "ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning
    )
    page_out()
    template = Template(app, args.app, args.threads, args.interface)
    code = _native.serve_template(worker, args.socket, template.fork, template.run_forked)
    log.info("stopped after %d forks", template.forks)
    return code


if __name__ == "__main__":
    sys.exit(main())
