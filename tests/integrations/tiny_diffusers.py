"""Tiny random diffusers transformers and a tiny DiT pipeline, built in code (nothing downloaded)."""

from __future__ import annotations

import torch

TINY_CONFIGS = {
    "DiTTransformer2DModel": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,  # DiTPipeline's null class is 1000
                                  norm_num_groups=1),
    "PixArtTransformer2DModel": dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                     caption_channels=24, norm_num_groups=1),
    "SD3Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
                                  pooled_projection_dim=12, out_channels=4, pos_embed_max_size=8),
    "FluxTransformer2DModel": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                   pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}


def make_transformer(class_name: str, seed: int = 0, **changes) -> torch.nn.Module:
    """A tiny random transformer (`changes` to its config on top); zero-initialised layers (adaLN-Zero,
    output) perturbed so they matter."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**(TINY_CONFIGS[class_name] | changes))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_dit_pipeline(seed: int = 0):
    """DiTPipeline with a tiny transformer, a one-level AutoencoderKL (latent = image size) and DDIM."""
    from diffusers import DDIMScheduler, DiTPipeline

    return DiTPipeline(transformer=make_transformer("DiTTransformer2DModel", seed), vae=make_vae(seed + 1),
                       scheduler=DDIMScheduler())


def make_vae(seed: int = 1):
    """A one-level AutoencoderKL: latents 4×S×S decode to 3×S×S images (no downsampling)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=8).eval()
