"""DeiT-S/16 on ImageNet-1k (DeiT's recipe without distillation, mixup or RandAugment).

    python train.py --config configs/imagenet_deit_s.py --workdir gs://... \
        --config.data.data_dir=/path/to/tensorflow_datasets
    python train.py --config configs/imagenet_deit_s.py:tome ...     # ToMe, r=13
    python train.py --config configs/imagenet_deit_s.py:evit ...     # EViT, keep 0.7 at 3, 6, 9

Needs `imagenet2012` prepared in array_record format in the data dir (see jax_tokens.data).
The argument picks the reducer: "" / "none" (baseline), "tome", "evit" or "lookup".
"""

from jax_tokens.train.schema import ConfigError, default_config, reduction

# The argument -> (the reducer, the budget warm-up); `depth` is filled in by set_reducer.
PRESETS = {
    "none": (lambda depth: reduction("none"), {}),
    "tome": (lambda depth: reduction("tome", r=13, prop_attn=True, clamp_r=True), {}),
    "evit": (lambda depth: reduction("evit", keep_rate=0.7, fuse=True,
                                     layers=(depth // 4, depth // 2, 3 * depth // 4)),
             dict(fraction=1 / 3, start_fraction=1 / 30, levels=4)),
    "lookup": (lambda depth: reduction("token_learner", layers=(3,), num_tokens=32), {}),
}


def set_reducer(config, preset: str, depth: int = 12) -> None:
    """Applies one of PRESETS to config (ToMe r=13 clamped as ToMe; EViT 0.7 at 1/4, 1/2, 3/4
    depth with a cosine keep-rate warm-up over 1/3 of training; TokenLearner 32 tokens at
    block 3)."""
    if preset not in PRESETS:
        raise ConfigError(f"config argument {preset!r} is not one of {tuple(PRESETS)}")
    make, warmup = PRESETS[preset]
    config.model.reduction = make(depth)
    config.budget_warmup.update(warmup)


def get_config(arg=None):
    config = default_config()
    config.seed = 0
    m = config.model
    m.img_size, m.patch_size, m.in_chans, m.num_classes = 224, 16, 3, 1000
    m.embed_dim, m.depth, m.num_heads, m.mlp_ratio = 384, 12, 6, 4.0
    m.dtype = "bfloat16"

    config.data.name = "imagenet2012"
    config.data.augment = True
    config.data.worker_count = 8

    t = config.train
    t.batch_size = 1024
    t.epochs = 300.0
    t.lr = 5e-4 * t.batch_size / 512        # DeiT's linear scaling rule
    t.min_lr = 1e-5
    t.warmup_epochs = 5.0
    t.weight_decay = 0.05
    t.label_smoothing = 0.1
    t.grad_clip = 1.0
    t.log_every = 100

    config.eval.batch_size = 1000
    config.eval.every_steps = 5000
    config.checkpoint.every_steps = 2000
    config.checkpoint.keep = 3
    set_reducer(config, arg or "none", depth=m.depth)
    return config
