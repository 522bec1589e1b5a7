"""Fashion-MNIST ViT with MCTF: multi-criteria token fusion with one-step-ahead attention.

    python train.py --config configs/fashion_mnist_mctf.py --workdir /tmp/fm_mctf

Same recipe as fashion_mnist_vit.py. r=12 tokens fused per block (50 -> 38 -> 26 -> 14 -> 10:
the last block is clamped as ToMe's is), with the reference's temperatures (similarity 1,
informativeness 20, size 40), bidirectional matching and attention-weighted pooling; the
attention that scores informativeness is the next block's, computed one step ahead. 0.96x
the FLOPs of configs/fashion_mnist_tome.py.
"""

import os

from jax_tokens.train.schema import load_config, reduction


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.reduction = reduction("mctf", r=12, clamp_r=True)
    return config
