"""Generation on JAX over a lifted model_torch module.

* ``prefill``: prompts (left-padded to a length bucket) run once through the model, writing their
  keys/values into a preallocated KV cache that lives on the mesh (kv-head dim on the scheme's head
  axis); the first new token is sampled from the last column.
* ``decode_step``: one token for every row; its state (cache included) is donated, so a step
  allocates nothing new. The non-streaming path runs the whole loop on device in a
  ``jax.lax.while_loop`` (no Python round trip per token); streaming runs the same step from Python.
* Every jitted function is compiled ahead of time once per (batch, bucket, cache length, sampling
  mode: greedy / top-k / top-p on or off; temperature, k and p are traced values)
  and kept for the life of the ``Generator``, so later requests of the same shape never re-trace.

Left padding: every row's prompt ends at the same cache column, so one scalar ``cache_position``
serves the whole batch; each row's RoPE positions start at 0 at its first real token and the key
mask hides its padding.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bridge import host_memory, kv_cache, programs
from bridge.errors import GenerationError
from bridge.lift import Lifted
from bridge.prompts import NEW_TOKEN_BUCKET, ChatTokenizer, cut_at_eos, pad_prompts


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 (or top_k 1) is greedy. top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def mode(self) -> tuple[bool, bool, bool]:
        """What the compiled program must contain (greedy; a top-k filter; a top-p filter). The
        values themselves are traced arguments (``knobs``): a new temperature, k or p reuses the
        program compiled for its mode."""
        return (self.greedy, not self.greedy and self.top_k > 0, not self.greedy and self.top_p < 1.0)

    def knobs(self) -> dict:
        return {"temperature": np.float32(self.temperature or 1.0), "top_k": np.int32(self.top_k),
                "top_p": np.float32(self.top_p)}  # fmt: skip


def sample_logits(logits: jax.Array, key: jax.Array, s: Sampling, knobs: Optional[dict] = None) -> jax.Array:
    """[B, V] logits -> [B] token ids. ``s.mode`` decides the program; the values come from
    ``knobs`` (traced) when given, else from ``s``."""
    logits = logits.astype(jnp.float32)
    greedy, use_top_k, use_top_p = s.mode
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    k = s.knobs() if knobs is None else knobs
    logits = logits / k["temperature"]
    if use_top_k:
        # The k-th largest logit by a sort (k is a traced value, so lax.top_k's static k won't do).
        vocab = logits.shape[-1]
        ranked = -jnp.sort(-logits, axis=-1)
        kth = jax.lax.dynamic_index_in_dim(ranked, jnp.clip(k["top_k"], 1, vocab) - 1, axis=-1, keepdims=True)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        # Keep the smallest set of top tokens whose probability mass reaches top_p (always >= 1 token).
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(mass_before < k["top_p"], sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, temperature, top_k, top_p, keys) -> jax.Array:
    """[B, V] logits -> [B] token ids with each row's own sampling values ([B] each; ``keys`` [B, 2]
    raw key data): temperature 0 or top_k 1 is greedy, top_k 0 and top_p 1 switch those filters
    off. The values are traced, so a batch of mixed settings runs one program (``bridge.serving``);
    the sort the filters need runs only when some row samples."""
    logits = logits.astype(jnp.float32)
    greedy = (temperature == 0) | (top_k == 1)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(_):
        vocab = logits.shape[-1]
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        ranked = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
        ranked = jnp.where(ranked < kth, -jnp.inf, ranked)
        # top-p: the smallest set of top tokens whose mass reaches top_p (always >= 1 token)
        probs = jax.nn.softmax(ranked, axis=-1)
        kept = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1.0)
        floor = jnp.min(jnp.where(kept & (ranked > -jnp.inf), ranked, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < floor, -jnp.inf, scaled)
        draw = jax.vmap(lambda key, row: jax.random.categorical(jax.random.wrap_key_data(key), row))(keys, scaled)
        return jnp.where(greedy, argmax, draw.astype(jnp.int32))

    return jax.lax.cond(jnp.all(greedy), lambda _: argmax, sampled, None)


@dataclasses.dataclass
class Generation:
    """What a request returns, token ids in or text in: each row's prompt ids and new tokens (cut
    after EOS), their text, and the request's timings (one batch, one set of timings)."""

    prompt_ids: list[list[int]]
    token_ids: list[list[int]]
    texts: list[str]  # decoded new tokens (the ids joined by spaces without a tokenizer)
    prompts: list[str]  # the prompts as text (decoded, or the ids joined, when ids came in)
    prefill_seconds: float
    compile_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    steps: int
    compile_detail: str = ""  # trace / lower / compile seconds and what came from a cache
    truncated_to: Optional[int] = None  # the prompts were left-truncated to at most this many tokens

    def rows(self) -> list[dict]:
        """One JSON-ready dict per row: its prompt, ids, new tokens and text, with the timings."""
        timings = dict(prefill_seconds=self.prefill_seconds, compile_seconds=self.compile_seconds,
                       decode_seconds=self.decode_seconds, decode_tokens_per_second=self.decode_tokens_per_second,
                       compile_detail=self.compile_detail, truncated_to=self.truncated_to)  # fmt: skip
        return [dict(prompt=p, prompt_ids=pi, token_ids=t, text=x, **timings)
                for p, pi, t, x in zip(self.prompts, self.prompt_ids, self.token_ids, self.texts)]  # fmt: skip


def check_token_ids(rows: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Every id must index the embedding: out-of-range ids would be clamped silently under jit."""
    for r, row in enumerate(rows):
        if not len(row):
            raise GenerationError(f"prompt row {r} has no token ids; give at least one")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} (row {r}) is outside this model's vocabulary [0, {vocab_size}); "
                                  f"pass ids below {vocab_size}")  # fmt: skip


class Generator:
    def __init__(
        self,
        lifted: Lifted,
        tokenizer=None,
        *,
        eos_token_ids: Sequence[int] = (),
        pad_id: int = 0,
        stop_at_eos: bool = True,
        after_request: Optional[Sequence[Callable[[Generation], None]]] = None,
    ):
        """``tokenizer`` defaults to the one ``lifted`` was opened with. ``stop_at_eos=False`` decodes
        exactly ``max_new_tokens`` for every row (benchmarks). ``after_request``: hooks called with
        each finished ``Generation``; by default one that moves the weights to huge pages after the
        first request (``host_memory.HugePagesAfterFirstRequest``); ``()`` for none."""
        self.lifted = lifted
        self.tokenizer = tokenizer if tokenizer is not None else lifted.tokenizer
        tokenizer = self.tokenizer
        self.text = ChatTokenizer(tokenizer)  # prompts to ids and back: not the generator's job
        self.encode, self.decode = self.text.encode, self.text.decode
        self.model = lifted.model
        if not self.model.HAS_KV_CACHE:
            raise GenerationError(
                f"{type(self.model).__name__} has no functional KV cache; generation needs a model_torch "
                f"model (llama, mistral, qwen2, mixtral, gpt_neox, grok)"
            )
        config = self.model.config
        self.context = self.model.context_length
        eos = set(eos_token_ids)
        for e in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)) if stop_at_eos else ():
            if isinstance(e, int):
                eos.add(e)
            elif isinstance(e, (list, tuple)):
                eos.update(e)
        self.eos = jnp.asarray(sorted(eos) or [-1], dtype=jnp.int32)
        self.pad_id = pad_id if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self._compiled: dict = {}
        self.after_request = (
            [host_memory.HugePagesAfterFirstRequest(lifted.weights)] if after_request is None else list(after_request)
        )
        self.last_compile_seconds = 0.0
        self.last_compile = None  # compile_cache.CompileStats of the last request

    # -- building blocks (pure JAX) --------------------------------------------------------------
    def _prefill(self, weights, ids, positions, key_mask, pads, seed, limit, knobs, *, cache_len: int, n_out: int, sampling: Sampling):
        """Runs the prompts, samples the first token, and returns the whole decode state (built
        inside the jitted program, so every piece of it lives on the mesh)."""
        batch, plen = ids.shape
        cache = kv_cache.empty(self.lifted, batch, cache_len)
        logits, cache = programs.prefill(self.lifted, weights, ids, cache, positions, key_mask)
        key = jax.random.key(seed)
        token = sample_logits(logits, key, sampling, knobs)
        return dict(
            knobs=knobs,
            cache=cache,
            token=token,
            column=jnp.asarray(plen, jnp.int32),
            positions=(plen - pads).astype(jnp.int32),
            key_mask=key_mask,
            done=jnp.isin(token, self.eos),
            out=jnp.full((batch, n_out), self.pad_id, jnp.int32).at[:, 0].set(token),
            step=jnp.asarray(1, jnp.int32),
            limit=limit,
            key=jax.random.key_data(jax.random.fold_in(key, 1)),  # raw uint32: the state crosses jax.export
        )

    def _decode_step(self, weights, state, *, sampling: Sampling):
        """One token for every row. state: cache, token [B] (last sampled), column (its cache column),
        positions [B] (its RoPE positions), key_mask [B, S], done [B], out [B, N], step, limit, key."""
        logits, cache = programs.decode_step(
            self.lifted, weights, state["token"], state["cache"], state["column"], state["positions"], state["key_mask"]
        )
        step = state["step"]
        key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), step)
        token = sample_logits(logits, key, sampling, state["knobs"])
        token = jnp.where(state["done"], self.pad_id, token)
        done = state["done"] | jnp.isin(token, self.eos)
        return dict(
            state,
            cache=cache,
            token=token,
            column=state["column"] + 1,
            positions=state["positions"] + 1,
            done=done,
            out=state["out"].at[:, step].set(token),
            step=step + 1,
        )

    def _decode_loop(self, weights, state, *, sampling: Sampling):
        def cond(st):
            return (st["step"] < st["limit"]) & ~jnp.all(st["done"])

        def body(st):
            # The weights pass an optimization barrier together with the step counter, so nothing
            # computed from them is loop-invariant: otherwise XLA hoists every int8/bf16 -> f32
            # weight conversion out of the loop and each step reads f32 copies of all weights
            # instead of converting inside the matrix-vector loops. SmolLM2, 64 new tokens: int8
            # 42.8 -> ~130 tokens/s, bf16 31 -> ~87 (fp32 ~50, unchanged).
            w, _ = jax.lax.optimization_barrier((weights, st["step"]))
            return self._decode_step(w, st, sampling=sampling)

        return jax.lax.while_loop(cond, body, state)

    # -- compiling ------------------------------------------------------------------------------
    def _compile(self, name: str, fn, args, donate=()):
        """Compiled once per program name and argument shapes for the life of the Generator, and
        through ``compile_cache`` across processes (a second run traces and compiles nothing)."""
        from bridge import compile_cache

        key = (name, str(jax.tree.map(lambda a: (a.shape, str(a.dtype)), args[1:])))
        if key not in self._compiled:
            lifted = self.lifted
            context = (repr(lifted.model), repr(lifted.model.config), repr(lifted.scheme), lifted.kv_head_copies,
                       np.asarray(self.eos).tolist(), self.pad_id)  # fmt: skip
            compiled, stats = compile_cache.compile_program(name, fn, args, donate=donate, context=context)
            self._compiled[key] = compiled
            self.last_compile.add(stats)
            self.last_compile_seconds += stats.total_s
        return self._compiled[key]

    # -- public API -----------------------------------------------------------------------------
    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        on_token: Optional[Callable[[np.ndarray], None]] = None,
        truncate: bool = False,
        prompts: Optional[Sequence[str]] = None,
    ) -> Generation:
        """Generates for a batch of token-id prompts. ``on_token(tokens[B])`` streams each step
        (then the loop runs from Python); otherwise the decode loop runs on device."""
        from bridge.compile_cache import CompileStats

        self.last_compile_seconds = 0.0
        self.last_compile = CompileStats()
        padded = pad_prompts(prompt_ids, max_new_tokens, self.context, self.pad_id, truncate)
        ids, positions, key_mask, pads, cache_len = padded.ids, padded.positions, padded.key_mask, padded.pads, padded.cache_len
        batch, plen = ids.shape
        kv_cache.check_fits(self.lifted, batch, cache_len)  # before compiling, not an XLA OOM minutes later
        in_shard = self.lifted.input_sharding(batch)
        from sharding import put_global, to_host

        ids_d, pos_d, mask_d = (put_global(a, in_shard) for a in (ids, positions, key_mask))
        replicated = NamedSharding(self.lifted.mesh, P())
        pads_d = put_global(pads.astype(np.int32), replicated)
        seed_d = put_global(np.asarray(seed, np.uint32), replicated)
        limit_d = put_global(np.asarray(max_new_tokens, np.int32), replicated)
        knobs_d = {k: put_global(np.asarray(v), replicated) for k, v in sampling.knobs().items()}
        w = self.lifted.weights
        n_out = -(-max_new_tokens // NEW_TOKEN_BUCKET) * NEW_TOKEN_BUCKET

        prefill = self._compile(
            f"prefill/{cache_len}/{n_out}/{sampling.mode}",
            lambda w, *a: self._prefill(w, *a, cache_len=cache_len, n_out=n_out, sampling=sampling),
            (w, ids_d, pos_d, mask_d, pads_d, seed_d, limit_d, knobs_d),
        )
        t0 = time.perf_counter()
        state = prefill(w, ids_d, pos_d, mask_d, pads_d, seed_d, limit_d, knobs_d)
        jax.block_until_ready(state["token"])
        prefill_s = time.perf_counter() - t0

        if on_token is None:
            loop = self._compile(
                f"loop/{sampling.mode}", lambda w, s: self._decode_loop(w, s, sampling=sampling), (w, state), donate=(1,)
            )
            t0 = time.perf_counter()
            state = loop(w, state)
            out = to_host(state["out"])
            steps = int(to_host(state["step"]))
        else:
            step_fn = self._compile(
                f"step/{sampling.mode}", lambda w, s: self._decode_step(w, s, sampling=sampling), (w, state), donate=(1,)
            )
            on_token(to_host(state["token"]))
            t0 = time.perf_counter()
            steps = 1
            while steps < max_new_tokens and not bool(np.all(to_host(state["done"]))):
                state = step_fn(w, state)
                steps += 1
                on_token(to_host(state["token"]))
            out = to_host(state["out"])
        decode_s = time.perf_counter() - t0
        tokens = cut_at_eos(out, steps, np.asarray(self.eos).tolist())
        decoded = (steps - 1) * batch
        result = Generation(
            prompt_ids=padded.prompt_ids,
            token_ids=tokens,
            texts=[self.decode(t) for t in tokens],
            prompts=list(prompts) if prompts is not None else [self.decode(p) for p in padded.prompt_ids],
            prefill_seconds=prefill_s,
            compile_seconds=self.last_compile_seconds,
            compile_detail=self.last_compile.describe(),
            decode_seconds=decode_s,
            decode_tokens_per_second=decoded / decode_s if decode_s > 0 and decoded else 0.0,
            steps=steps,
            truncated_to=padded.truncated_to,
        )
        for hook in self.after_request:
            hook(result)
        return result

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        chat: bool = False,
        stream: Optional[Callable[[int, str], None]] = None,
        truncate: bool = False,
    ) -> Generation:
        """Text in, text out. ``stream(row, text_piece)`` is called as tokens arrive."""
        prompt_ids = [self.encode(p, chat) for p in prompts]
        return self.generate_from_ids(prompt_ids, max_new_tokens, sampling, seed, stream, truncate, prompts)

    def generate_from_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 64,
        sampling: Sampling = Sampling(),
        seed: int = 0,
        stream: Optional[Callable[[int, str], None]] = None,
        truncate: bool = False,
        prompts: Optional[Sequence[str]] = None,
    ) -> Generation:
        """Token ids in (no tokenizer needed), with ``stream(row, text_piece)`` called as tokens
        arrive; texts are decoded when the model has a tokenizer and the ids joined by spaces when
        it has none."""
        check_token_ids(prompt_ids, self.model.vocab_size)
        on_token = None
        if stream is not None:
            so_far: list[list[int]] = [[] for _ in prompt_ids]
            printed = [""] * len(prompt_ids)
            finished = [False] * len(prompt_ids)
            eos = set(np.asarray(self.eos).tolist())

            def on_token(tokens: np.ndarray):
                for r, t in enumerate(tokens.tolist()):
                    if finished[r]:
                        continue
                    finished[r] = t in eos
                    so_far[r].append(t)
                    text = self.decode(so_far[r])
                    if len(text) > len(printed[r]) and not text.endswith("\ufffd"):
                        stream(r, text[len(printed[r]) :])
                        printed[r] = text

        return self.generate_ids(prompt_ids, max_new_tokens, sampling, seed, on_token, truncate, prompts)

    def stream(self, prompt: str, **kw) -> Iterator[str]:
        """Iterator over text pieces of one prompt as they are generated (runs in a worker thread)."""
        import queue
        import threading

        q: "queue.Queue[Optional[str]]" = queue.Queue()
        errors = []

        def work():
            try:
                self.generate([prompt], stream=lambda r, piece: q.put(piece), **kw)
            except Exception as e:  # surfaced to the consumer below
                errors.append(e)
            finally:
                q.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (piece := q.get()) is not None:
            yield piece
        if errors:
            raise errors[0]
