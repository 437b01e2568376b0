"""ImageFolder tokenizer, the released MSVR10P2-4096 recipe on ImageNet-256 (paper §4.1, docs/design.md §2).

  imagefolder-jax train-tokenizer --config configs/tokenizer_imagenet.py --workdir runs/tok \
      --config.data.data_dir=/data/tfds --config.init.dinov2=/weights/dinov2_vitb14_pretrain.pth \
      --config.loss.semantic_teacher=/weights/dinov2_vitb14_pretrain.pth \
      --config.loss.disc_features=/weights/dino_vits16.pth
"""
import ml_collections

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "bfloat16"
  c.model = dict(
      vit=dict(width=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16, image_size=256),
      quantizer=dict(codebook_size=4096, latent_dim=32, scales=(1, 1, 2, 3, 3, 4, 5, 6, 8, 11), num_phi=4,
                     phi_ratio=0.5, beta=0.25, codebook_update="ema", ema_decay=0.99, dead_code_threshold=0.01),
      num_branches=2, dropout_start=3, dropout_fraction=0.1)
  c.init = dict(dinov2="")  # local DINOv2-B checkpoint (timm / facebookresearch / HF) for encoder+decoder
  c.loss = dict(
      l2=1.0, lpips=1.0, lpips_weights="", vq=1.0,
      lpips_precision="default",  # the VGG's convolutions: default (1 bf16 pass on TPU, TF32 on GPU) / high / highest
      semantic=0.1, semantic_teacher="",  # DINOv2-B file, "bundle:DIR" (official bundle) or "random"
      gan=0.5, gan_start=0, discriminator="dino", disc_features="",  # DINO ViT-S/16 checkpoint
      lecam=0.001, lecam_decay=0.999, adaptive_max=1e4)
  batch = 1024
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
  c.optim = dict(lr=2.4e-4, b1=0.9, b2=0.95, weight_decay=0.0, disc_lr=8e-4, disc_weight_decay=5e-4,
                 warmup_steps=steps_per_epoch, schedule="cosine", clip_norm=0.0, ema_decay=0.9999)
  c.data = dict(source="tfds:imagenet2012", data_dir="", split="train", batch_size=batch, worker_count=8,
                crops_per_class=64)
  c.train = dict(num_steps=200 * steps_per_epoch, log_every=100, checkpoint_every=2000, keep_checkpoints=3,
                 image_every=2000, async_checkpoints=True,
                 tensorboard=True,   # clu's TensorBoard writer (imports TensorFlow: 2-4 s of start-up)
                 remat="none",   # per-block rematerialisation: none / dots_saveable / full
                 grad_accum=1)   # microbatches per step (generator only; same result as the large batch)
  # Axis sizes inside a slice/node (data, fsdp, tensor) times across slices/nodes (dcn_*); `rules`
  # ((logical, mesh axes), ...) override parallel.LOGICAL_RULES; frozen networks below
  # frozen_replicate_below_mb are replicated, larger ones split over fsdp.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, rules=(),
                frozen_replicate_below_mb=512)
  return c
