"""Training objectives: `loss(model_fn, x, y, gen) -> scalar`, drawing their randomness from `gen`.

- `DiffusionLoss`: DiT's objective on the data, t ~ U{0..T−1} and ε from `gen` (L_simple + L_vlb).
- `DistillLoss`: the mean squared difference between the model's output and a frozen teacher's, at
  states taken from the teacher's own DDIM trajectories (data-free for the images: only the labels of
  the batch are used), the way PTQ calibration takes its inputs from the FP model's sampling (SPEC §2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ditq.diffusion import GaussianDiffusion, create_diffusion
from ditq.diffusion.samplers import ddim_step
from ditq.diffusion.schedule import split_model_output

ModelFn = Callable[..., Tensor]
Loss = Callable[[ModelFn, Tensor, Tensor, torch.Generator], Tensor]


class DiffusionLoss:
    """Mean over the batch of DiT's per-sample loss at random t with random noise."""

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        self.diffusion = diffusion

    def __call__(self, model_fn: ModelFn, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=gen, device=x.device)
        noise = torch.randn(x.shape, generator=gen, device=x.device)
        return self.diffusion.training_losses(model_fn, x, t, dict(y=y), noise=noise)["loss"].mean()


class DistillLoss:
    """MSE between model and teacher outputs at a state of the teacher's DDIM trajectory.

    Per batch: x_T ~ N(0, I) and a chain index k ~ U{0..steps−1} from `gen`; the teacher runs its
    conditional DDIM chain (η = 0) from x_T down to index k; both models then predict at (x_k, t_k, y).
    The target is computed in train mode under a forked torch RNG, so the teacher draws the same label
    dropout (classifier-free guidance's null class) as the model, which trains in train mode, right after it.
    """

    def __init__(self, teacher: nn.Module, teacher_fn: ModelFn, steps: int, num_timesteps: int) -> None:
        self.teacher, self.teacher_fn = teacher, teacher_fn
        self.learn_sigma = bool(getattr(teacher, "learn_sigma", False))
        self.diffusion = create_diffusion(f"ddim{steps}", num_timesteps, learn_sigma=self.learn_sigma)

    @torch.no_grad()
    def trajectory_state(self, x: Tensor, y: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """(x_k, t_k): the teacher's DDIM state at a random chain index, and its original timesteps."""
        steps = self.diffusion.num_timesteps
        state = torch.randn(x.shape, generator=gen, device=x.device)
        stop = int(torch.randint(0, steps, (1,), generator=gen, device=x.device))
        schedule = self.diffusion.schedule_on(x.device)
        timestep_map = self.diffusion.timestep_map.to(x.device)
        self.teacher.eval()
        for i in range(steps - 1, stop, -1):
            t = timestep_map[i].expand(x.shape[0])
            eps, _ = split_model_output(self.teacher_fn(state, t, y=y), x.shape[1], self.learn_sigma)
            state = ddim_step(schedule, eps, state, i, None)
        return state, timestep_map[stop].expand(x.shape[0])

    def __call__(self, model_fn: ModelFn, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        x_t, t = self.trajectory_state(x, y, gen)
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            self.teacher.train()  # the mode the model trains in: same label dropout draws
            target = self.teacher_fn(x_t, t, y=y)
            self.teacher.eval()
        output = model_fn(x_t, t, y=y)
        if output.shape != target.shape:
            raise ValueError(
                f"the model's output {tuple(output.shape)} and the teacher's {tuple(target.shape)} differ; "
                "distillation needs the same output layout (learn_sigma, in_channels)"
            )
        return (output - target.float()).square().mean()
