"""Fashion-MNIST ViT with DynamicViT: a learned predictor prunes tokens before blocks 1, 2, 3.

    python train.py --config configs/fashion_mnist_dynamicvit.py --workdir /tmp/fm_dynamicvit

Same recipe as fashion_mnist_vit.py, plus DynamicViT's own losses with the reference's DeiT
weights (keep-ratio MSE x 2.0, logit KL + final-token MSE distillation x 0.5). The paper's keep
ratios 0.7, 0.49, 0.343 of the 49 patch tokens: 50 -> 35 -> 25 -> 17 tokens entering blocks
1-3 at evaluation. Training keeps all 50 tokens with Gumbel-softmax keep policies and
policy-masked attention. The teacher is the unreduced forward of the same weights (gradients
stopped): the recipe trains from scratch, where the reference fine-tunes a pretrained DeiT and
distils from a frozen copy of it.
"""

import os

from jax_tokens.train.schema import load_config, reduction


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(__file__), "fashion_mnist_vit.py"))
    config.model.reduction = reduction("dynamicvit", layers=(1, 2, 3),
                                       keep_ratio=(0.7, 0.49, 0.343))
    return config
