"""PyTorch models over the shared weights: :func:`skeleton` builds a model without weights,
:func:`bind` puts the shared tensors into it.

At import time an app builds only the skeleton (parameters on the ``meta`` device: no memory,
no compute). In every worker, a :func:`zygote.post_fork` function calls :func:`bind`, which
replaces the parameters and persistent buffers with the shared tensors of the same names
(``load_state_dict(assign=True)`` semantics: the tensors are used as they are, not copied
into the module's), after checking every name, shape and dtype.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

try:
    import torch
    from torch import nn
except ImportError as e:  # torch is an optional dependency of the package
    raise ImportError(
        "zygote.torch needs PyTorch: pip install torch (or the package's extra, "
        "pip install './python[torch]'); zygote.weights().numpy(name) works without it"
    ) from e

from ._native import ZygoteError

__all__ = ["BindError", "bind", "skeleton"]

_patch_lock = threading.Lock()


class BindError(ZygoteError, ValueError):
    """The module and the weights do not fit; the message lists every key that does not.

    Attributes: ``missing``, ``unexpected``, ``mismatched`` (``(key, why)`` pairs) and
    ``unmaterialised`` (meta buffers that could not be computed).
    """

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, str]],
        unmaterialised: list[str],
    ):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        self.unmaterialised = unmaterialised


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Builds models inside it without their weights: parameters on the ``meta`` device.

    A plain ``nn.Module`` built inside is as under ``torch.device("meta")``. Hugging Face
    ``from_pretrained`` (which sentence-transformers calls) builds the model from its config
    instead of loading the file, and leaves it in eval mode; ``module.to(device)`` of a module
    that still has meta tensors does nothing (bind puts it on the weights' device)::

        with zygote.torch.skeleton():
            model = SentenceTransformer(path, device="cpu")
    """
    with _patch_lock, _from_pretrained_builds_from_config(), _to_skips_meta(), torch.device("meta"):
        yield


@contextlib.contextmanager
def _to_skips_meta() -> Iterator[None]:
    original = nn.Module.to

    def to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        if any(t.is_meta for t in self.parameters()):
            return self
        return original(self, *args, **kwargs)

    nn.Module.to = to  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.to = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _from_pretrained_builds_from_config() -> Iterator[None]:
    try:
        from transformers import AutoConfig, PreTrainedModel
    except ImportError:
        yield
        return
    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_pretrained(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config")
        if config is None or isinstance(config, str):
            config = AutoConfig.from_pretrained(config or path)
        model = cls._from_config(config)
        model.eval()
        return model

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign]
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original  # type: ignore[method-assign]


def _tied_groups(module: nn.Module) -> dict[str, list[str]]:
    """Every name of a parameter or buffer, mapped to all the names of the same tensor."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for name, b in module.named_buffers(remove_duplicate=False):
        by_id.setdefault(id(b), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def _set(module: nn.Module, path: str, value: Any) -> None:
    owner, _, leaf = path.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    if leaf in sub._parameters:
        sub._parameters[leaf] = value
    else:
        sub._buffers[leaf] = value


def _assign(module: nn.Module, chosen: dict[str, torch.Tensor]) -> None:
    """``module.load_state_dict(chosen, strict=False, assign=True)``: the module takes the shared
    tensors themselves (no copy into its own).

    When no module of the tree customises loading (load hooks, its own
    ``_load_from_state_dict``) and every key names a parameter or buffer slot, the tensors go
    straight into the slots: what ``assign=True`` does, without ``load_state_dict``'s walk of
    every module and key (the seed 002 model, MiniLM-L6, bound in one process here: 3-7 ms
    against 10-17 ms through ``load_state_dict``; several times that with workers binding side
    by side). Otherwise ``load_state_dict`` itself runs.
    """
    subs = dict(module.named_modules(remove_duplicate=False))
    plain = all(
        not getattr(m, "_load_state_dict_pre_hooks", None)
        and not getattr(m, "_load_state_dict_post_hooks", None)
        and type(m)._load_from_state_dict is nn.Module._load_from_state_dict
        for m in subs.values()
    )
    slots = []
    for key, tensor in chosen.items():
        owner, _, leaf = key.rpartition(".")
        sub = subs.get(owner)
        if not plain or sub is None or (leaf not in sub._parameters and leaf not in sub._buffers):
            module.load_state_dict(chosen, strict=False, assign=True)
            return
        slots.append((sub, leaf, tensor))
    for sub, leaf, tensor in slots:
        if leaf in sub._parameters:
            sub._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            sub._buffers[leaf] = tensor


def bind(
    module: nn.Module,
    weights: Mapping[str, torch.Tensor] | None = None,
    prefix: str = "",
    strict: bool = True,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Replaces ``module``'s parameters and persistent buffers with the shared tensors.

    ``weights`` defaults to :func:`zygote.weights`; the tensor for the module's key ``k`` is
    ``weights[prefix + k]``. Before anything changes, every key is checked: missing from the
    weights, unexpected (a weight under ``prefix`` the module does not have; only with
    ``strict``), or of another shape or dtype; one :class:`BindError` lists them all. Then:
    tied parameters (one tensor under several names) are bound to one tensor again;
    ``requires_grad`` is off everywhere; non-persistent buffers still on the meta device are
    computed on the weights' device (``buffers`` gives values by name; a Hugging Face model
    computes its own, e.g. ``position_ids``). No meta tensor is left; the module is returned,
    in eval mode.

    A host compute copy in a half form (``zygote start --host-weights f16`` or ``bf16``:
    matrices in f16 or bf16, biases and norms in f32) does not fit a torch module, whose
    parameters share one dtype: bind refuses it with a :class:`BindError` that says so and
    names ``--host-weights f32``.
    """
    if weights is None:
        import zygote

        weights = zygote.weights()
    expected = module.state_dict(keep_vars=True)
    tied = _tied_groups(module)
    missing: list[str] = []
    mismatched: list[tuple[str, str]] = []
    # Matrices in f16 or bf16 where the module has another dtype: a half form of the compute
    # copy.
    half_form = False
    chosen: dict[str, torch.Tensor] = {}
    nonpersistent: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, current in expected.items():
        group = tied.get(key, [key])
        source = next((k for k in group if prefix + k in weights), None)
        if source is None:
            missing.append(prefix + key)
            continue
        shared = weights[prefix + source]
        used.add(prefix + source)
        if tuple(shared.shape) != tuple(current.shape):
            mismatched.append(
                (prefix + source, f"shape {tuple(shared.shape)}, module {tuple(current.shape)}")
            )
        elif shared.dtype != current.dtype:
            mismatched.append((prefix + source, f"dtype {shared.dtype}, module {current.dtype}"))
            half_form = half_form or shared.dtype in (torch.float16, torch.bfloat16)
        chosen[key] = shared
    # A weight named like a non-persistent buffer (old checkpoints saved `position_ids`) fills
    # that buffer: it is then shared like the rest instead of computed.
    for name, buf in module.named_buffers(remove_duplicate=False):
        if name in expected or prefix + name not in weights:
            continue
        shared = weights[prefix + name]
        used.add(prefix + name)
        if tuple(shared.shape) != tuple(buf.shape) or shared.dtype != buf.dtype:
            mismatched.append(
                (
                    prefix + name,
                    f"{tuple(shared.shape)} {shared.dtype}, module buffer "
                    f"{tuple(buf.shape)} {buf.dtype}",
                )
            )
        else:
            nonpersistent[name] = shared
    ignored = [
        re.compile(p) for p in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or []
    ]
    unexpected = (
        sorted(
            k
            for k in weights
            if k.startswith(prefix)
            and k not in used
            and not any(p.search(k[len(prefix) :]) for p in ignored)
        )
        if strict
        else []
    )
    if missing or unexpected or mismatched:
        raise _error(missing, unexpected, mismatched, [], half_form)

    device = next(iter(chosen.values())).device if chosen else torch.device("cpu")
    _assign(module, chosen)
    for name, shared in nonpersistent.items():
        _set(module, name, shared)
    _retie(module, tied)
    for p in module.parameters():
        p.requires_grad_(False)
    unmaterialised = _materialise_buffers(module, set(expected), device, buffers or {})
    left = [n for n, t in _all_tensors(module) if t.is_meta]
    if unmaterialised or left:
        raise _error([], [], [], sorted(set(unmaterialised) | set(left)))
    module.eval()
    return module


def _all_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _retie(module: nn.Module, tied: dict[str, list[str]]) -> None:
    """Makes every name of a tied group refer to the one tensor bound under its first name."""
    done: set[str] = set()
    for name, group in tied.items():
        if len(group) < 2 or name in done:
            continue
        first = module.get_parameter(group[0]) if _is_param(module, group[0]) else None
        if first is None:
            first = module.get_buffer(group[0])
        for other in group[1:]:
            _set(module, other, first)
        done.update(group)


def _is_param(module: nn.Module, path: str) -> bool:
    owner, _, leaf = path.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return leaf in sub._parameters


def _materialise_buffers(
    module: nn.Module,
    persistent: set[str],
    device: torch.device,
    given: Mapping[str, torch.Tensor],
) -> list[str]:
    """Computes the non-persistent buffers left on the meta device; returns those it cannot."""
    failed: list[str] = []
    for name, buf in list(module.named_buffers(remove_duplicate=False)):
        if name in persistent or not buf.is_meta:
            continue
        if name in given:
            _set(module, name, given[name].to(device))
            continue
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if not _init_by_hugging_face(module, owner, leaf, buf, device):
            failed.append(name)
    return failed


def _init_by_hugging_face(
    root: nn.Module, owner: nn.Module, leaf: str, buf: torch.Tensor, device: torch.device
) -> bool:
    """Lets a Hugging Face model compute a buffer itself (``_init_weights`` of its owner).

    Every other tensor of the owner (parameters, buffers already bound) is swapped for a meta
    stand-in meanwhile, so an initialiser that writes them too writes nothing shared.
    """
    init = next(
        (m._init_weights for m in [root, *root.modules()] if hasattr(m, "_init_weights")), None
    )
    if init is None:
        return False
    target = torch.empty(buf.shape, dtype=buf.dtype, device=device)
    owner._buffers[leaf] = target
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    for sub in owner.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in list(table.items()):
                if t is None or t is target or t.is_meta:
                    continue
                swapped.append((table, name, t))
                stand_in = torch.empty(t.shape, dtype=t.dtype, device="meta")
                table[name] = (
                    nn.Parameter(stand_in, False) if table is sub._parameters else stand_in
                )
    try:
        with torch.no_grad():
            init(owner)
    except Exception:
        owner._buffers[leaf] = buf
        return False
    finally:
        for table, name, t in swapped:
            table[name] = t
    return owner._buffers[leaf] is target


def _error(
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, str]],
    unmaterialised: list[str],
    half_form: bool = False,
) -> BindError:
    lines = ["zygote.torch.bind: the module does not fit the shared weights"]
    if half_form:
        lines.append(
            "  the compute copy keeps its matrices in half precision (zygote start "
            "--host-weights f16 or bf16), with biases and norms in f32: a torch module cannot "
            "use that mix"
        )
    if missing:
        lines.append(f"  missing from the weights ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(
            f"  in the weights but not in the module ({len(unexpected)}): " + ", ".join(unexpected)
        )
    for key, why in mismatched:
        lines.append(f"  mismatched {key}: weights {why}")
    if unmaterialised:
        lines.append(
            "  still on the meta device (non-persistent buffers zygote cannot compute): "
            + ", ".join(unmaterialised)
        )
    fixes = []
    if half_form:
        fixes.append("start the service with --host-weights f32 (the default) for torch apps")
    if missing or unexpected:
        fixes.append(
            "bind the submodule the weights belong to (e.g. model[0].auto_model for a "
            "SentenceTransformer), or pass prefix= / strict=False"
        )
    if mismatched:
        fixes.append(
            "build the skeleton from the same config as the model file, in float32 (the "
            "compute copy's dtype for f16/bf16 files)"
        )
    if unmaterialised:
        fixes.append("pass buffers={name: tensor}, or compute them in a post_fork function")
    lines.append("  fix: " + "; ".join(fixes))
    return BindError("\n".join(lines), missing, unexpected, mismatched, unmaterialised)
