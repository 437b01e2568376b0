"""Evaluation as the ADM evaluator defines it, in JAX: FID, sFID, Inception Score, precision/recall
(modules `fid`, `inception_score`, `precision_recall`), ADM `.npz` batches (`reference`), sharded
Inception features (`features`), image streams (`images`), and the tokenizer / generator /
linear-probe evaluations built on them."""
