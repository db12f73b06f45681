"""The control thread of a worker (:class:`Control`): heartbeats and the drain request.

One daemon thread waits on the control channel (with the GIL released) and sends a
heartbeat every ``interval`` seconds, so the supervisor sees the worker alive while a
request computes: the thread needs the GIL only for a moment per beat, and torch releases
it while it computes. A heartbeat stops only when the interpreter itself is stuck, which
is what the supervisor's ``--timeout`` is for. On ``drain`` it calls ``on_drain(deadline_s)``
once; when the supervisor is gone it calls ``on_orphaned()`` (default: exit at once).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from ._native import OrphanedError, Worker

log = logging.getLogger("zygote")


class Control:
    """Heartbeats and drain handling for ``worker`` on a daemon thread (``start()``)."""

    def __init__(
        self,
        worker: Worker,
        on_drain: Callable[[float], object],
        interval: float = 1.0,
        served: Callable[[], int] = lambda: 0,
        on_orphaned: Callable[[], object] | None = None,
    ):
        self.worker = worker
        self.on_drain = on_drain
        self.interval = interval
        self.served = served
        self.on_orphaned = on_orphaned or (lambda: os._exit(0))
        self.draining = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zygote-control", daemon=True)

    def start(self) -> Control:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread (it ends within ``interval``)."""
        self._stop.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msg = self.worker.wait_control(self.interval)
                if msg is not None and msg.get("type") == "drain" and not self.draining.is_set():
                    self.draining.set()
                    deadline = msg.get("deadline_ms", 30_000) / 1000.0
                    log.info("drain requested (deadline %.1f s)", deadline)
                    self.on_drain(deadline)
                self.worker.heartbeat(self.served())
        except OrphanedError:
            self.on_orphaned()
        except Exception:
            log.exception("the control thread failed; exiting so the supervisor restarts it")
            os._exit(1)
