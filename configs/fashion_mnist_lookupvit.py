"""Fashion-MNIST with LookupViT: 16 lookup tokens (a 4x4 pooled grid) carry the full-cost
attention and MLP; the 49 patch tokens only read from them through the shared cross-attention
and a narrower MLP.

    python train.py --config configs/fashion_mnist_lookupvit.py --workdir /tmp/fm_lookupvit

Same recipe as fashion_mnist_vit.py (width 64, 4 heads, 4 blocks, MLP ratio 2, 2 epochs of
batch 32 with AdamW 3e-3). The patch tokens' MLP has ratio 0.5 (the default mlp_ratio / 4).
"""

import os

from jax_tokens.train.schema import load_config


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.name = "lookupvit"
    config.model.num_lookup = 16
    return config
