"""Continuous batching over one lifted causal LM: the engine behind ``torchax-bridge serve``.

A fixed number of slots share one KV cache on the mesh ([slots, kv heads, columns, head dim] per
layer, or the scanned stack's one pair). Every decode step runs all slots through the same compiled
program (``programs.decode_step``, as ``generate`` runs it), whatever each slot's position:

  * one write column for every row, advancing by one per step. A request joins by running the
    bucketed prefill on its own (batch 1), then its keys and values are written into its slot's row
    so that its prompt ends right before the write column; its RoPE positions and its row of the key
    mask are its own. Attention never looks at where a key sits (RoPE is applied before caching;
    the mask says which columns a row sees), so rows of different ages live side by side.
  * the attention reads every column before the write column, so the write column is kept low:
    the cache and the mask move left (one copy program, any distance) when the columns before the
    oldest live request's first one reach ``SHIFT_AT``, or the write column reaches the end of the
    cache (``bucket(max_seq) + max_seq`` columns); they move right when a joining prompt's bucket
    does not fit before the write column. Only columns no live request sees fall off.
  * a recurrent layer's state (``StateCache``: Mamba, linear attention) has no columns: a joining
    request's row of it is replaced by the state after its prompt, and a move leaves it as it is.
  * sampling is per row (``generate.sample_rows``): temperature, top-k, top-p and seed are values,
    not program shapes, so mixing them never recompiles.

The engine runs in one thread of its own; ``submit`` hands it a ``Request`` and returns at once.
A request's events (its text pieces, then how it ended) arrive on the request's own queue, so any
front end (the HTTP server in ``bridge.server``, a test, a script) can consume them.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bridge import kv_cache, programs
from bridge.errors import GenerationError
from bridge.generate import Generator, Sampling, check_token_ids, sample_rows
from bridge.prompts import BUCKETS, left_pad

# The cache moves left once this many columns before every live request's first are dead: a move
# copies the cache once, and each step reads every column before the write column (SmolLM2 fp32, 8
# slots, --max-seq 512: a step took ~43 ms with the write column kept at 512-1024, against ~29 ms for
# generate's own loop).
SHIFT_AT = 128
QUEUE_SIZE = 64  # requests waiting for a slot beyond the slots themselves; more get "busy" (HTTP 429)


class Busy(GenerationError):
    """The waiting queue is full: try again later."""


@dataclasses.dataclass
class Event:
    """What a request hears: ``text`` pieces (with their ``token_ids``), then one final event with
    ``finish`` set ("stop": EOS or a stop string, "length": max_tokens, "error": see ``error``)."""

    text: str = ""
    token_ids: list = dataclasses.field(default_factory=list)
    finish: Optional[str] = None
    error: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclasses.dataclass
class Request:
    """One generation: prompt token ids, at most ``max_tokens`` new tokens, sampling values, stop
    strings. ``events`` receives its ``Event``s; ``cancel()`` (a client gone) frees its slot at the
    next step."""

    prompt_ids: list
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False  # decode max_tokens whatever comes (benchmarks; vLLM's extension)
    events: "queue.Queue[Event]" = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class _Slot:
    request: Request
    position: int  # the RoPE position of the token fed next
    token: int  # the token fed next (the last sampled)
    key: np.ndarray  # the request's PRNG key data
    first: int  # its first real cache column
    generated: list = dataclasses.field(default_factory=list)
    text: str = ""  # the text sent so far
    held: str = ""  # text withheld: it may be the start of a stop string
    prefix_offset: int = 0  # incremental detokenization: the context tokens start here ...
    read_offset: int = 0  # ... and the text up to here has been read


class Engine:
    """Slots of one KV cache, stepped together. ``slots`` rows; a request's prompt plus its new
    tokens must fit ``max_seq`` (and the model's context)."""

    def __init__(self, lifted, tokenizer=None, *, slots: int = 8, max_seq: int = 2048, queue_size: int = QUEUE_SIZE):
        self.gen = Generator(lifted, tokenizer, after_request=())  # tokenizer, EOS, pad id, compiled programs
        self.lifted, self.slots, self.max_seq = lifted, slots, max_seq
        if lifted.model.recompute_reason:
            raise GenerationError(f"the server's slots share one cache whose columns rows of different ages hold, and this "
                                  f"model decodes by recomputing its token history ({lifted.model.recompute_reason}); "
                                  f"run it with `generate`")  # fmt: skip
        self.context = min(max_seq, lifted.model.context_length)
        self.vocab = lifted.model.vocab_size
        self.eos = set(np.asarray(self.gen.eos).tolist()) - {-1}
        self.lead = next(b for b in BUCKETS if b >= self.context) if self.context <= BUCKETS[-1] else None
        if self.lead is None:
            raise GenerationError(f"--max-seq {max_seq} is beyond the longest prompt bucket ({BUCKETS[-1]})")
        self.columns = self.lead + self.context
        kv_cache.check_fits(lifted, slots, self.columns)
        self.waiting: "queue.Queue[Request]" = queue.Queue(maxsize=queue_size)
        self.active: dict[int, _Slot] = {}
        self.column = 0
        self.steps = 0
        self.shifts = 0  # times the cache moved
        self._seeds = itertools.count(1 << 20)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self._build()

    # -- the programs -------------------------------------------------------------------------
    def _build(self):
        from bridge.compile_cache import CompileStats

        self.gen.last_compile = CompileStats()
        lifted, w = self.lifted, self.lifted.weights
        self._replicated = NamedSharding(lifted.mesh, P())
        self.cache = jax.jit(lambda: kv_cache.empty(lifted, self.slots, self.columns))()
        self.key_mask = self._put(np.zeros((self.slots, self.columns), np.int32))
        rows = np.zeros(self.slots, np.int32)
        args = self._put(np.int32(0), rows, rows, rows.astype(np.float32), rows, rows.astype(np.float32),
                         np.zeros((self.slots, 2), np.uint32), rows)  # fmt: skip
        args = (w, self.cache, self.key_mask, *args)
        self._step = self.gen._compile("serve/step", self._step_program, args, donate=(1, 2))
        self._shift = self.gen._compile("serve/shift", self._shift_program, (self.cache, self.key_mask, self._put(np.int32(0))),
                                        donate=(0, 1))  # fmt: skip
        self._prefills: dict[int, tuple] = {}

    def _put(self, *arrays):
        """Host arrays replicated on the mesh (a few numbers per slot), as the programs take them."""
        from sharding import put_global

        placed = tuple(put_global(np.asarray(a), self._replicated) for a in arrays)
        return placed[0] if len(placed) == 1 else placed

    def _step_program(self, weights, cache, key_mask, column, token, positions, temperature, top_k, top_p, keys, count):
        """One token for every slot at ``column``: (cache, key_mask, next tokens [slots])."""
        key_mask = key_mask.at[:, column].set(1)  # every row sees its own new key (idle rows: only that)
        logits, cache = programs.decode_step(self.lifted, weights, token, cache, column, positions, key_mask)
        keys = jax.vmap(lambda k, c: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), c)))(keys, count)
        return cache, key_mask, sample_rows(logits, temperature, top_k, top_p, keys)

    def _shift_program(self, cache, key_mask, by):
        """Cache and mask moved ``by`` columns to the left (right when negative); the columns that
        come in are hidden (the ones that fall off are dead)."""
        cache = kv_cache.map_layers(lambda a: jnp.roll(a, -by, axis=a.ndim - 2), lambda a: a, cache)  # a state has no columns
        cols = jnp.arange(key_mask.shape[1])
        kept = (cols < key_mask.shape[1] - by) & (cols >= -by)
        return cache, jnp.where(kept[None, :], jnp.roll(key_mask, -by, axis=1), 0)

    def _move(self, by: int) -> None:
        """Everything ``by`` columns to the left (negative: right), the slots' first columns too."""
        self.cache, self.key_mask = self._shift(self.cache, self.key_mask, self._put(np.int32(by)))
        self.column -= by
        for slot in self.active.values():
            slot.first -= by
        self.shifts += 1

    def _prefill_programs(self, bucket: int):
        """(prefill of one prompt padded to ``bucket`` -> its first token and cache, the write of that
        cache into a slot's row ending before the write column), compiled once per bucket."""
        if bucket not in self._prefills:
            lifted, w = self.lifted, self.lifted.weights

            def prefill(weights, ids, positions, mask, temperature, top_k, top_p, key):
                cache = kv_cache.empty(lifted, 1, bucket)
                logits, cache = programs.prefill(lifted, weights, ids, cache, positions, mask)
                return cache, sample_rows(logits, temperature, top_k, top_p, key)

            def write(cache, key_mask, small, mask, row, column):
                start = column - bucket

                def put(big, one):  # [..., slots, heads, columns, dim] <- [..., 1, heads, bucket, dim]
                    at = [0] * big.ndim  # (an indexer's keys have no heads: [slots, columns, dim])
                    at[max(big.ndim - 4, 0)], at[big.ndim - 2] = row, start
                    return jax.lax.dynamic_update_slice(big, one.astype(big.dtype), at)

                def put_state(big, one):  # [slots, ...] <- [1, ...]: the row's state after its prompt
                    return jax.lax.dynamic_update_slice(big, one.astype(big.dtype), [row] + [0] * (big.ndim - 1))

                cache = kv_cache.map_layers(put, put_state, cache, small)
                # the row's earlier occupants' columns are hidden: only this prompt's are seen
                key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.zeros_like(key_mask[:1]), (row, 0))
                key_mask = jax.lax.dynamic_update_slice(key_mask, mask, (row, start))
                return cache, key_mask

            one = self._put(np.zeros((1, bucket), np.int32))
            knobs = self._put(np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32),
                              np.zeros((1, 2), np.uint32))  # fmt: skip
            run = self.gen._compile(f"serve/prefill/{bucket}", prefill, (w, one, one, one, *knobs))
            small, _ = run(w, one, one, one, *knobs)  # the write is compiled for the prefill's own output
            put = self.gen._compile(f"serve/write/{bucket}", write,
                                    (self.cache, self.key_mask, small, one, *self._put(np.int32(0), np.int32(0))),
                                    donate=(0, 1))  # fmt: skip
            self._prefills[bucket] = (run, put)
        return self._prefills[bucket]

    def warm(self) -> None:
        """Compiles the prefill of every prompt bucket up to ``max_seq`` now, not on first use."""
        for bucket in BUCKETS:
            if bucket <= self.lead:
                self._prefill_programs(bucket)

    # -- requests ------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Refuses what can never be served, with the reason (HTTP 400)."""
        ids = request.prompt_ids
        check_token_ids([ids], self.vocab)
        if not isinstance(request.max_tokens, int) or request.max_tokens < 1:
            raise GenerationError(f"max_tokens must be a positive integer, got {request.max_tokens!r}")
        if len(ids) + request.max_tokens > self.context:
            raise GenerationError(f"the prompt ({len(ids)} tokens) plus max_tokens ({request.max_tokens}) exceeds "
                                  f"this server's context of {self.context} tokens; shorten the prompt or lower "
                                  f"max_tokens")  # fmt: skip
        Sampling(request.temperature, request.top_k, request.top_p)  # its own checks, its own messages

    def submit(self, request: Request) -> Request:
        """Queues ``request`` (``Busy`` when the queue is full); its events arrive on ``request.events``."""
        self.check(request)
        if self.error is not None:
            raise GenerationError(f"the engine stopped: {self.error}")
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise Busy(f"{self.waiting.maxsize} requests are waiting already; retry later") from None
        self._wake.set()
        return request

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stops the loop: with ``drain``, after the requests in flight have finished (new ones are
        refused meanwhile by the front end); those still waiting get an error event."""
        if drain:
            deadline = time.monotonic() + timeout
            while self.active and time.monotonic() < deadline and self.error is None:
                time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for slot in list(self.active.values()):
            slot.request.events.put(Event(finish="error", error="the server is shutting down"))
        self.active.clear()
        while True:
            try:
                self.waiting.get_nowait().events.put(Event(finish="error", error="the server is shutting down"))
            except queue.Empty:
                break

    def _run(self):
        try:
            while not self._stop.is_set():
                self._admit()
                if not self.active:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._decode()
        except BaseException as e:  # the loop must not die silently: every request hears why
            self.error = e
            for slot in list(self.active.values()):
                slot.request.events.put(Event(finish="error", error=f"{type(e).__name__}: {e}"))
            self.active.clear()

    def _admit(self):
        free = [r for r in range(self.slots) if r not in self.active]
        while free and not self.waiting.empty():
            request = self.waiting.get_nowait()
            if request.cancelled.is_set():
                continue
            row = free.pop(0)
            self._join(row, request)

    def _join(self, row: int, request: Request):
        ids = list(request.prompt_ids)
        bucket = next(b for b in BUCKETS if b >= len(ids))
        run, put = self._prefill_programs(bucket)
        if not self.active:
            self.column = 0  # nothing live: the write column may start over
        if self.column < bucket:  # room for the prompt's bucket before the write column
            self._move(self.column - bucket)
        pids, positions, mask, _ = left_pad([ids], bucket, bucket, self.gen.pad_id)
        seed = request.seed if request.seed is not None else next(self._seeds)
        key = np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)
        small, first = run(self.lifted.weights, *self._put(pids, positions, mask, *self._knobs([request]), key[None]))
        self.cache, self.key_mask = put(self.cache, self.key_mask, small, *self._put(mask, np.int32(row), np.int32(self.column)))
        slot = _Slot(request, position=len(ids), token=int(np.asarray(first)[0]), key=key, first=self.column - len(ids))
        self.active[row] = slot
        self._emit(row, slot, slot.token)

    def _knobs(self, requests):
        return (np.asarray([r.temperature for r in requests], np.float32), np.asarray([r.top_k for r in requests], np.int32),
                np.asarray([r.top_p for r in requests], np.float32))  # fmt: skip

    def _decode(self):
        for row, slot in list(self.active.items()):
            if slot.request.cancelled.is_set():
                self._finish(row, slot, "cancelled")
        if not self.active:
            return
        dead = min(slot.first for slot in self.active.values())  # columns before every live one
        if dead >= SHIFT_AT or self.column >= self.columns:  # at the end: a request spans <= context
            self._move(dead)
        token = np.full(self.slots, self.gen.pad_id, np.int32)
        positions = np.zeros(self.slots, np.int32)
        count = np.zeros(self.slots, np.int32)
        keys = np.zeros((self.slots, 2), np.uint32)
        idle = Request(prompt_ids=[0])
        requests = [idle] * self.slots
        for row, slot in self.active.items():
            token[row], positions[row], count[row], keys[row] = slot.token, slot.position, len(slot.generated), slot.key
            requests[row] = slot.request
        args = self._put(np.int32(self.column), token, positions, *self._knobs(requests), keys, count)
        self.cache, self.key_mask, sampled = self._step(self.lifted.weights, self.cache, self.key_mask, *args)
        self.column += 1
        self.steps += 1
        sampled = np.asarray(sampled)
        for row, slot in list(self.active.items()):
            slot.position += 1
            slot.token = int(sampled[row])
            self._emit(row, slot, slot.token)

    def _emit(self, row: int, slot: _Slot, token: int):
        """Records ``token`` for ``slot``; sends the text that is final (not a possible stop-string
        start, not an incomplete character); ends the request on EOS, a stop string or max_tokens."""
        request = slot.request
        slot.generated.append(token)
        if token in self.eos and not request.ignore_eos:
            self._send(slot, slot.held, [token])
            return self._finish(row, slot, "stop")
        pending = slot.held + self._new_text(slot)
        hits = [(pending.find(s), s) for s in request.stop if s and s in pending]
        if hits:
            self._send(slot, pending[: min(hits)[0]], [token])
            return self._finish(row, slot, "stop")
        # a tail that could begin a stop string is withheld until it cannot
        keep = max((k for s in request.stop for k in range(1, min(len(s), len(pending) + 1))
                    if pending.endswith(s[:k])), default=0)  # fmt: skip
        slot.held = pending[len(pending) - keep:]
        self._send(slot, pending[: len(pending) - keep], [token])
        if len(slot.generated) >= request.max_tokens:
            self._send(slot, slot.held, [])
            return self._finish(row, slot, "length")

    def _new_text(self, slot: _Slot) -> str:
        """The text the last token adds, decoding only the tokens since the last piece and a few
        before them for context (decoding the whole answer every step cost O(n) per token), as vLLM
        and TGI do; an incomplete character (split over tokens) waits for the rest."""
        tokens = slot.generated
        before = self.gen.decode(tokens[slot.prefix_offset : slot.read_offset])
        now = self.gen.decode(tokens[slot.prefix_offset :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        slot.prefix_offset, slot.read_offset = slot.read_offset, len(tokens)
        return now[len(before) :]

    def _send(self, slot: _Slot, text: str, token_ids: list):
        if text or token_ids:
            slot.text += text
            slot.request.events.put(Event(text=text, token_ids=token_ids))

    def _finish(self, row: int, slot: _Slot, why: str):
        """Ends ``slot``'s request: "stop", "length" or "cancelled" (the client went away)."""
        slot.held = ""
        slot.request.events.put(Event(finish=why if why != "cancelled" else "error",
                                      error="cancelled" if why == "cancelled" else None,
                                      prompt_tokens=len(slot.request.prompt_ids),
                                      completion_tokens=len(slot.generated)))  # fmt: skip
        self.active.pop(row, None)

    # -- a blocking call, for scripts and tests ---------------------------------------------------
    def complete(self, request: Request, timeout: float = 600.0) -> tuple[str, list, str]:
        """(text, token ids, finish reason) of ``request``, waiting for it to end."""
        self.submit(request)
        text, ids = [], []
        while True:
            e = request.events.get(timeout=timeout)
            text.append(e.text)
            ids += e.token_ids
            if e.finish is not None:
                if e.finish == "error":
                    raise GenerationError(e.error or "failed")
                return "".join(text), ids, e.finish
