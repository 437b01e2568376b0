"""Next-scale generator, the released VAR-d17 recipe on ImageNet-256 (docs/design.md §3).

  imagefolder-jax train-generator --config configs/generator_imagenet.py --workdir runs/gen \
      --config.tokenizer_bundle=runs/tok/bundle --config.data.data_dir=/data/tfds
"""
import ml_collections

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = "bfloat16"
  c.tokenizer_bundle = ""
  depth = int(arg) if arg else 17
  c.model = dict(depth=depth, mlp_ratio=4.0, num_classes=1000, label_dropout=0.1)
  batch = 768
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // batch
  c.optim = dict(lr=2.4e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_steps=3 * steps_per_epoch,
                 schedule="linear", end_factor=0.01, clip_norm=2.0, ema_decay=0.9999)
  c.data = dict(source="tfds:imagenet2012", data_dir="", split="train", batch_size=batch, worker_count=8,
                crops_per_class=64)
  c.train = dict(num_steps=350 * steps_per_epoch, log_every=100, checkpoint_every=2000, keep_checkpoints=3,
                 image_every=5000, async_checkpoints=True,
                 tensorboard=True,   # clu's TensorBoard writer (imports TensorFlow: 2-4 s of start-up)
                 remat="none",   # per-block rematerialisation: none / dots_saveable / full
                 grad_accum=1,   # microbatches per step (generator only; same result as the large batch)
                 attention_kernel="auto")   # auto: fused attention kernels on TPUs; xla: XLA's
  # Axis sizes inside a slice/node (data, fsdp, tensor) times across slices/nodes (dcn_*); `rules`
  # ((logical, mesh axes), ...) override parallel.LOGICAL_RULES; frozen networks below
  # frozen_replicate_below_mb are replicated, larger ones split over fsdp.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1, rules=(),
                frozen_replicate_below_mb=512)
  return c
