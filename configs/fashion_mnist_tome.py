"""Fashion-MNIST ViT with ToMe: bipartite soft matching merges r tokens in every block.

    python train.py --config configs/fashion_mnist_tome.py --workdir /tmp/fm_tome

Same recipe as fashion_mnist_vit.py. With r=12 the 50 tokens go 50 -> 38 -> 26 -> 14 -> 8
over the 4 blocks: the last block can merge only 6 of its 13 unprotected tokens, so r is
clamped there as ToMe does (clamp_r=True; without it such an r is an error naming the block).
Proportional attention (log size added to the logits) as in ToMe.

Budget warm-up: r rises linearly from 0 to 12 over the first half of training in 4 levels
(r = 0, 3, 6, 9 in every block, then 12 with the clamp: five compiled train steps). Over seeds
0, 1, 2 it takes ToMe's gap to the ViT from -1.12 +- 0.61 to -0.81 +- 0.22 points with the same
model at evaluation (BENCHMARKS.md, "Over seeds"); `--config.budget_warmup.fraction=0` trains
at r = 12 from the first step.
"""

import os

from jax_tokens.train.schema import load_config, reduction


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.reduction = reduction("tome", r=12, prop_attn=True, clamp_r=True)
    w = config.budget_warmup
    w.fraction = 0.5
    w.start_fraction = 0.0
    w.levels = 4
    w.shape = "linear"
    return config
