"""Attention masks over the next-scale token sequence (docs/design.md §3).

Tokens run over scales in order and, within a scale, row-major over (h, w). A token sees every
token of its own scale and of earlier scales: the official `attn_bias_for_masking`
(0 where `scale(query) >= scale(key)`, -inf elsewhere) as a boolean keep-mask.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def scale_begin_ends(scales: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """[(begin, end)] token range of each scale in the flattened sequence (official `begin_ends`)."""
  out, cur = [], 0
  for side in scales:
    out.append((cur, cur + side * side))
    cur += side * side
  return tuple(out)


def scale_of_position(scales: Sequence[int]) -> np.ndarray:
  """(L,) int32: the scale index of every token (official `lvl_1L`)."""
  return np.concatenate([np.full((s * s,), i, np.int32) for i, s in enumerate(scales)])


def block_causal_mask(scales: Sequence[int]) -> np.ndarray:
  """(L, L) bool, True where query token i may attend to key token j: scale(i) >= scale(j)."""
  level = scale_of_position(scales)
  return level[:, None] >= level[None, :]
