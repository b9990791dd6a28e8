"""Training the same torch model on JAX: a loss of the lifted forward's outputs, ``jax.value_and_grad``
and an optax AdamW update, as one jitted step with donated state. Any lifted module trains; a causal
LM's next-token cross entropy is the default loss.

    trainer = Trainer(lifted_lm, optax.adamw(1e-3))
    state = trainer.init()
    state, loss = trainer.step(state, batch_ids)          # batch_ids [B, T] int32

    trainer = Trainer(lift(resnet.train(), mesh, "dp"), optax.adamw(1e-3),
                      loss=torch_loss(lambda logits, batch: F.cross_entropy(logits, batch[1])))
    state, loss = trainer.step(state, (images, labels))   # the model sees batch[0]

Parameters, gradients and optimizer state are placed by the lifted model's scheme: each AdamW
moment sits exactly where its parameter sits (fsdp shards all three; dp replicates them and
splits the batch), and the gradients are pinned to their parameters' placement. A module in train
mode trains as torch trains it: BatchNorm normalises by the batch and its running statistics are
part of the state (``state.buffers``), updated each step.

* ``remat=True``: each layer (a causal LM's decoder layers; another module's longest ``ModuleList``
  or ``Sequential``) is a ``jax.checkpoint``: its activations are recomputed in the backward pass
  instead of kept (the layer's torch forward runs inside the checkpoint through torchax).
* The LM loss reads the logits in the model's dtype and computes the fp32 log-softmax one block of
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
from bridge.lift import Lifted, LiftedModule

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


def next_token_loss(outputs, ids: jax.Array, chunk: int = LOSS_CHUNK) -> jax.Array:
    """A causal LM's loss: ``next_token_nll`` of its logits (``outputs`` is ``(logits, kv_cache)``)."""
    return next_token_nll(outputs[0], ids, chunk)


def torch_loss(fn):
    """A loss written in torch (``fn(outputs, batch) -> scalar tensor``, e.g. ``F.cross_entropy``)
    as the JAX function ``Trainer`` differentiates: it runs through torchax, as the model does."""
    from bridge.extract import torchax_with_lowerings

    env = torchax_with_lowerings().default_env()

    def loss(outputs, batch):
        outputs, batch = env.j2t_iso((outputs, batch))
        with env:
            value = fn(outputs, batch)
        return env.t2j_iso(value)

    loss.__name__ = getattr(fn, "__name__", "torch_loss")
    return loss


def first_input(batch):
    """What the model is called with: ``batch[0]`` of a tuple or list ``(inputs, targets, ...)``,
    else the batch itself (a causal LM's token ids)."""
    return (batch[0],) if isinstance(batch, (tuple, list)) else (batch,)


def repeated_layers(model) -> list:
    """The layers ``remat`` checkpoints one by one: a causal LM's decoder layers; for another module
    the entries of its longest ``ModuleList`` or ``Sequential`` (ViT's blocks, a ResNet stage)."""
    import torch

    if hasattr(model, "decoder_layers"):
        return [layer for _, layer in model.decoder_layers()]
    lists = [m for m in model.modules() if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def remat_layers(model):
    """While active (around tracing), each layer's forward (``repeated_layers``) runs inside
    ``jax.checkpoint``: its parameters and hidden input cross into JAX, the layer's own torch forward
    runs within the checkpoint through torchax, and only the layer's inputs are kept for the
    backward pass."""
    from torch.nn.utils.stateless import _reparametrize_module

    from bridge.extract import torchax_with_lowerings

    env = torchax_with_lowerings().default_env()
    patched = []
    for layer in repeated_layers(model):
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
    buffers: dict = dataclasses.field(default_factory=dict)  # updated by the forward (train mode): BatchNorm's


def parameter_names(lifted) -> set:
    """The lifted weights that are the module's parameters (a scanned stack's ``model.layers.*.x``
    when ``model.layers.0.x`` is one); the rest are buffers."""
    from bridge.scan import layer0_name

    names = {n for n, _ in lifted.model.named_parameters()}
    return {k for k in lifted.weights if layer0_name(k) in names}


def check_trainable(lifted: LiftedModule) -> None:
    params = parameter_names(lifted)
    bad = [k for k in sorted(params) if not jnp.issubdtype(lifted.weights[k].dtype, jnp.floating)]
    if bad:
        raise UsageError(f"{bad[0]} is {lifted.weights[bad[0]].dtype}: an int8-quantized model cannot be trained; "
                         f"drop --quantize")  # fmt: skip
    if not isinstance(lifted, Lifted):
        return
    if lifted.kv_head_copies > 1:
        raise UsageError(f"this mesh repeats each kv head {lifted.kv_head_copies} times (a model axis wider than "
                         f"the kv heads); train with a model axis of at most {lifted.model.kv_cache_heads}")  # fmt: skip
    if any(p.padded_from is not None for p in lifted.placements.values()):
        raise UsageError("the vocabulary was padded to divide the model axis; train with a model axis that divides "
                         f"the vocab ({lifted.model.vocab_size}) or another scheme")  # fmt: skip


class Trainer:
    """The jitted training step of a lifted module (see the module docstring).

    ``loss(outputs, batch) -> scalar`` in JAX (``torch_loss`` wraps one written in torch); default:
    a causal LM's ``next_token_loss``. ``inputs(batch)``: the model's positional arguments
    (``first_input``: ``batch[0]`` of a tuple, else the batch)."""

    def __init__(self, lifted: LiftedModule, optimizer, *, loss=None, inputs=first_input, remat: bool = False,
                 loss_chunk: int = LOSS_CHUNK):  # fmt: skip
        check_trainable(lifted)
        if loss is None:
            if not isinstance(lifted, Lifted):
                raise UsageError(f"{type(lifted.model).__name__} is not a causal LM, so there is no default loss; "
                                 f"pass loss=(outputs, batch) -> scalar")  # fmt: skip
            loss = lambda outputs, ids: next_token_loss(outputs, ids, loss_chunk)  # noqa: E731
        from bridge.extract import modes_of

        # A module in train mode (BatchNorm, dropout) trains in it; a causal LM's program is eval's.
        self.train_mode = any(modes_of(lifted.model)) and hasattr(lifted.fn, "training")
        if remat and self.train_mode and any(n for n, _ in lifted.model.named_buffers()):
            raise UsageError("remat recomputes each layer, which would update its buffers (BatchNorm's statistics) "
                             "twice; train without remat or with the module in eval mode")  # fmt: skip
        self.lifted = lifted
        self.optimizer = optimizer
        self.remat = remat
        self.loss_fn, self.inputs = loss, inputs
        self.loss_chunk = loss_chunk
        mesh = lifted.mesh
        # Parameters train; buffers stay as they are (RoPE frequencies, masks), or in train mode are
        # the state the forward updates (BatchNorm's running statistics).
        trainable = parameter_names(lifted)
        self.trainable = [k for k in lifted.weights if k in trainable]
        buffers = {k: w for k, w in lifted.weights.items() if k not in trainable}
        self.frozen = {} if self.train_mode else buffers
        self.buffer_names = list(buffers) if self.train_mode else []
        placements = {k: lifted.placements[k] for k in self.trainable}
        self.param_shardings = sharding.shardings_of(placements, mesh)
        abstract = jax.eval_shape(optimizer.init, {k: jax.ShapeDtypeStruct(lifted.weights[k].shape, lifted.weights[k].dtype)
                                                   for k in self.trainable})  # fmt: skip
        self.opt_shardings = self._like_params(abstract)
        replicated = NamedSharding(mesh, P())
        buffer_shardings = sharding.shardings_of({k: lifted.placements[k] for k in self.buffer_names}, mesh)
        self.state_shardings = TrainState(replicated, self.param_shardings, self.opt_shardings, buffer_shardings)
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

    def params(self) -> dict:
        """The lifted model's trainable weights (its parameters, not its buffers)."""
        return {k: self.lifted.weights[k] for k in self.trainable}

    def init(self) -> TrainState:
        """Fresh optimizer state for the lifted weights (placed on the mesh, nothing on the host)."""
        init = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)
        params = self.params()
        step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(self.lifted.mesh, P()))
        # copies: the step donates its state, and the lifted module keeps its own buffers
        buffers = {k: jnp.copy(self.lifted.weights[k]) for k in self.buffer_names}
        return TrainState(step, params, init(params), buffers)

    # -- pure functions -----------------------------------------------------------------------------
    def loss(self, params: dict, batch, buffers: Optional[dict] = None, rng=None) -> jax.Array:
        """The loss of ``batch`` with the trainable ``params`` (in train mode, the module's buffers
        are ``buffers``, the lifted ones by default, and dropout draws from ``rng``)."""
        if self.train_mode and buffers is None:
            buffers = {k: self.lifted.weights[k] for k in self.buffer_names}
        return self.loss_and_buffers(params, batch, buffers, rng)[0]

    def loss_and_buffers(self, params: dict, batch, buffers: Optional[dict] = None, rng=None):
        """(``loss``, the buffers after the forward: in train mode ``buffers`` updated, else {})."""
        if self.train_mode and rng is None:
            rng = jax.random.key(0)
        ctx = remat_layers(self.lifted.model) if self.remat else contextlib.nullcontext()
        weights = {**self.frozen, **(buffers or {}), **params}
        with ctx:
            if self.train_mode:
                outputs, new_buffers = self.lifted.fn.training(weights, rng, self.inputs(batch), {})
                new_buffers = {k: new_buffers[k] for k in self.buffer_names}
            else:
                outputs, new_buffers = self.lifted.fn(weights, self.inputs(batch), {}), {}
        return self.loss_fn(outputs, batch), new_buffers

    def grads(self, params: dict, batch, buffers: Optional[dict] = None, rng=None):
        """(loss, gradients placed like the parameters, the buffers after the forward)."""
        (loss, buffers), grads = jax.value_and_grad(self.loss_and_buffers, has_aux=True)(params, batch, buffers, rng)
        grads = {k: jax.lax.with_sharding_constraint(g, self.param_shardings[k]) for k, g in grads.items()}
        return loss, grads, buffers

    def update(self, state: TrainState, batch) -> tuple[TrainState, jax.Array]:
        import optax

        rng = jax.random.fold_in(jax.random.key(0), state.step) if self.train_mode else None
        loss, grads, buffers = self.grads(state.params, batch, state.buffers, rng)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state, buffers), loss

    # -- jitted -------------------------------------------------------------------------------------
    def batch_sharding(self, batch: int, rank: int = 2) -> NamedSharding:
        return self.lifted.input_sharding(batch, rank)

    def step_fn(self, batch):
        """The jitted step for batches shaped like ``batch`` (an int: token ids of that many rows):
        state donated, placed by the scheme, each batch array split over the batch axes."""
        shapes = ((batch, 2),) if isinstance(batch, int) else tuple((x.shape[0], x.ndim) for x in jax.tree.leaves(batch))
        if shapes not in self._steps:
            tree = jax.tree.structure(0 if isinstance(batch, int) else batch)
            batch_shardings = jax.tree.unflatten(tree, [self.batch_sharding(n, r) for n, r in shapes])
            self._steps[shapes] = jax.jit(
                self.update,
                in_shardings=(self.state_shardings, batch_shardings),
                out_shardings=(self.state_shardings, NamedSharding(self.lifted.mesh, P())),
                donate_argnums=(0,),
            )
        return self._steps[shapes]

    def put_batch(self, batch):
        """A batch on the mesh: token ids (any int array) as int32; a tuple, list or dict of arrays
        (torch, numpy) leaf by leaf, each split over the batch axes."""
        if isinstance(batch, (tuple, list, dict)):
            return jax.tree.map(self.lifted.put, batch, is_leaf=lambda x: not isinstance(x, (tuple, list, dict)))
        ids = np.asarray(batch, np.int32)
        return sharding.put_global(ids, self.batch_sharding(ids.shape[0]))

    def step(self, state: TrainState, batch) -> tuple[TrainState, jax.Array]:
        batch = self.put_batch(batch)
        return self.step_fn(batch)(state, batch)

    def save_state(self, state: TrainState, path) -> None:
        """The whole training state (step, parameters, buffers, optimizer state) in directory
        ``path`` (safetensors + the step), written to a temporary sibling and swapped in: a run
        killed while saving keeps the previous save whole. ``load_state`` reads it back."""
        import json
        from pathlib import Path

        from safetensors.numpy import save_file

        from bridge.files import atomic_directory

        path = Path(path)
        tensors = {**{f"params/{k}": v for k, v in state.params.items()},
                   **{f"buffers/{k}": v for k, v in state.buffers.items()},
                   **{f"optimizer/{k}": v for k, v in _opt_leaves(state.opt_state).items()}}  # fmt: skip
        new = path.with_name(f"{path.name}.new")
        with atomic_directory(new) as tmp:
            save_file({k: np.asarray(sharding.to_host(v)) for k, v in tensors.items()}, str(tmp.path / "state.safetensors"))
            (tmp.path / "step.json").write_text(json.dumps({"step": int(sharding.to_host(state.step))}))
            tmp.commit()
        _swap_in(new, path)

    def load_state(self, path) -> TrainState:
        """A state saved by ``save_state``, placed like a fresh one (each tensor where its
        parameter's placement says)."""
        import json
        from pathlib import Path

        from safetensors import safe_open

        path, fresh = Path(path), self.init()
        with safe_open(str(path / "state.safetensors"), framework="numpy") as f:
            params = {k: jax.device_put(f.get_tensor(f"params/{k}"), self.param_shardings[k]) for k in fresh.params}
            buffers = {k: jax.device_put(f.get_tensor(f"buffers/{k}"), self.state_shardings.buffers[k]) for k in fresh.buffers}
            shardings = _opt_leaves(self.opt_shardings)
            leaves = {k: jax.device_put(f.get_tensor(f"optimizer/{k}"), shardings[k]) for k in _opt_leaves(fresh.opt_state)}
        opt_state = jax.tree.unflatten(jax.tree.structure(fresh.opt_state), list(leaves.values()))
        step = json.loads((path / "step.json").read_text())["step"]
        return TrainState(jax.device_put(jnp.asarray(step, jnp.int32), NamedSharding(self.lifted.mesh, P())), params,
                          opt_state, buffers)  # fmt: skip

    def state_bytes_per_device(self, state: TrainState) -> dict:
        """Bytes one device holds of the parameters, their gradients (placed like them) and the
        optimizer state."""

        def per_device(tree):
            return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))

        params = per_device(state.params)
        return {"params": params, "grads": params, "optimizer": per_device(state.opt_state)}


def step_program(lifted: Lifted, batch: int, seq: int, lr: float = 1e-4):
    """(the jitted AdamW step, its arguments (a fresh state, a batch of token ids), bytes per device
    of parameters, gradients and optimizer state): one training step to measure (``compare --mode
    train``). The step donates its state: run it again on the state it returns."""
    import optax

    trainer = Trainer(lifted, optax.adamw(lr))
    state = trainer.init()
    ids = trainer.put_batch(np.random.default_rng(0).integers(0, lifted.model.vocab_size, (batch, seq)))
    return trainer.step_fn(batch), (state, ids), trainer.state_bytes_per_device(state)


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


# ---------------------------------------------------------------------------------------------------
# The `train` command: text in, a trained checkpoint out, resumable
# ---------------------------------------------------------------------------------------------------
STATE_FILE = "train_state.json"
# safetensors content, named so that checkpoint loading (every *.safetensors file) skips it
OPTIMIZER_FILE = "optimizer_state.st"


def _opt_leaves(opt_state) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]}


def save(out, trainer: Trainer, state: TrainState, hf_config: dict, tokenizer, losses: list[dict], title: str):
    """``out`` as a HF checkpoint that ``generate --checkpoint out`` loads (config.json,
    model.safetensors, the tokenizer), plus what resuming needs (optimizer_state.st,
    train_state.json) and the curve (loss.csv, loss.png). Written to a temporary sibling and
    swapped in: an interrupted save leaves the previous one whole."""
    import csv
    import json
    from pathlib import Path

    import torch
    from safetensors.flax import save_file

    from bridge.files import atomic_directory

    out = Path(out)
    stored = set(trainer.lifted.model.state_dict())  # persistent tensors only (no RoPE tables)
    tensors = {**trainer.frozen, **state.params}
    if trainer.lifted.scan_layers:  # checkpoints hold the per-layer layout
        from bridge.scan import unstack_weights

        tensors = unstack_weights(tensors)
    params = {k: torch.from_numpy(np.array(sharding.to_host(v))) for k, v in tensors.items() if k in stored}
    with atomic_directory(out.with_name(f"{out.name}.new")) as tmp:
        d = tmp.path
        from bridge.checkpoints import write_checkpoint

        write_checkpoint(params, hf_config, tokenizer, d / "model")
        for f in (d / "model").iterdir():
            f.rename(d / f.name)
        (d / "model").rmdir()
        save_file({k: jnp.asarray(sharding.to_host(v)) for k, v in _opt_leaves(state.opt_state).items()}, str(d / OPTIMIZER_FILE))
        (d / STATE_FILE).write_text(json.dumps({"step": int(sharding.to_host(state.step))}))
        with open(d / "loss.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["step", "loss", "tokens_per_second"])
            w.writeheader()
            w.writerows(losses)
        plot_loss(losses, d / "loss.png", title)
        tmp.commit()
    _swap_in(out.with_name(f"{out.name}.new"), out)
    return out


def _swap_in(new, out) -> None:
    """``new`` (a complete directory) in place of ``out``, the old one removed after."""
    import os
    import shutil

    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def plot_loss(losses: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], marker="." if len(losses) < 60 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_resume(out, trainer: Trainer) -> tuple[TrainState, list[dict]]:
    """The optimizer state, step and loss history saved in ``out``, placed like a fresh state."""
    import csv
    import json
    from pathlib import Path

    from safetensors import safe_open

    out = Path(out)
    fresh = trainer.init()
    shardings = _opt_leaves(trainer.opt_shardings)
    leaves = {}
    with safe_open(str(out / OPTIMIZER_FILE), framework="flax") as f:
        for key in _opt_leaves(fresh.opt_state):
            leaves[key] = jax.device_put(f.get_tensor(key), shardings[key])
    treedef = jax.tree.structure(fresh.opt_state)
    opt_state = jax.tree.unflatten(treedef, [leaves[k] for k in _opt_leaves(fresh.opt_state)])
    step = json.loads((out / STATE_FILE).read_text())["step"]
    with open(out / "loss.csv") as fh:
        losses = [{"step": int(r["step"]), "loss": float(r["loss"]), "tokens_per_second": float(r["tokens_per_second"])}
                  for r in csv.DictReader(fh)]  # fmt: skip
    placed_step = jax.device_put(jnp.asarray(step, jnp.int32), NamedSharding(trainer.lifted.mesh, P()))
    return TrainState(placed_step, fresh.params, opt_state), losses


def run(
    checkpoint: str,
    data: str,
    *,
    devices,
    scheme="fsdp",
    mesh_overrides: Optional[dict] = None,
    steps: int = 10,
    batch: int = 4,
    seq: int = 128,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    remat: bool = False,
    out=None,
    dtype: str = "float32",
    fallback: str = "error",
    implementation: str = "auto",
    progress: bool = True,
    log=print,
    scan_layers: bool | None = None,
    save_every: int = 0,
    on_step=None,
) -> dict:
    """``torchax-bridge train``: packs ``data`` (a text file) into windows of ``seq`` tokens, runs
    ``steps`` AdamW steps of ``batch`` windows, and (with ``out``) saves a checkpoint: at the end,
    and every ``save_every`` steps (each save atomic, so a run killed at any moment keeps the last
    one whole). When ``out`` already holds a training run, it resumes from it: its weights,
    optimizer state and step count. ``on_step(step, loss)`` is called after each step."""
    import time
    from pathlib import Path

    import optax

    from bridge import checkpoints
    from bridge.models import open_model

    out = Path(out) if out else None
    resume = out is not None and (out / STATE_FILE).is_file()
    if out is not None and out.exists() and not resume:
        raise UsageError(f"--out {out} exists and holds no training run to resume; pick a new path")
    if save_every and out is None:
        raise UsageError("--save-every needs --out, the directory the state is saved to")
    if out is not None and not resume:
        from bridge.files import check_output

        check_output(out, "--out", kind="dir")
    try:
        text = Path(data).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --data {data}: {e}") from None
    scheme = sharding.get_scheme(scheme)
    source = str(out) if resume else checkpoint
    if out is not None and checkpoints.resolve(source)[0] == "preset":
        raise UsageError(f"{source} is a preset with no transformers config to save with the weights; drop --out "
                         f"or train a checkpoint directory")  # fmt: skip
    lifted = open_model(source, devices=list(devices), scheme=scheme, mesh=mesh_overrides, dtype=dtype,
                        fallback=fallback, implementation=implementation, scan_layers=scan_layers)  # fmt: skip
    mesh, tokenizer = lifted.mesh, lifted.tokenizer
    if tokenizer is None:
        raise UsageError(f"{source} has no tokenizer, so the text of --data cannot be tokenized; use a checkpoint "
                         f"saved with its tokenizer")  # fmt: skip
    if out is not None and lifted.plan.split_projections:
        raise UsageError(f"under {scheme.name} this model's fused projections are split, so the trained weights "
                         f"would not load as the original architecture; train with fsdp or dp")  # fmt: skip
    windows = pack(tokenizer.encode(text), seq)
    trainer = Trainer(lifted, optax.adamw(lr, weight_decay=weight_decay), remat=remat)
    state, losses = load_resume(out, trainer) if resume else (trainer.init(), [])
    first = int(sharding.to_host(state.step))
    log(f"{len(windows)} windows of {seq} tokens from {data}; {scheme.name} on {dict(mesh.shape)}; "
        f"{'resuming at step ' + str(first) if resume else 'fresh'}")  # fmt: skip
    from tqdm import tqdm

    config = lifted.hf_config.to_dict() if hasattr(lifted.hf_config, "to_dict") else dict(lifted.hf_config or {})
    title = f"{Path(checkpoint).name}: {scheme.name}"
    t0 = time.perf_counter()
    step_fn = trainer.step_fn(batch).lower(state, trainer.put_batch(batch_at(windows, first, batch))).compile()
    log(f"compiled the training step in {time.perf_counter() - t0:.1f} s")
    bar = tqdm(range(first, first + steps), desc="train", unit="step", disable=not progress)
    for i in bar:
        ids = trainer.put_batch(batch_at(windows, i, batch))
        t0 = time.perf_counter()
        state, loss = step_fn(state, ids)
        loss = float(sharding.to_host(loss))
        rate = batch * seq / (time.perf_counter() - t0)
        losses.append({"step": i + 1, "loss": loss, "tokens_per_second": rate})
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
        if save_every and (i + 1) % save_every == 0 and i + 1 < first + steps:
            save(out, trainer, state, config, tokenizer, losses, title)
        if on_step is not None:
            on_step(i + 1, loss)
    bytes_per_device = trainer.state_bytes_per_device(state)
    if out is not None:
        save(out, trainer, state, config, tokenizer, losses, title)
    return {"losses": losses, "first_step": first, "bytes_per_device": bytes_per_device, "out": out}
