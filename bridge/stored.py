"""Weights a checkpoint stores, served a slice at a time (``StoredWeights``), and the key check every
loader runs. A leaf module: the checkpoint layouts (``checkpoints``: safetensors, quantizing, random;
``partitions``: GPT-NeoX slim weights; ``grok_checkpoint``: Grok-1's ckpt-0) build on it."""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from bridge.errors import CheckpointError


def check_keys(expected, found, optional=frozenset()) -> None:
    """Checkpoint names and shapes against the model's: one error listing every missing and
    unexpected key, else one naming the first shape mismatch. ``expected``/``found``: name -> shape;
    ``optional``: model names the checkpoint may leave out (a tied head, exclude rules)."""
    missing = sorted(set(expected) - set(found) - set(optional))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        def some(keys):  # one line stays readable: the first few keys and how many in all
            return "none" if not keys else f"{keys[:5]}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}"

        raise CheckpointError(
            f"checkpoint keys do not match the model: missing in checkpoint: {some(missing)}; "
            f"unexpected in checkpoint: {some(unexpected)}"
        )
    for name, shape in found.items():
        if tuple(expected[name]) != tuple(shape):
            raise CheckpointError(f"shape mismatch for {name}: checkpoint {list(shape)}, model {list(expected[name])}")


class StoredWeights:
    """Weights a checkpoint stores, by the model's parameter names, read a slice at a time: what
    ``lift(..., stored=...)`` places straight onto a mesh (``weight_plan.load_weights``), each
    device's slice read on its own. A layout (safetensors, NeoX partitions, Grok-1's ckpt-0)
    subclasses it with the renaming table between its stored names and the model's."""

    label = "placing weights"  # the progress bar's

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """model name -> stored shape, for every tensor stored."""
        raise NotImplementedError

    def read(self, name: str, index: tuple = ()):
        """``tensor[index]`` of the model's weight ``name`` as a numpy array (``index``: a tuple of
        slices, as ``jax.make_array_from_callback`` passes them)."""
        raise NotImplementedError

    def check(self, model: nn.Module, names) -> None:
        """The stored names and shapes against ``model``'s state dict (``names``: the ones the
        lifted program reads; a tied weight stored once may be missing)."""
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_keys(expected, self.shapes(), set(expected) - set(names))


class Recent:
    """The last ``keep`` results of ``make(key)``, shared by the loader's threads: a layout that reads
    (or quantizes, or generates) a whole tensor keeps it while the devices' slices of it are placed,
    and no longer."""

    def __init__(self, keep: int):
        self.keep, self._lock, self._items = keep, threading.Lock(), OrderedDict()

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make(key)  # outside the lock: two threads make two different tensors at once
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return value


def torch_from_numpy(a: np.ndarray) -> torch.Tensor:
    """A numpy array as a torch tensor without a copy, ml_dtypes' bfloat16 included."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
