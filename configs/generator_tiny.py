"""Tiny generator for tests (pair it with a bundle from configs/tokenizer_tiny.py)."""
import ml_collections

from configs import generator_demo


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = generator_demo.get_config()
  c.model = dict(depth=1, width=32, num_heads=2, mlp_ratio=2.0, num_classes=9, label_dropout=0.1,
                 drop_path_rate=0.0)
  c.optim.update(lr=3e-3, warmup_steps=1)
  c.data.update(batch_size=8, crops_per_class=4)
  # No TensorBoard: tests start many short runs, and its writer's TensorFlow import is 2-4 s each.
  c.train.update(num_steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=3, image_every=4, tensorboard=False)
  return c
