"""Fashion-MNIST ViT with PiToMe: energy-protected bipartite merging.

    python train.py --config configs/fashion_mnist_pitome.py --workdir /tmp/fm_pitome

Same recipe as fashion_mnist_vit.py and ToMe's token counts (50 -> 38 -> 26 -> 14 -> 8: r=12
per block, 6 in the last, where only 13 unprotected tokens enter). The energy margin follows
the paper's schedule over the 4 blocks (0.75 - 0.75 l / depth); proportional attention on, as
in configs/fashion_mnist_tome.py (the reference's ViT does not pass sizes to attention; this
recipe compares merging rules, not that choice). 1.01x the FLOPs of the ToMe config.
"""

import os

from jax_tokens.train.schema import load_config, reduction


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.reduction = reduction("pitome", r=(12, 12, 12, 6), prop_attn=True)
    return config
