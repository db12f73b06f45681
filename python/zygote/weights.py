"""The shared weights as a read-only mapping from names to tensors (:class:`Weights`).

The native :class:`zygote.SharedWeights` holds the imported memory; each of its tensors
(:class:`zygote.SharedTensor`) leaves Rust as a DLPack capsule (``torch.from_dlpack``) or,
on the host, through the buffer protocol (``numpy.asarray``). Neither copies a byte: every
tensor aliases the shared mapping, which stays mapped while any tensor made from it lives.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ._native import SharedTensor, SharedWeights


class Weights(Mapping[str, Any]):
    """Tensor names to torch tensors over the shared compute copy (read-only, never copied).

    ``weights["name"]`` needs torch; :meth:`numpy` and :meth:`shared` do not.
    """

    def __init__(self, shared: SharedWeights):
        self._shared = shared
        self._torch: dict[str, Any] = {}

    @property
    def shared(self) -> SharedWeights:
        """The native object (names, generation, backend, device, ranges)."""
        return self._shared

    @property
    def generation(self) -> int:
        return self._shared.generation

    @property
    def backend(self) -> str:
        return self._shared.backend

    @property
    def device(self) -> str:
        """Where the tensors live, in torch's spelling: ``"cpu"`` or ``"cuda:N"``."""
        return self._shared.device

    def ranges(self) -> list[tuple[int, int]]:
        """``(address, bytes)`` of each shared arena; every tensor lies inside one."""
        return self._shared.ranges()

    def contains(self, address: int) -> bool:
        """Whether ``address`` lies inside the shared memory."""
        return any(start <= address < start + size for start, size in self.ranges())

    def tensor(self, name: str) -> SharedTensor:
        """The native tensor (DLPack and buffer protocol) named ``name``."""
        return self._shared.tensor(name)

    def numpy(self, name: str) -> Any:
        """A read-only numpy array over the shared bytes (host backend only)."""
        import numpy

        return numpy.asarray(self._shared.tensor(name))

    def __getitem__(self, name: str) -> Any:
        t = self._torch.get(name)
        if t is None:
            try:
                import torch
            except ImportError as e:
                raise ImportError(
                    "zygote.weights()[name] returns torch tensors: install torch, or use "
                    "weights.numpy(name) / weights.tensor(name) without it"
                ) from e
            t = torch.from_dlpack(self._shared.tensor(name))
            self._torch[name] = t
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._shared.names())

    def __len__(self) -> int:
        return len(self._shared)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._shared

    def __repr__(self) -> str:
        return f"<zygote Weights {self._shared!r}>"
