"""Prompts to a padded batch, in numpy only: shared by ``Generator`` and the exported-program loader
(``bridge.exported``, which must run without torch), so both feed a program the same arrays."""

from __future__ import annotations

from typing import Sequence

import numpy as np

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
