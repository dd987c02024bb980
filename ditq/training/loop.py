"""The DiT training loop: AdamW + EMA on DiT's diffusion loss, single device or DDP, exact resume.

One step: pick this rank's batch from a seeded per-epoch permutation (DistributedSampler), draw
t ~ U{0..T−1} and ε from a per-rank generator, loss = mean of `training_losses`, backward (DDP
averages gradients), clip, AdamW, EMA update. Label dropout to the null class (classifier-free
guidance) happens inside the model because it is in train mode.

Exact resume: the checkpoint holds model, EMA, optimizer, step and every rank's RNG states; the
data order is a pure function of (seed, epoch, step), so a run interrupted after a checkpoint and
resumed produces the same weights, bit for bit on the CPU, as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ditq.data import load_mnist, to_model_space
from ditq.diffusion import GaussianDiffusion, create_diffusion
from ditq.models import create
from ditq.training.checkpoint import TrainState, load_train_state, save_train_state, save_weights
from ditq.training.config import RESUME_FIXED, TrainConfig
from ditq.training.distributed import DistEnv, check_ranks_agree, setup_distributed
from ditq.training.rng import capture_rng, restore_rng, seed_rank

log = logging.getLogger("ditq.train")

CHECKPOINT_NAME = "checkpoints/last.safetensors"
EMA_NAME = "ema.safetensors"
LOG_NAME = "log.jsonl"

# --------------------------------------------------------------------------------------------
# Data, schedules, EMA
# --------------------------------------------------------------------------------------------


def load_dataset(
    cfg: TrainConfig, model: nn.Module, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """All MNIST test-split images in model space (N, 1, 32, 32) and labels (N,), on `device`.

    10,000 images are 40 MB in fp32: keeping them on the device replaces a DataLoader.
    """
    try:
        images, labels = load_mnist(cfg.data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data_dir={cfg.data_dir!r}: {err}") from err
    x = to_model_space(images)  # (N, 1, 32, 32) in [-1, 1]
    y = torch.as_tensor(labels, dtype=torch.long)  # (N,)
    want = (model.in_channels, model.input_size, model.input_size)
    if tuple(x.shape[1:]) != want:
        raise ValueError(
            f"model {cfg.model!r} expects inputs of shape {want}, the data is {tuple(x.shape[1:])}; "
            "check model_overrides (in_channels, input_size)"
        )
    if int(y.max()) >= model.num_classes:
        raise ValueError(f"labels go up to {int(y.max())} but the model has num_classes={model.num_classes}")
    return x.to(device), y.to(device)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of the 0-based optimizer step `step`: linear warm-up, then constant or cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(cfg: TrainConfig, done: int) -> float:
    """EMA decay after `done` steps. The warm-up keeps a 0.9999 EMA of a short run from being
    mostly its random initialisation: the average covers ~10% of the steps taken so far."""
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1.0 + done) / (10.0 + done))
    return cfg.ema_decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model for every parameter (frozen ones are equal anyway)."""
    ema_params = list(ema.parameters())
    model_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for b_ema, b_model in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b_model)


def training_loss(
    diffusion: GaussianDiffusion,
    model_fn: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """DiT's objective for one batch: the mean over samples of L_simple (+ L_vlb when σ is learned)."""
    return diffusion.training_losses(model_fn, x, t, dict(y=y), noise=noise)["loss"].mean()


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _check_resumable(cfg: TrainConfig, state: TrainState, env: DistEnv, path: Path) -> None:
    saved = TrainConfig.from_dict(state.config)
    changed = [
        f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
        for k in RESUME_FIXED
        if getattr(saved, k) != getattr(cfg, k)
    ]
    if changed:
        raise ValueError(
            f"cannot resume {path}: these settings differ from the saved run: {'; '.join(changed)}"
        )
    if state.world_size != env.world_size:
        raise ValueError(
            f"cannot resume {path}: it was written by {state.world_size} processes, this run has {env.world_size}"
        )


def _trim_log(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the crash
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: TrainConfig) -> Path:
    """Train `cfg.model` on MNIST and return the path of the final EMA weights (fp32 safetensors).

    Run directly for one device or under torchrun for DDP. On CUDA it enables TF32 matmuls
    (`torch.set_float32_matmul_precision("high")`) for the duration of the call only.
    """
    env = setup_distributed(cfg.device)
    on_cuda = env.device.type == "cuda"
    previous_precision = torch.get_float32_matmul_precision()
    if on_cuda:
        torch.set_float32_matmul_precision("high")
    try:
        return _train(cfg, env)
    finally:
        torch.set_float32_matmul_precision(previous_precision)
        if env.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: DistEnv) -> Path:
    out = Path(cfg.out_dir)
    ckpt_path, log_path, ema_path = out / CHECKPOINT_NAME, out / LOG_NAME, out / EMA_NAME
    if cfg.global_batch_size % env.world_size:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by the world size {env.world_size}"
        )
    if ckpt_path.exists() and not cfg.resume:
        raise FileExistsError(
            f"{ckpt_path} exists: pass resume=True (--resume) to continue that run, or pick another out_dir"
        )
    batch = cfg.global_batch_size // env.world_size
    device = env.device
    on_cuda = device.type == "cuda"

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = create(cfg.model, **cfg.model_overrides).to(device)
    images, labels = load_dataset(cfg, model, device)
    diffusion = create_diffusion(
        timestep_respacing="", num_timesteps=cfg.num_timesteps, learn_sigma=model.learn_sigma
    )
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()  # shipped weights; fp32 always
    model.train()  # enables label dropout for classifier-free guidance

    sampler = DistributedSampler(
        range(len(images)), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed
    )
    steps_per_epoch = len(sampler) // batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} exceeds the {len(images)} images available"
        )

    noise_gen = torch.Generator(device=device)
    seed_rank(cfg.seed, env.rank, noise_gen)
    start, elapsed_before = 0, 0.0
    state = None
    if ckpt_path.exists():
        state = load_train_state(ckpt_path)
        _check_resumable(cfg, state, env, ckpt_path)
        model.load_state_dict(state.model)
        ema.load_state_dict(state.ema)
        start, elapsed_before = state.step, state.elapsed_s

    params = [p for p in model.parameters() if p.requires_grad]
    net: nn.Module = (
        DDP(model, device_ids=[device.index] if on_cuda else None) if env.world_size > 1 else model
    )
    if cfg.compile and on_cuda:
        net = torch.compile(net)
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=on_cuda or None
    )
    if state is not None:
        opt.load_state_dict(state.optimizer)
        restore_rng(state.rng[env.rank], noise_gen, device)  # last: nothing may draw after this
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and on_cuda)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            prediction = net(x_t, t, **kwargs)  # (N, 2C or C, H, W)
        return prediction.float()  # the diffusion loss (logs, KL terms) stays in fp32

    if env.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if state is None:
            log_path.write_text("")
        else:
            _trim_log(log_path, start)
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "%s: %s parameters, %d rank(s) x batch %d, %s",
            cfg.model,
            f"{n_params:,}",
            env.world_size,
            batch,
            device,
        )
        if state is not None:
            log.info("resumed from %s at step %d", ckpt_path, start)

    def checkpoint(done: int, elapsed: float) -> None:
        rng = capture_rng(noise_gen, device)
        every_rank = [rng]
        if env.world_size > 1:
            every_rank = [None] * env.world_size
            dist.all_gather_object(every_rank, rng)
        if env.is_main:
            epoch, position = divmod(done, steps_per_epoch)
            save_train_state(
                ckpt_path,
                TrainState(
                    done,
                    epoch,
                    position,
                    elapsed,
                    env.world_size,
                    cfg.to_dict(),
                    model.state_dict(),
                    ema.state_dict(),
                    opt.state_dict(),
                    every_rank,
                ),
            )
        env.barrier()

    pbar = tqdm(
        total=cfg.steps, initial=start, disable=not (env.is_main and cfg.progress), dynamic_ncols=True
    )
    t_start = t_last = time.perf_counter()
    running = torch.zeros(
        2, device=device
    )  # loss and grad-norm sums since the last log line (no per-step sync)
    since_log, last_epoch, order = 0, -1, torch.empty(0)
    try:
        for step in range(start, cfg.steps):
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != last_epoch:
                sampler.set_epoch(epoch)
                order = torch.tensor(list(sampler), device=device)[: steps_per_epoch * batch].view(
                    steps_per_epoch, batch
                )
                last_epoch = epoch
            idx = order[position]
            x, y = images[idx], labels[idx]  # (B, 1, 32, 32), (B,)
            if cfg.hflip:
                flip = torch.rand(batch, generator=noise_gen, device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=noise_gen, device=device)
            noise = torch.randn(x.shape, generator=noise_gen, device=device)
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr

            loss = training_loss(diffusion, model_fn, x, y, t, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip is not None else math.inf
            )
            opt.step()
            update_ema(ema, model, ema_decay_at(cfg, step + 1))

            running += torch.stack([loss.detach(), grad_norm.detach().to(device)])
            since_log += 1
            done = step + 1
            pbar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                stats = running / since_log
                if env.world_size > 1:
                    dist.all_reduce(stats)
                    stats /= env.world_size
                mean_loss, mean_norm = stats.tolist()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"loss is {mean_loss} at step {done}: lower lr or check the data"
                    )
                now = time.perf_counter()
                record = {
                    "step": done, "epoch": epoch, "loss": mean_loss, "grad_norm": mean_norm, "lr": lr,
                    "ema_decay": ema_decay_at(cfg, done), "steps_per_s": since_log / (now - t_last),
                    "elapsed_s": elapsed_before + now - t_start,
                }  # fmt: skip
                if env.is_main:
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    pbar.set_postfix(loss=f"{mean_loss:.4f}", it_s=f"{record['steps_per_s']:.1f}")
                running.zero_()
                since_log, t_last = 0, now
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                checkpoint(done, elapsed_before + time.perf_counter() - t_start)
    finally:
        pbar.close()

    check_ranks_agree(ema, env)
    if env.is_main:
        save_weights(ema, ema_path, model=cfg.model, step=max(start, cfg.steps), train_config=cfg.to_dict())
        log.info("EMA weights written to %s", ema_path)
    env.barrier()
    return ema_path
