"""The trainer, as a package (imports flow schema -> budgets -> state -> measure/export -> loop):

* `schema`   the config schema, loading config files and `--config.a.b=value` overrides
             (imports only ml_collections: configs import it);
* `budgets`  `config.model` -> a model config with every budget checked; the budget warm-up;
* `state`    optimizer, TrainState, the jitted train / forward / eval steps;
* `measure`  accuracy over an eval split, XLA GFLOPs, side-by-side throughput;
* `export`   exports for inference (parameters + model config);
* `guard`    one run per workdir (a lock file) and a clean stop on SIGTERM / SIGINT;
* `loop`     `train(config, workdir)`, the loop `train.py` runs.

`from jax_tokens import train; train.load_config(...)` reaches every public name of the
submodules; a submodule is imported only when one of its names is first used, so importing
the schema stays light.
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("schema", "budgets", "state", "measure", "export", "guard", "loop")


def __getattr__(name: str):
    for sub in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{sub}")
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    names = set(globals())
    for sub in _SUBMODULES:
        names.update(importlib.import_module(f"{__name__}.{sub}").__all__)
    return sorted(names)
