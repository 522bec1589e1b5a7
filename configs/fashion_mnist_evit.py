"""Fashion-MNIST ViT with EViT: keep the top tokens by CLS attention, fuse the rest into one.

    python train.py --config configs/fashion_mnist_evit.py --workdir /tmp/fm_evit

Same recipe as fashion_mnist_vit.py. Block 1 keeps 50% of the 49 patch tokens (25 + CLS + the
fused token). As EViT anneals its keep rate, the rate goes from 1.0 to the target with a
cosine over the first 40% of training, here in 3 discrete levels (1.0, 0.875, 0.625, then 0.5:
four compiled train steps).
"""

import os

from jax_tokens.train.schema import load_config, reduction


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.reduction = reduction("evit", keep_rate=0.5, layers=(1,), fuse=True)
    w = config.budget_warmup
    w.fraction = 0.4
    w.start_fraction = 0.0
    w.levels = 3
    w.shape = "cosine"
    return config
