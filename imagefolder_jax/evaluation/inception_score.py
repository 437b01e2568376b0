"""Inception Score as the ADM evaluator computes it: softmax of pool_3 @ W (no bias), splits of 5,000."""
from __future__ import annotations

import numpy as np

ADM_SPLIT_SIZE = 5000


def softmax(logits: np.ndarray) -> np.ndarray:
  """(N, K) float32 logits -> probabilities, in float32 as TF's softmax."""
  logits = np.asarray(logits, np.float32)
  shifted = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(shifted)
  return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def inception_score(probabilities: np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> float:
  """mean over consecutive splits of `split_size` rows of exp(E_x KL(p(y|x) || p(y))).

  ADM splits by size (50,000 samples -> 10 splits of 5,000); the last split may be shorter.
  """
  preds = np.asarray(probabilities)
  if preds.ndim != 2 or preds.shape[0] == 0:
    raise ValueError(f"inception_score needs (N, K) probabilities, got shape {preds.shape}")
  if split_size < 1:
    raise ValueError(f"split_size must be >= 1, got {split_size}")
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return float(np.mean(scores))
