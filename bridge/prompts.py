"""Prompts, before and after a generation program runs, in numpy only: text to token ids (the
tokenizer and its chat template), token ids to a padded batch (buckets, left padding, truncation),
and the sampled tokens back to rows cut at EOS. Shared by ``Generator`` and the exported-program
loader (``bridge.exported``, which must run without torch), so both feed a program the same arrays."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from bridge.errors import GenerationError

# Prompt lengths are left-padded up to one of these, so nearby lengths share a compile.
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
NEW_TOKEN_BUCKET = 32  # cache lengths are rounded up to this, so nearby max_new_tokens share a compile


def cache_length(bucket: int, max_new_tokens: int) -> int:
    """KV-cache columns for prompts padded to ``bucket`` and up to ``max_new_tokens`` new tokens."""
    return bucket + -(-max_new_tokens // NEW_TOKEN_BUCKET) * NEW_TOKEN_BUCKET


def left_pad(prompt_ids: Sequence[Sequence[int]], bucket: int, cache_len: int, pad_id: int):
    """Rows left-padded to ``bucket`` -> (ids [B, bucket], RoPE positions [B, bucket] counting from
    each row's first real token, key_mask [B, cache_len] (0 on padding), pads [B])."""
    batch = len(prompt_ids)
    ids = np.full((batch, bucket), pad_id, dtype=np.int32)
    key_mask = np.ones((batch, cache_len), dtype=np.int32)
    positions = np.zeros((batch, bucket), dtype=np.int32)
    pads = []
    for r, p in enumerate(prompt_ids):
        pad = bucket - len(p)
        ids[r, pad:] = p
        key_mask[r, :pad] = 0
        positions[r, pad:] = np.arange(len(p))
        pads.append(pad)
    return ids, positions, key_mask, np.asarray(pads)


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """Prompts left-padded to one bucket, as the prefill program takes them."""

    prompt_ids: list[list[int]]  # each row as it went in (after truncation)
    ids: np.ndarray  # [B, bucket]
    positions: np.ndarray  # [B, bucket] RoPE positions from each row's first real token
    key_mask: np.ndarray  # [B, cache_len], 0 on padding
    pads: np.ndarray  # [B]
    cache_len: int
    truncated_to: Optional[int] = None  # every row was left-truncated to at most this many tokens


def pad_prompts(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, context: int, pad_id: int,
                truncate: bool = False) -> PaddedBatch:  # fmt: skip
    """Left-pads the prompts to one bucket, with room for ``max_new_tokens`` within ``context``
    (RoPE positions stay inside it; cache columns may run past it, on padding). A prompt that does
    not fit is an error, or with ``truncate`` keeps its last tokens (said in the result)."""
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= context:
        raise GenerationError(f"max_new_tokens {max_new_tokens} overflows the model context ({context} tokens); "
                              f"ask for at most {context - 1}")  # fmt: skip
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise GenerationError("a prompt has no tokens; give a non-empty prompt")
    keep = min(context - max_new_tokens, BUCKETS[-1])
    rows = [list(p) for p in prompt_ids]
    longest, truncated = max(len(p) for p in rows), None
    if longest > keep:
        if not truncate:
            raise GenerationError(
                f"prompt is {longest} tokens; with max_new_tokens {max_new_tokens} at most {keep} fit the "
                f"model context ({context}): shorten it, lower max_new_tokens, or pass --truncate "
                f"to keep its last {keep} tokens"
            )
        rows = [p[-keep:] for p in rows]
        longest = truncated = keep
    bucket = next(b for b in BUCKETS if b >= longest)
    cache_len = cache_length(bucket, max_new_tokens)
    ids, positions, key_mask, pads = left_pad(rows, bucket, cache_len, pad_id)
    return PaddedBatch(rows, ids, positions, key_mask, pads, cache_len, truncated)


def cut_at_eos(out: np.ndarray, steps: int, eos: Sequence[int], rows: Optional[int] = None) -> list[list[int]]:
    """The first ``steps`` sampled tokens of each of the first ``rows`` rows of ``out`` [B, N], each
    cut after its first EOS (kept)."""
    stop = set(int(e) for e in eos)
    result = []
    for r in range(out.shape[0] if rows is None else rows):
        toks = out[r, :steps].tolist()
        end = next((i + 1 for i, t in enumerate(toks) if t in stop), len(toks))
        result.append(toks[:end])
    return result


NO_TOKENIZER = "this checkpoint has no tokenizer; pass --input-ids (token ids) instead of text"


class ChatTokenizer:
    """Text to token ids and back with a transformers tokenizer (or none: ids only), the chat
    template applied on request."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise GenerationError(NO_TOKENIZER)
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        ids = list(self.tokenizer.encode(prompt))
        if not ids:
            raise GenerationError(f"prompt {prompt!r} tokenizes to no tokens; give a non-empty prompt")
        return ids

    def encode_messages(self, messages: Sequence[dict]) -> list[int]:
        """A conversation (``[{"role": ..., "content": ...}, ...]``) through the chat template, with
        the assistant's turn opened."""
        if self.tokenizer is None:
            raise GenerationError(NO_TOKENIZER)
        if not getattr(self.tokenizer, "chat_template", None):
            raise GenerationError("this tokenizer has no chat template; send a plain prompt (drop --chat)")
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        if not ids:
            raise GenerationError("the conversation tokenizes to no tokens")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens dropped); without a tokenizer, the ids joined by spaces."""
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
