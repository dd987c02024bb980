"""Gaussian diffusion as used by DiT: linear schedule, respacing, hybrid loss, DDPM/DDIM, guidance."""

from ditq.diffusion.cfg import guided, sample_images
from ditq.diffusion.samplers import GaussianDiffusion, create_diffusion

__all__ = ["GaussianDiffusion", "create_diffusion", "guided", "sample_images"]
