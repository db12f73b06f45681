"""The Python worker program: ``python -m zygote.serve MODULE:ATTR`` serves a WSGI or ASGI app.

``zygote start --app MODULE:ATTR`` runs this program in every worker (through the ``exec``
entry). In order, it:

1. attaches to the supervisor (:func:`zygote.attach`);
2. imports ``MODULE`` (``--app-dir`` first on ``sys.path``) and takes ``ATTR``, the app;
3. runs the app's :func:`zygote.post_fork` functions (where it binds its model), and in a
   warm spare its :func:`zygote.warmup` functions;
4. starts the control thread (heartbeats every second, also while a request computes; the
   drain request);
5. serves the supervisor's listeners with uvicorn (ASGI apps as they are, WSGI apps through
   a2wsgi's thread pool of ``--threads`` threads, accepting only while a thread is free:
   :mod:`zygote.accept`) and reports ready once it listens;
6. on drain: stops accepting, finishes the requests in flight and exits 0.

Every answer carries ``X-Worker-Pid``. A failure before ready (the app does not import, a
``post_fork`` or ``warmup`` function raises) is logged with its traceback and ends the worker with a
non-zero code; the supervisor retries and, when it keeps failing, stops the start as a crash
loop with that error in its log.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib
import inspect
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import zygote
from zygote.accept import AcceptGate, one_at_a_time

log = logging.getLogger("zygote")

#: Exit codes of a worker that fails before it is ready.
EXIT_ATTACH = 2
EXIT_IMPORT = 3
EXIT_POST_FORK = 4
EXIT_SERVE = 5


class _Tagged(logging.Formatter):
    """The runtime's line format: ``HH:MM:SS.mmm LEVEL [worker N PID] message``."""

    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        ms = int(record.msecs)
        level = {"WARNING": "WARN", "CRITICAL": "ERROR"}.get(record.levelname, record.levelname)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return (
            f"{t.tm_hour:02}:{t.tm_min:02}:{t.tm_sec:02}.{ms:03} {level:<5} "
            f"[{self.tag} {os.getpid()}] {msg}"
        )


#: Loggers the runtime's level (``ZYGOTE_LOG``) applies to: zygote's own and the server's.
RUNTIME_LOGGERS = ("zygote", "uvicorn")


def setup_logging(tag: str) -> None:
    """Python's logging in the runtime's format, on stderr: zygote's and uvicorn's loggers at
    the runtime's level (``ZYGOTE_LOG``), every other logger at Python's default, WARNING.

    The app's libraries log as they would under gunicorn: sentence-transformers, for one,
    draws a progress bar on every ``encode`` when its logger is at INFO, which would write to
    the service's log and cost time on every request. An app that wants its own INFO lines
    sets its loggers' levels itself.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Tagged(tag))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    level = os.environ.get("ZYGOTE_LOG", "info").upper()
    level = {"WARN": "WARNING", "TRACE": "DEBUG"}.get(level, level)
    for name in RUNTIME_LOGGERS:
        logging.getLogger(name).setLevel(level)


def load_app(spec: str, app_dir: str | None) -> Any:
    """Imports ``MODULE:ATTR`` (``ATTR`` may be dotted) and returns the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--app {spec!r}: expected MODULE:ATTR, e.g. main:app")
    if app_dir:
        sys.path.insert(0, os.path.abspath(app_dir))
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"--app {spec!r}: module {module_name!r} ({module.__file__}) has no {attr!r}"
            ) from None
    return obj


def is_asgi(app: Any) -> bool:
    """ASGI apps are coroutine functions (or objects whose ``__call__`` is one)."""
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else type(app).__call__
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app)


class Served:
    """ASGI middleware: ``X-Worker-Pid`` on every answer, and the counts of requests."""

    def __init__(
        self, app: Callable[..., Any], threads: int | None, gate: AcceptGate | None = None
    ):
        self.app = app
        self.threads = threads
        self.gate = gate
        self.served = 0
        self.in_flight = 0
        #: Set on drain: every answer from now on says `Connection: close`.
        self.draining = False
        self._limited = False
        self._pid = str(os.getpid()).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.threads and not self._limited:
            # Starlette and FastAPI run sync endpoints in anyio's default thread pool.
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = self.threads
            self._limited = True

        async def send_with_pid(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-worker-pid", self._pid))
                if self.draining:
                    # The client reconnects (to another worker) rather than sending its next
                    # request on a connection this worker is about to close.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        self.in_flight += 1
        if self.gate is not None:
            self.gate.enter()
        try:
            await self.app(scope, receive, send_with_pid)
        finally:
            self.in_flight -= 1
            self.served += 1
            if self.gate is not None:
                self.gate.leave()


#: How long a draining worker keeps an idle connection open for its next request (seconds).
DRAIN_GRACE = 1.0


def _idle(conn: Any) -> bool:
    """Whether a uvicorn connection is open with no request in progress."""
    transport = getattr(conn, "transport", None)
    if transport is None or transport.is_closing():
        return False
    cycle = getattr(conn, "cycle", None)
    return cycle is None or cycle.response_complete


def _server_options(asgi: bool) -> dict[str, Any]:
    """uvicorn's options for :func:`serve` (and :func:`import_server`)."""
    return {
        "lifespan": "auto" if asgi else "off",
        "log_config": None,
        "access_log": False,
        # The drain's grace (Server.shutdown) reads h11's connection state.
        "http": "h11",
        "timeout_graceful_shutdown": 30,
    }


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that is never called (:func:`import_server` only loads a config of it)."""


def import_server(app: Any, interface: str = "auto") -> None:
    """Imports what :func:`serve` imports for ``app``: uvicorn, the modules its config loads
    (the HTTP protocol, the lifespan, the WebSocket implementation) and a2wsgi for a WSGI
    app. The app template calls it before ``gc.freeze()``, so a forked worker finds them
    imported and shared instead of importing them between the fork and ready (14 ms alone
    here, several times that with workers starting side by side)."""
    import uvicorn

    asgi = is_asgi(app) if interface == "auto" else interface == "asgi"
    if not asgi:
        import a2wsgi  # noqa: F401
    uvicorn.Config(_no_app, **_server_options(asgi)).load()


def serve(
    worker: zygote.Worker,
    app: Any,
    threads: int = 4,
    interface: str = "auto",
    generation: int | None = None,
) -> int:
    """Serves ``app`` on the worker's listeners until drained; returns the exit code.

    The lower-level pieces (listeners, :class:`zygote.Control`, ``worker.ready``) are public
    for apps that serve another way; this is the way ``zygote start --app`` uses.
    """
    import uvicorn

    asgi = is_asgi(app) if interface == "auto" else interface == "asgi"
    if asgi:
        inner = app
    else:
        from a2wsgi import WSGIMiddleware

        inner = WSGIMiddleware(app, workers=threads)
    # A WSGI worker accepts only while one of its request threads is free (zygote/accept.py).
    gate = None if asgi else AcceptGate(threads)
    served = Served(inner, threads if asgi else None, gate)
    listen = socket.socket if asgi else one_at_a_time
    sockets = [listen(fileno=fd) for fd in worker.take_listener_fds()]
    if not sockets:
        log.error("this worker was given no listeners: nothing to serve")
        return EXIT_SERVE
    config = uvicorn.Config(served, **_server_options(asgi))

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Stop accepting (the listeners stay open in the other workers), then give the
            # idle connections a grace before uvicorn closes them: one accepted just before
            # the drain may carry a request still on its way, and closing it unanswered is a
            # failed request for its client. A request that arrives meanwhile is answered.
            for srv in self.servers:
                srv.close()
            for sock in sockets or []:
                sock.close()
            # A request that arrives meanwhile (on a keep-alive connection too) is answered
            # with `Connection: close`, so its client reconnects to another worker instead of
            # racing its next request against this worker's close.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DRAIN_GRACE
            while True:
                for c in self.server_state.connections:
                    cycle = getattr(c, "cycle", None)
                    if cycle is not None and not cycle.response_complete:
                        cycle.keep_alive = False
                if loop.time() >= deadline or not any(
                    _idle(c) for c in self.server_state.connections
                ):
                    break
                await asyncio.sleep(0.01)
            await super().shutdown(sockets=None)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if gate is not None:
                gate.bind(self.servers)
            if self.started and not self.should_exit:
                names = ", ".join(str(s.getsockname()) for s in sockets or [])
                if not activated:
                    worker.ready(generation, f"python {kind} app on {names}")
                log.info("serving %s on %s", kind, names)

    server = Server(config)
    kind = "asgi" if asgi else f"wsgi ({threads} threads)"
    activated = False
    if worker.spare:
        # A warm spare (--spares): ready now, but it accepts nothing (uvicorn has not started
        # serving the listeners) until the supervisor activates it in a dead worker's slot.
        worker.ready(generation, f"python {kind} app, spare: not accepting until activated")
        log.info("ready as a spare; waiting for activation")
        if not worker.wait_activation():
            log.info("drained as a spare, having served nothing; exiting")
            return 0
        setup_logging(f"worker {worker.id}")
        log.info("activated as worker %d", worker.id)
        activated = True

    def on_drain(deadline: float) -> None:
        served.draining = True
        config.timeout_graceful_shutdown = max(1, int(deadline) - 1)
        try:
            worker.draining(served.in_flight)
        except zygote.ZygoteError:
            pass
        server.should_exit = True

    control = zygote.Control(worker, on_drain, served=lambda: served.served).start()
    try:
        asyncio.run(server.serve(sockets=sockets))
    finally:
        control.stop()
    log.info("drained after %d requests; exiting", served.served)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zygote.serve",
        description="Serve a WSGI or ASGI app in a worker started by `zygote start --app`.",
    )
    parser.add_argument("app", help="MODULE:ATTR of the app object, e.g. main:app")
    parser.add_argument("--app-dir", help="directory put first on sys.path (default: cwd)")
    parser.add_argument("--threads", type=int, default=4, help="request threads (default 4)")
    parser.add_argument("--interface", choices=["auto", "wsgi", "asgi"], default="auto")
    args = parser.parse_args(argv)

    tag = "worker"
    setup_logging(tag)
    # A write into a shared weight faults (the mapping is read-only): print where it was.
    faulthandler.enable(all_threads=True)
    try:
        worker = zygote.attach()
    except zygote.ZygoteError as e:
        log.error("%s", e)
        return EXIT_ATTACH
    setup_logging(f"worker {worker.id}")
    try:
        app = load_app(args.app, args.app_dir or os.getcwd())
    except BaseException:
        log.error(
            "the app %s failed to import; fix the error below (this worker exits, and the "
            "service stops after repeated failures):\n%s",
            args.app,
            traceback.format_exc().rstrip(),
        )
        return EXIT_IMPORT
    return run_worker(
        worker, app, args.app, threads=args.threads, interface=args.interface, started=None
    )


def _run_app_hooks(run: Callable[[], None], decorator: str, spec: str, who: str) -> bool:
    """Runs the app's functions registered with ``@zygote.<decorator>``; on an exception logs
    it with its traceback and returns False (the worker then exits before ready)."""
    try:
        run()
    except BaseException:
        log.error(
            "a @zygote.%s function of %s raised; %s exits:\n%s",
            decorator,
            spec,
            who,
            traceback.format_exc().rstrip(),
        )
        return False
    return True


def run_worker(
    worker: zygote.Worker,
    app: Any,
    spec: str,
    threads: int = 4,
    interface: str = "auto",
    started: float | None = None,
) -> int:
    """The worker program once the app is imported: ``post_fork``, the control thread, the
    server. Here after the import in an exec'd worker, and right after the fork in a worker
    of the app template (:mod:`zygote.template`; ``started`` is then the fork's time)."""
    if started is not None:
        zygote._adopt_forked(worker)
        setup_logging(f"worker {worker.id}")
    began = time.monotonic()
    if not _run_app_hooks(zygote.run_post_fork, "post_fork", spec, "this worker"):
        return EXIT_POST_FORK
    generation = None
    if zygote._weights is not None:
        generation = zygote._weights.generation
    since_fork = (
        "" if started is None else f", {(time.monotonic() - started) * 1000:.0f} ms after the fork"
    )
    log.info(
        "post_fork done in %.0f ms%s (%d threads alive)",
        (time.monotonic() - began) * 1000,
        since_fork,
        threading.active_count(),
    )
    if worker.spare and zygote._warmup:
        began = time.monotonic()
        if not _run_app_hooks(zygote.run_warmup, "warmup", spec, "this spare"):
            return EXIT_POST_FORK
        log.info("warmup done in %.0f ms", (time.monotonic() - began) * 1000)
    return serve(worker, app, threads=threads, interface=interface, generation=generation)


if __name__ == "__main__":
    sys.exit(main())
