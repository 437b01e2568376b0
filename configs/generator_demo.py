"""Small generator for the offline CPU demo (9 classes of built-in photo crops)."""
import ml_collections

from configs import generator_imagenet


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = generator_imagenet.get_config()
  c.dtype = "float32"
  c.model = dict(depth=4, width=192, num_heads=4, mlp_ratio=4.0, num_classes=9, label_dropout=0.1,
                 drop_path_rate=0.0)
  c.optim.update(lr=1e-3, warmup_steps=30, weight_decay=0.01, ema_decay=0.99)
  # The demo pre-tokenizes these crops once (train/demo.py): 128 per class, as they get no augmentation.
  c.data = dict(source="demo", data_dir="", split="train", batch_size=32, worker_count=0, crops_per_class=128)
  # 400 steps (from 600) pay for the tokenizer's extra ones; the samples' class accuracy had margin.
  # No sample grids while training: each compiles the sampler on CPU; the report samples at the end.
  c.train.update(num_steps=400, log_every=50, checkpoint_every=200, keep_checkpoints=2, image_every=0)
  return c
