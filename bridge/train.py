"""Training the same torch model on JAX: next-token cross entropy from the lifted forward,
``jax.value_and_grad``, and an optax AdamW update, as one jitted step with donated state.

    trainer = Trainer(lifted, optax.adamw(1e-3))
    state = trainer.init()
    state, loss = trainer.step(state, batch_ids)          # batch_ids [B, T] int32

Parameters, gradients and optimizer state are placed by the lifted model's scheme: each AdamW
moment sits exactly where its parameter sits (fsdp shards all three; dp replicates them and
splits the batch), and the gradients are pinned to their parameters' placement.

* ``remat=True``: each decoder layer is a ``jax.checkpoint``: its activations are recomputed in
  the backward pass instead of kept (the layer's torch forward runs inside the checkpoint through
  torchax).
* The loss reads the logits in the model's dtype and computes the fp32 log-softmax one block of
  ``loss_chunk`` positions at a time (each block a ``jax.checkpoint``), so no fp32 copy of the
  whole ``[batch, seq, vocab]`` logits is ever live, forward or backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import sharding
from bridge.errors import UsageError
from bridge.lift import Lifted

LOSS_CHUNK = 256  # positions per fp32 log-softmax block


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------
def next_token_nll(logits: jax.Array, ids: jax.Array, chunk: int = LOSS_CHUNK) -> jax.Array:
    """Mean negative log-likelihood of ``ids[:, 1:]`` under ``logits[:, :-1]`` ([B, T, V], any
    dtype), computed in fp32 one block of ``chunk`` positions at a time."""
    logits, targets = logits[:, :-1], ids[:, 1:]
    b, t, v = logits.shape
    n = max(1, math.ceil(t / chunk))
    pad = n * chunk - t
    valid = jnp.pad(jnp.ones((b, t), jnp.float32), ((0, 0), (0, pad)))
    logits = jnp.pad(logits, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))

    @jax.checkpoint
    def block_nll(lg, tg, ok):
        lp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
        return -(jnp.take_along_axis(lp, tg[..., None], axis=-1)[..., 0] * ok).sum()

    blocks = lambda x: x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    total = jax.lax.map(lambda a: block_nll(*a), (blocks(logits), blocks(targets), blocks(valid))).sum()
    return total / (b * t)


@contextlib.contextmanager
def remat_layers(model):
    """While active (around tracing), each decoder layer's forward runs inside ``jax.checkpoint``:
    its parameters and hidden input cross into JAX, the layer's own torch forward runs within the
    checkpoint through torchax, and only the layer's inputs are kept for the backward pass."""
    from torch.nn.utils.stateless import _reparametrize_module

    from bridge.torchax_compat import import_torchax

    env = import_torchax().default_env()
    patched = []
    for _, layer in model.decoder_layers():
        original = layer.forward

        def forward(x, *rest, _layer=layer, _original=original):
            names = [n for n, _ in _layer.named_parameters()]
            params = env.t2j_iso(dict(_layer.named_parameters()))

            def pure(p, h):
                p_t, h_t = env.j2t_iso((p, h))
                with _reparametrize_module(_layer, p_t):
                    out = _original(h_t, *rest)
                return env.t2j_iso(out)

            assert set(params) == set(names)
            return env.j2t_iso(jax.checkpoint(pure)(params, env.t2j_iso(x)))

        layer.forward = forward
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # the class's forward again


# ---------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: Any


def check_trainable(lifted: Lifted) -> None:
    bad = [k for k, w in lifted.weights.items() if not jnp.issubdtype(w.dtype, jnp.floating)]
    if bad:
        raise UsageError(f"{bad[0]} is {lifted.weights[bad[0]].dtype}: an int8-quantized model cannot be trained; "
                         f"drop --quantize")  # fmt: skip
    if lifted.kv_head_copies > 1:
        raise UsageError(f"this mesh repeats each kv head {lifted.kv_head_copies} times (a model axis wider than "
                         f"the kv heads); train with a model axis of at most {lifted.model.kv_cache_heads}")  # fmt: skip
    if any(p.padded_from is not None for p in lifted.placements.values()):
        raise UsageError("the vocabulary was padded to divide the model axis; train with a model axis that divides "
                         f"the vocab ({lifted.model.config.vocab_size}) or another scheme")  # fmt: skip


class Trainer:
    """The jitted training step of a lifted causal LM (see the module docstring)."""

    def __init__(self, lifted: Lifted, optimizer, *, remat: bool = False, loss_chunk: int = LOSS_CHUNK):
        check_trainable(lifted)
        self.lifted = lifted
        self.optimizer = optimizer
        self.remat = remat
        self.loss_chunk = loss_chunk
        mesh = lifted.mesh
        self.param_shardings = sharding.shardings_of(lifted.placements, mesh)
        abstract = jax.eval_shape(optimizer.init, {k: jax.ShapeDtypeStruct(w.shape, w.dtype) for k, w in lifted.weights.items()})
        self.opt_shardings = self._like_params(abstract)
        replicated = NamedSharding(mesh, P())
        self.state_shardings = TrainState(replicated, self.param_shardings, self.opt_shardings)
        self._steps = {}

    def _like_params(self, tree):
        """Shardings for an optimizer-state pytree: a leaf under a parameter's name (AdamW's mu and
        nu) sits where that parameter sits; anything else (counts) is replicated."""
        replicated = NamedSharding(self.lifted.mesh, P())

        def pick(path, leaf):
            for entry in reversed(path):
                key = getattr(entry, "key", None)
                if isinstance(key, str) and key in self.param_shardings and leaf.shape == self.lifted.weights[key].shape:
                    return self.param_shardings[key]
            return replicated

        return jax.tree_util.tree_map_with_path(pick, tree)

    def init(self) -> TrainState:
        """Fresh optimizer state for the lifted weights (placed on the mesh, nothing on the host)."""
        init = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)
        params = dict(self.lifted.weights)
        return TrainState(jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(self.lifted.mesh, P())), params,
                          init(params))  # fmt: skip

    # -- pure functions -----------------------------------------------------------------------------
    def loss(self, params: dict, ids: jax.Array) -> jax.Array:
        ctx = remat_layers(self.lifted.model) if self.remat else contextlib.nullcontext()
        with ctx:
            logits, _ = self.lifted.fn(params, (ids,), {})
        return next_token_nll(logits, ids, self.loss_chunk)

    def grads(self, params: dict, ids: jax.Array):
        """(loss, gradients placed like the parameters)."""
        loss, grads = jax.value_and_grad(self.loss)(params, ids)
        grads = {k: jax.lax.with_sharding_constraint(g, self.param_shardings[k]) for k, g in grads.items()}
        return loss, grads

    def update(self, state: TrainState, ids: jax.Array) -> tuple[TrainState, jax.Array]:
        import optax

        loss, grads = self.grads(state.params, ids)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), loss

    # -- jitted -------------------------------------------------------------------------------------
    def batch_sharding(self, batch: int) -> NamedSharding:
        return self.lifted.input_sharding(batch)

    def step_fn(self, batch: int):
        """The jitted step for batches of ``batch`` rows: state donated, placed by the scheme."""
        if batch not in self._steps:
            self._steps[batch] = jax.jit(
                self.update,
                in_shardings=(self.state_shardings, self.batch_sharding(batch)),
                out_shardings=(self.state_shardings, NamedSharding(self.lifted.mesh, P())),
                donate_argnums=(0,),
            )
        return self._steps[batch]

    def put_batch(self, ids) -> jax.Array:
        ids = np.asarray(ids, np.int32)
        return sharding.put_global(ids, self.batch_sharding(ids.shape[0]))

    def step(self, state: TrainState, ids) -> tuple[TrainState, jax.Array]:
        ids = self.put_batch(ids)
        return self.step_fn(ids.shape[0])(state, ids)

    def state_bytes_per_device(self, state: TrainState) -> dict:
        """Bytes one device holds of the parameters, their gradients (placed like them) and the
        optimizer state."""

        def per_device(tree):
            return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))

        params = per_device(state.params)
        return {"params": params, "grads": params, "optimizer": per_device(state.opt_state)}


# ---------------------------------------------------------------------------------------------------
# Data: a text file as packed sequences
# ---------------------------------------------------------------------------------------------------
def pack(token_ids: list[int], seq: int) -> np.ndarray:
    """The token stream cut into consecutive windows of ``seq`` tokens ([N, seq]); a stream shorter
    than one window repeats itself to fill it."""
    if len(token_ids) < 2:
        raise UsageError("the training text tokenizes to fewer than 2 tokens; give a longer text")
    stream = list(token_ids)
    while len(stream) < seq:
        stream += token_ids
    n = len(stream) // seq
    return np.asarray(stream[: n * seq], np.int32).reshape(n, seq)


def batch_at(windows: np.ndarray, step: int, batch: int) -> np.ndarray:
    """The ``batch`` windows of step ``step`` (0-based): the windows in order, cycling; a function of
    the step alone, so a resumed run sees the same batches as an uninterrupted one."""
    idx = (np.arange(batch) + step * batch) % len(windows)
    return windows[idx]
