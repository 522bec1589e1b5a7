"""Fashion-MNIST ViT with Token Cropr: learned-query scorers prune 17, then 16 tokens; the
pruned tokens rejoin before the last block (the paper's last-layer fusion, LLF).

    python train.py --config configs/fashion_mnist_cropr.py --workdir /tmp/fm_cropr

Same recipe as fashion_mnist_vit.py, plus Cropr's auxiliary losses (each module's head:
cross-entropy on the labels, weight 1, gradients stopped into the backbone). The reference's
module (1 query, 1 head, no projections, an MLP) after blocks 0 and 1: 50 -> 33 -> 17 tokens
entering blocks 1 and 2, all 50 again in block 3 (0.75x the unreduced FLOPs).
"""

import os

from jax_tokens.train.schema import load_config, reduction


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.reduction = reduction("cropr", rate=16, llf=True)
    return config
