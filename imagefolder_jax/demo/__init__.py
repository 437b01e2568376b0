"""The offline demo (`imagefolder-jax demo`): train on the built-in photo crops, then report.

  run.py     the two training stages (tokenizer, generator) and the pictures
  report.py  report.md / report.json: PSNR, codebook use, loss curves, class accuracy
"""
