"""DeiT-B/16 on ImageNet-1k: imagenet_deit_s.py's recipe at width 768 / 12 heads.

    python train.py --config configs/imagenet_deit_b.py[:tome|:evit|:lookup] --workdir DIR \
        --config.data.data_dir=/path/to/tensorflow_datasets
"""

import os

from jax_tokens.train.schema import load_config


def get_config(arg=None):
    base = os.path.join(os.path.dirname(__file__), "imagenet_deit_s.py")
    config = load_config(base + (f":{arg}" if arg else ""))
    m = config.model
    m.embed_dim, m.num_heads = 768, 12
    if arg == "tome":
        config.model.reduction.r = 16         # ToMe's DeiT-B setting
    return config
