"""Models: a Flax NNX ViT/DeiT with reducer slots, and weight conversion."""

from jax_tokens.models.vit import LayerSpec, ReductionConfig, VisionTransformer, ViTConfig

__all__ = ["VisionTransformer", "ViTConfig", "ReductionConfig", "LayerSpec"]
