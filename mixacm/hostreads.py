"""Count host reads: the tensor operations that make the host wait for the device.

On a GPU each of these is a synchronisation (the host blocks until every queued kernel has run):
``Tensor.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` / ``if t:`` (all dispatch to
``aten._local_scalar_dense`` or ``aten.is_nonzero``), ``Tensor.tolist()`` and ``.numpy()``, and
the operations whose output size depends on tensor values: ``nonzero``, ``masked_select``,
``unique``, and indexing or index-assignment with a boolean mask (``x[mask]``, ``x[mask] = v``).

``torch.cuda.set_sync_debug_mode("warn")`` shows these on a GPU only; :class:`HostReadCounter`
counts them on any device (CPU included), so a test can bound the reads of a training step where
no GPU is present. It is a ``TorchDispatchMode`` (it sees every aten call made while it is active)
plus a patch of ``Tensor.tolist`` / ``Tensor.numpy``, which do not go through the dispatcher.

    with HostReadCounter() as reads:
        ...  # 20 training steps
    assert reads.count <= 2, reads.summary()
"""
from __future__ import annotations

import traceback
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must read (scalars) or whose output size depends on the values.
_READ_OPS = {
    aten._local_scalar_dense.default: "item/float/int/bool",
    aten.is_nonzero.default: "bool(tensor)",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
    aten.unique_dim.default: "unique",
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


class HostReadCounter(TorchDispatchMode):
    """Context manager counting host reads (see the module docstring); ``count`` is the total,
    ``kinds`` a Counter by kind and ``where`` the innermost caller frame of each read."""

    def __init__(self, keep_stacks: bool = True) -> None:
        super().__init__()
        self.count = 0
        self.kinds: Counter[str] = Counter()
        self.where: Counter[str] = Counter()
        self.keep_stacks = keep_stacks
        self._patched: dict[str, Any] = {}

    def _record(self, kind: str) -> None:
        self.count += 1
        self.kinds[kind] += 1
        if self.keep_stacks:
            frames = [f for f in traceback.extract_stack()[:-2]
                      if "torch/" not in f.filename and "hostreads.py" not in f.filename]
            if frames:
                f = frames[-1]
                self.where[f"{f.filename.rsplit('/', 2)[-2:][-1]}:{f.lineno} {f.line}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READ_OPS:
            self._record(_READ_OPS[func])
        elif func in _INDEX_OPS and _bool_index(args):
            self._record("boolean-mask indexing")
        return func(*args, **kwargs)

    def __enter__(self) -> "HostReadCounter":
        counter = self
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def patched(t, *a, _original=original, _name=name, **kw):
                counter._record(_name)
                return _original(t, *a, **kw)

            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def summary(self) -> str:
        """One line per place that read, most frequent first."""
        kinds = ", ".join(f"{k} x{n}" for k, n in self.kinds.most_common())
        places = "; ".join(f"{w} (x{n})" for w, n in self.where.most_common(8))
        return f"{self.count} host read(s): {kinds}. Where: {places}"
