"""`ViTConfig`: the hyper-parameters of `jax_tokens.models.vit.VisionTransformer`, and what
follows from them before anything is traced (the reducer's per-block schedule, token counts,
FLOPs, the padded rows of `token_multiple`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax_tokens import reducers
from jax_tokens import schedule as sched
from jax_tokens.layers import PatchGrid
from jax_tokens.models import token_padding
from jax_tokens.reducers import LayerSpec, Reducer, TokenLayout

__all__ = ["ViTConfig"]


@dataclasses.dataclass(frozen=True)
class ViTConfig(PatchGrid):
    """ViT / DeiT hyper-parameters (timm's names where they exist)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    distill_token: bool = False
    num_registers: int = 0
    pos_embed: str = "learn"          # "learn" | "sincos" | "none"
    no_embed_class: bool = False      # position embedding only on patch tokens (timm flag)
    layer_scale_init: float | None = None
    global_pool: str = "token"        # "token" | "avg" (size-weighted over patch tokens) |
                                      # "avg_all" (over every token, prefix too: Cropr's head)
    fc_norm: bool = False             # the final norm on the pooled feature (timm's fc_norm)
    ln_eps: float = 1e-6
    attn_impl: str = "auto"
    trace_source: bool = False        # track which patches each token covers (aux["source_index"])
    dtype: str = "float32"            # compute dtype ("bfloat16" for mixed precision)
    token_multiple: int = 1           # token arrays rounded up to a multiple of this, the
                                      # padding masked out (models/token_padding.py); 1: off
    reduction: Any = None             # a Reducer, or its dict {"method": ..., ...}; None: none

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "token_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of "
                             f"patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by "
                             f"num_heads={self.num_heads}")
        if self.pos_embed not in ("learn", "sincos", "none"):
            raise ValueError(f"pos_embed={self.pos_embed!r} is not one of learn, sincos, none")
        if self.global_pool not in ("token", "avg", "avg_all"):
            raise ValueError(f"global_pool={self.global_pool!r} is not one of token, avg, "
                             "avg_all")
        if self.fc_norm and self.global_pool == "token":
            raise ValueError("fc_norm=True needs global_pool='avg' or 'avg_all' (timm applies "
                             "it to the pooled feature)")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")
        if self.distill_token and not self.class_token:
            raise ValueError("distill_token=True needs class_token=True (DeiT layout)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} is not one of float32, bfloat16, float16")
        object.__setattr__(self, "reduction", reducers.from_config(self.reduction))
        self.schedule()  # validates budgets against token counts, naming the layer

    # -- derived sizes (grid, num_patches, head_dim, mlp_hidden: PatchGrid) -------------------
    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distill_token) + self.num_registers

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def replace(self, **kw) -> "ViTConfig":
        return dataclasses.replace(self, **kw)

    def layout(self) -> TokenLayout:
        """What a reducer may know about this model (`jax_tokens.reducers.TokenLayout`)."""
        return TokenLayout(depth=self.depth, num_tokens=self.num_tokens,
                           num_prefix_tokens=self.num_prefix_tokens,
                           class_token=self.class_token, distill_token=self.distill_token,
                           embed_dim=self.embed_dim, num_heads=self.num_heads,
                           num_classes=self.num_classes)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the reduction as {"method": ..., ...}); `ViTConfig(**d)` inverts
        it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["reduction"] = self.reduction.to_dict()
        return d

    # -- the static per-layer schedule -----------------------------------------------------------
    def schedule(self, reduction: Reducer | None = None) -> tuple[LayerSpec, ...]:
        """Per block: tokens in, tokens out, the reducer's budget (from the reducer)."""
        red = self.reduction if reduction is None else reducers.from_config(reduction)
        return red.schedule(self.layout())

    def token_counts(self, reduction: Reducer | None = None) -> list[int]:
        """Tokens entering each block (and, last, the tokens after the final block)."""
        specs = self.schedule(reduction)
        return [s.n_in for s in specs] + [specs[-1].n_out]

    def flops(self, reduction: Reducer | None = None) -> int:
        """Estimated forward FLOPs per image (2 x multiply-adds): the blocks' matmuls on the
        schedule's token counts, plus each reducer call's own work (`Reducer.flops`)."""
        red = self.reduction if reduction is None else reducers.from_config(reduction)
        layout = self.layout()
        specs = red.schedule(layout)
        # A reducer placed "before" the attention leaves it n_out tokens (the input tokens'
        # probabilities are its own work); one placed "after" the MLP leaves it n_in.
        # With token_multiple, the blocks compute on the padded rows too.
        place = [red.placement(s) if s.active else "mid" for s in specs]
        m = self.row_multiple(red)
        total = sched.vit_flops(
            tokens_in=[token_padding.round_up(s.n_out if p == "before" else s.n_in, m)
                       for s, p in zip(specs, place)],
            tokens_mid=[token_padding.round_up(s.n_in if p == "after" else s.n_out, m)
                        for s, p in zip(specs, place)],
            dim=self.embed_dim, mlp_hidden=self.mlp_hidden, num_patches=self.num_patches,
            patch_dim=self.in_chans * self.patch_size ** 2, num_classes=self.num_classes)
        total += sum(red.flops(layout, s) for s in specs if s.active)
        if self.distill_token:
            total += 2 * self.embed_dim * self.num_classes
        return total

    def row_multiple(self, reduction: Reducer | None = None) -> int:
        """The multiple the model rounds its token arrays up to with this reducer:
        `token_multiple`, or 1 for a reducer whose keep policy already keeps every token
        (DynamicViT's training). The model and `flops` both ask this."""
        red = self.reduction if reduction is None else reducers.from_config(reduction)
        return 1 if red.policy_attention else self.token_multiple

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def vit_tiny(cls, **kw):
        return cls(**{**dict(embed_dim=192, depth=12, num_heads=3), **kw})

    @classmethod
    def vit_small(cls, **kw):
        return cls(**{**dict(embed_dim=384, depth=12, num_heads=6), **kw})

    @classmethod
    def vit_base(cls, **kw):
        return cls(**{**dict(embed_dim=768, depth=12, num_heads=12), **kw})

    @classmethod
    def vit_large(cls, **kw):
        return cls(**{**dict(embed_dim=1024, depth=24, num_heads=16), **kw})
