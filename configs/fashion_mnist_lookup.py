"""Fashion-MNIST ViT with lookup compression: after block 0's attention a TokenLearner
compresses the 49 patch tokens into 16 learned tokens (plus CLS) for the remaining blocks.

    python train.py --config configs/fashion_mnist_lookup.py --workdir /tmp/fm_lookup
"""

import os

from jax_tokens.train.schema import load_config, reduction


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.reduction = reduction("token_learner", layers=(0,), num_tokens=16)
    return config
