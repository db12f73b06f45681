"""zygote: Python and PyTorch apps served from one shared copy of the weights.

A process started by ``zygote start --app MODULE:ATTR`` is a *worker*: it attaches to its
supervisor, runs the functions registered with :func:`post_fork`, reports ready and serves
the app. :func:`weights` gives it the shared weights (torch tensors over the one compute
copy, never copied); :func:`zygote.torch.bind` puts them into a model built as a skeleton.
Any other process gets the same weights from a running service with :func:`connect`.

The lower-level API (:func:`attach`, :class:`Worker`, :class:`Control`) is for apps that
bring their own loop. docs/PYTHON.md describes all of it.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from . import _native
from ._native import (
    ATTACH_ENV,
    NotAttachedError,
    OrphanedError,
    SharedTensor,
    SharedWeights,
    WeightsError,
    Worker,
    ZygoteError,
)
from .control import Control
from .weights import Weights

__all__ = [
    "ATTACH_ENV",
    "Connection",
    "Control",
    "NotAttachedError",
    "OrphanedError",
    "SharedTensor",
    "SharedWeights",
    "Weights",
    "WeightsError",
    "Worker",
    "ZygoteError",
    "attach",
    "connect",
    "in_worker",
    "listeners",
    "model_dir",
    "post_fork",
    "run_post_fork",
    "run_warmup",
    "warmup",
    "weights",
    "worker",
]

_lock = threading.Lock()
_worker: Worker | None = None
_connection: Connection | None = None
_weights: Weights | None = None
_post_fork: list[Callable[[], object]] = []
_warmup: list[Callable[[], object]] = []


def post_fork(fn: Callable[[], object]) -> Callable[[], object]:
    """Registers ``fn`` to run in every worker after it attached and before it reports ready.

    This is where an app binds its model (``zygote.torch.bind``) and touches CUDA; at import
    time it builds only the skeleton. Functions run in the order they were registered; one
    that raises stops the worker before it is ready, with its traceback in the log.
    """
    _post_fork.append(fn)
    return fn


def run_post_fork() -> None:
    """Runs the registered :func:`post_fork` functions, in order (the worker runner calls it)."""
    for fn in list(_post_fork):
        fn()


def warmup(fn: Callable[[], object]) -> Callable[[], object]:
    """Registers ``fn`` to run in every warm spare (``zygote start --spares K``) after the
    :func:`post_fork` functions and before it reports ready: typically one request's work
    (``model.encode(["warm up"])``), so that the first answer after an activation costs what
    any answer costs.

    Why spares only: a process's first request is slower than the next ones (the first touch
    of the shared weights and of the interpreter's copied-on-write heap, the libraries' lazy
    set-up), and a spare has the time to pay that while it waits. A worker started to take a
    slot now would pay the same before it is ready, so it skips these functions and its first
    request pays instead. Functions run in the order they were registered; one that raises
    stops the spare before it is ready, with its traceback in the log.
    """
    _warmup.append(fn)
    return fn


def run_warmup() -> None:
    """Runs the registered :func:`warmup` functions, in order (a spare's runner calls it)."""
    for fn in list(_warmup):
        fn()


def in_worker() -> bool:
    """Whether this process was started by a zygote (attached or not yet)."""
    return _worker is not None or ATTACH_ENV in os.environ


def attach(role: str = "worker") -> Worker:
    """Attaches this process to its supervisor (once; later calls return the same worker).

    ``role`` tags the runtime's log lines (``worker N``; the app template says ``template``).
    Raises :class:`NotAttachedError` when zygote did not start this process.
    """
    global _worker
    with _lock:
        if _worker is None:
            _worker = _native.attach(role)
            # The native side removed the variable from the C environment; children started
            # through os.environ (subprocess) must not believe they are attached either.
            os.environ.pop(ATTACH_ENV, None)
        return _worker


def _adopt_forked(worker: Worker) -> None:
    """In a worker forked by the app template: ``worker`` is this process's own from now on.

    The template's worker object stays referenced (``_template_worker``) and is never dropped
    here: its descriptors' numbers belong to this child's worker now.
    """
    global _worker, _weights, _connection, _template_worker
    _template_worker = _worker
    _worker = worker
    _weights = None
    _connection = None


_template_worker: Worker | None = None


def model_dir() -> str:
    """The directory of the model file the service serves (``zygote start --model``): where a
    sentence-transformers or Hugging Face app finds its config and tokenizer."""
    w = _worker or attach()
    path = Path(w.info()["model_path"])
    return str(path.parent if path.is_file() else path)


def listeners() -> list[socket.socket]:
    """The supervisor's listening sockets as socket objects (handed over once: a second call
    returns an empty list). Every worker accepts on the same sockets."""
    w = _worker or attach()
    return [socket.socket(fileno=fd) for fd in w.take_listener_fds()]


def worker() -> Worker | None:
    """The attached worker, or ``None`` when this process has not attached."""
    return _worker


class Connection:
    """Client mode: the shared weights of a running service, in a process zygote did not start.

    Made by :func:`connect`. The zygote admits only its own user (and users it was started
    with ``--allow-uid`` for, who may not touch the weights).
    """

    def __init__(self, runtime_dir: str | os.PathLike[str] | None, device: int, timeout: float):
        self.runtime_dir = Path(runtime_dir or _native.default_runtime_dir())
        self.device = device
        self.timeout = timeout
        self._weights: Weights | None = None

    def weights(self) -> Weights:
        """The service's weights for this connection's device (imported and verified once)."""
        if self._weights is None:
            shared = _native.connect_weights(str(self.runtime_dir), self.device, self.timeout)
            self._weights = Weights(shared)
        return self._weights

    def __repr__(self) -> str:
        return f"<zygote Connection {self.runtime_dir} device {self.device}>"


def connect(
    runtime_dir: str | os.PathLike[str] | None = None, device: int = 0, timeout: float = 30.0
) -> Connection:
    """Connects to a running service (default runtime directory: ``zygote start``'s).

    After this, :func:`weights` and ``zygote.torch.bind`` use the service's weights in this
    process too. ``zygote start --workers 0`` runs a service with no workers, for this use.
    """
    global _connection
    conn = Connection(runtime_dir, device, timeout)
    with _lock:
        _connection = conn
    return conn


def weights(timeout: float = 60.0) -> Weights:
    """The shared weights: a read-only mapping from tensor names to torch tensors.

    In a worker, imported from the owner (waiting up to ``timeout`` seconds for it) and
    verified the first time; after :func:`connect`, the service's. Every tensor aliases the
    one compute copy (``data_ptr()`` lies inside the shared mapping); a write into one is
    refused by the memory protection (docs/PYTHON.md, "Shared tensors").
    """
    global _weights
    with _lock:
        if _weights is not None:
            return _weights
        if _worker is None and _connection is None and ATTACH_ENV not in os.environ:
            raise NotAttachedError(
                "zygote.weights() was called in a process zygote did not start. Serve the app "
                "with `zygote start --model PATH --app MODULE:ATTR`, or call zygote.connect() "
                "first to use the weights of a running service."
            )
    w = _worker or (attach() if _connection is None else None)
    if w is not None:
        shared = w.import_weights(timeout)
        result = Weights(shared)
    else:
        assert _connection is not None
        result = _connection.weights()
    with _lock:
        if _weights is None:
            _weights = result
        return _weights
