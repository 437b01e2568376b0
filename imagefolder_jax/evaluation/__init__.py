"""Evaluation as the ADM evaluator defines it, in JAX.

  fid.py, inception_score.py, precision_recall.py   the metrics (FID / sFID, IS, precision / recall)
  scores.py          all of them from two sets of Inception features
  reference.py       ADM `.npz` reference batches (statistics, features, images)
  features.py        sharded Inception features of image streams
  images.py          image streams for evaluation ('folder:', 'tfds:', 'npz:', 'demo')
  image_metrics.py   PSNR / SSIM of reconstructions
  tokenizer.py       `eval-tokenizer`: reconstructions, rFID, PSNR, SSIM, codebook use
  generation.py      `eval-generator`'s sampling stage: resumable shards with their Inception features
  probe.py           linear probes on tokenizer features
"""
