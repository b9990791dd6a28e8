"""The one place torchax is imported (temporary shim for torch >= 2.13).

torchax 0.0.13 names 22 named-tensor op overloads (``prod.dim_Dimname``, ``norm.names_out``, ...) at
import time and while building its ``Environment``; torch 2.13 removed them, so ``import torchax``
raises ``AttributeError``. The fix is on torchax main but unreleased. Until a release carries it, we
answer exactly those missing names with an inert placeholder, only while torchax imports and builds
its default environment:

* the placeholder is never an ``OpOverload``: torch never dispatches it, so an implementation torchax
  registers under it is dead code, and nothing real is shadowed (aliasing to a real overload would
  overwrite torchax's implementation of that real overload);
* overloads that exist are returned untouched, so on a torch that still has them this is a no-op;
* any other missing name still raises, and the patch is removed afterwards (placeholders are not
  cached on the op packet).

Delete this module (keep ``import_torchax``) once a torchax release supports torch 2.13.
"""

from __future__ import annotations

import contextlib
import re
import threading
from types import ModuleType

import torch
import torch._ops

# Overload names of the named-tensor API ("dim_Dimname", "dimname", "names_out", ...).
NAMED_TENSOR_OVERLOAD = re.compile(r"(^|_)(dimname|names)(_|$)", re.IGNORECASE)

_lock = threading.Lock()
_torchax: ModuleType | None = None


class RemovedOverload:
    """Stands in for an op overload this torch no longer has. Hashable, never callable."""

    __slots__ = ("qualified_name",)

    def __init__(self, qualified_name: str):
        self.qualified_name = qualified_name

    def __repr__(self) -> str:
        return f"RemovedOverload({self.qualified_name})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemovedOverload) and other.qualified_name == self.qualified_name

    def __hash__(self) -> int:
        return hash(("RemovedOverload", self.qualified_name))

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.qualified_name} does not exist in torch {torch.__version__}")


@contextlib.contextmanager
def named_tensor_placeholders(answered: list[str] | None = None):
    """While active, a missing named-tensor overload resolves to a ``RemovedOverload``.

    ``answered`` (optional) collects the qualified names that were answered with a placeholder.
    """
    answered = [] if answered is None else answered
    packet = torch._ops.OpOverloadPacket
    original = packet.__getattr__

    def getattr_with_placeholders(self, key: str):
        try:
            return original(self, key)
        except AttributeError:
            if not NAMED_TENSOR_OVERLOAD.search(key):
                raise
            name = f"{self._qualified_op_name}.{key}"
            if name not in answered:
                answered.append(name)
            return RemovedOverload(name)

    packet.__getattr__ = getattr_with_placeholders
    try:
        yield answered
    finally:
        packet.__getattr__ = original


# Qualified names answered with a placeholder when torchax was imported (empty on an older torch).
PLACEHOLDERS: list[str] = []


def import_torchax() -> ModuleType:
    """Imports torchax and builds its default environment, with the shim active during both. Only
    that: the bridge's lowerings are installed by ``bridge.extract.torchax_with_lowerings``, so this
    module can go when a torchax release supports torch 2.13."""
    global _torchax
    with _lock:
        if _torchax is None:
            # torchax switches torch's attention fast path off at import, for every caller; the
            # bridge switches it off only around its own tracing (bridge.extract.traced_as_torch),
            # so eager torch in the same process keeps its behaviour.
            fast_path = torch.backends.mha.get_fastpath_enabled()
            with named_tensor_placeholders(PLACEHOLDERS):
                import torchax

                torchax.default_env()
            torch.backends.mha.set_fastpath_enabled(fast_path)
            _torchax = torchax
    return _torchax
