"""Tiny tokenizer for tests: 32 px, one ViT block, every loss switched on with random frozen nets."""
import ml_collections

from configs import tokenizer_demo


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = tokenizer_demo.get_config()
  c.model = dict(
      vit=dict(width=32, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=8, image_size=32),
      quantizer=dict(codebook_size=64, latent_dim=8, scales=(1, 2, 4), num_phi=2, phi_ratio=0.5, beta=0.25,
                     codebook_update="ema", ema_decay=0.9, dead_code_threshold=0.01),
      num_branches=2, dropout_start=1, dropout_fraction=0.25)
  gan = arg != "nogan"
  c.loss.update(lpips=0.1 if gan else 0.0, semantic=0.1 if gan else 0.0, semantic_teacher="random",
                gan=0.1 if gan else 0.0, gan_start=0, discriminator="patchgan", patchgan_features=8)
  c.optim.update(lr=2e-3, warmup_steps=2)
  c.data = dict(source="demo", data_dir="", split="train", batch_size=8, worker_count=0, crops_per_class=4)
  # No TensorBoard: tests start many short runs, and its writer's TensorFlow import is 2-4 s each.
  c.train.update(num_steps=6, log_every=2, checkpoint_every=2, keep_checkpoints=3, image_every=0, tensorboard=False)
  return c
