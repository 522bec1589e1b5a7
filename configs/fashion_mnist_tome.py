"""Fashion-MNIST ViT with ToMe: bipartite soft matching merges r tokens in every block.

    python train.py --config configs/fashion_mnist_tome.py --workdir /tmp/fm_tome

Same recipe as fashion_mnist_vit.py. With r=12 the 50 tokens go 50 -> 38 -> 26 -> 14 -> 8
over the 4 blocks: the last block can merge only 6 of its 13 unprotected tokens, so r is
clamped there as ToMe does (clamp_r=True; without it such an r is an error naming the block).
Proportional attention (log size added to the logits) as in ToMe.
"""

import os

from jax_tokens.train.schema import load_config, reduction


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.reduction = reduction("tome", r=12, prop_attn=True, clamp_r=True)
    return config
