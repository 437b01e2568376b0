"""From a bundle to images: the tokenizer and generator APIs and the programs behind them.

  tokenizer.py      `Tokenizer` (encode / decode / reconstruct) and `Codes` (ids per branch and scale)
  generator.py      `Generator`: class-conditional sampling with guidance, forced branches, logits
  sampling.py       the jitted next-scale sampler (top-k / top-p for both token streams)
  sample_runner.py  resumable, sharded sampling of many images into a directory (`sample --out-dir`)
"""
