"""The DiT training loop: AdamW + EMA, single device or DDP, exact resume, optional QAT.

One step: pick this rank's batch from a seeded per-epoch permutation (`data.Batches`), take the
objective (`ditq.training.losses`: DiT's diffusion loss, or distillation from a frozen teacher), backward
(DDP averages gradients), clip, AdamW, EMA update. Label dropout to the null class (classifier-free
guidance) happens inside the model because it is in train mode. With a QAT recipe the model (and so its
EMA) is `ditq.qat.prepare`d first; with nested bit-widths (MatQuant) the step's loss is Σ_r λ_r · L_r, the
losses at each served bit-width r weighted by the recipe's `nested_weights`, all on the same batch, timesteps,
noise and label dropout.

Exact resume: the checkpoint holds model, EMA, optimizer, step and every rank's RNG states; the
data order is a pure function of (seed, epoch, step), so a run interrupted after a checkpoint and
resumed produces the same weights, bit for bit on the CPU, as an uninterrupted one. Ctrl-C lets the step
in progress finish and writes that checkpoint before the run stops (`ditq.training.interrupt`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ditq import io
from ditq.atomic import append_json_line, check_output_dir, write_json
from ditq.bundled import BUNDLED_WEIGHTS, bundled_path
from ditq.diffusion import create_diffusion
from ditq.fileformat import CheckpointError, header_field, read_header
from ditq.models import create
from ditq.qat import QAT, prepare, set_served_bits
from ditq.quant.modules import is_quantized
from ditq.recipes import recipe_from_dict
from ditq.training.checkpoint import TrainState, load_train_state, save_train_state, save_weights
from ditq.training.config import RESUME_FIXED, TrainConfig
from ditq.training.data import Batches, load_dataset
from ditq.training.distributed import DistEnv, check_ranks_agree, setup_distributed
from ditq.training.init import load_init_weights
from ditq.training.interrupt import StopRequest, TrainingInterrupted
from ditq.training.log import LogMeter, trim_log
from ditq.training.losses import DiffusionLoss, DistillLoss, Loss, ModelFn
from ditq.training.rng import capture_rng, restore_rng, seed_rank
from ditq.training.schedules import ema_decay_at, lr_at, update_ema

log = logging.getLogger("ditq.train")

CHECKPOINT_NAME = "checkpoints/last.safetensors"
EMA_NAME = "ema.safetensors"
LOG_NAME = "log.jsonl"

# --------------------------------------------------------------------------------------------
# Model, objective, data
# --------------------------------------------------------------------------------------------


def weights_path(ref: str, field_name: str) -> Path:
    """The file of a zoo name's bundled weights or of a ditq checkpoint; FileNotFoundError names the field."""
    path = bundled_path(ref) or Path(ref)
    if not path.is_file():
        raise FileNotFoundError(
            f"{field_name}={ref!r} is neither a zoo model with bundled weights ({', '.join(sorted(BUNDLED_WEIGHTS))}) "
            "nor a checkpoint file"
        )
    return path


def open_weights(ref: str, field_name: str, device: torch.device) -> nn.Module:
    """The float32 model in a zoo name's bundled weights or in a ditq checkpoint, in eval mode."""
    return io.load(weights_path(ref, field_name), device=device).float().eval()


def build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """`cfg.model` with its overrides, seeded, optionally from `init_from`, prepared for QAT by `recipe`."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = create(cfg.model, **cfg.model_overrides).to(device)
    if cfg.init_from is not None:
        source = open_weights(cfg.init_from, "init_from", device)
        if is_quantized(source):
            raise ValueError(
                f"init_from={cfg.init_from!r} holds quantized layers; start from full-precision weights"
            )
        what = f"{cfg.model} with model_overrides={cfg.model_overrides}"
        gains = load_init_weights(model, source, cfg.init_from, what, cfg.num_timesteps)
        if gains:
            log.info("init_from: %d adaLN RMSNorm gains set to the FP modulation RMS", len(gains))
    if cfg.recipe is not None:
        prepare(model, recipe_from_dict(cfg.recipe))
    return model


def autocast_fn(net: nn.Module, device: torch.device, bf16: bool) -> ModelFn:
    """`net` under bf16 autocast when asked, returning float32 (the losses stay in fp32)."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            prediction = net(x_t, t, **kwargs)  # (N, 2C or C, H, W)
        return prediction.float()

    return model_fn


def make_loss(cfg: TrainConfig, model: nn.Module, device: torch.device, bf16: bool) -> Loss:
    """The run's objective: DiT's diffusion loss, or distillation from the frozen `cfg.teacher`."""
    if cfg.loss == "diffusion":
        return DiffusionLoss(
            create_diffusion("", num_timesteps=cfg.num_timesteps, learn_sigma=model.learn_sigma)
        )
    teacher = open_weights(cfg.teacher, "teacher", device).requires_grad_(False)
    return DistillLoss(teacher, autocast_fn(teacher, device, bf16), cfg.teacher_steps, cfg.num_timesteps)


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a run holds between steps."""

    cfg: TrainConfig
    env: DistEnv
    model: nn.Module
    ema: nn.Module
    batches: Batches
    loss_fn: Loss
    noise_gen: torch.Generator
    served_bits: tuple[int, ...] = ()  # nested bit-widths trained jointly; () = one
    served_weights: tuple[float, ...] = ()  # λ_r of each of served_bits
    default_bits: int = 0
    start: int = 0
    elapsed_before: float = 0.0
    resumed: bool = False
    net: nn.Module = field(init=False)
    model_fn: ModelFn = field(init=False)
    params: list[nn.Parameter] = field(init=False)
    opt: torch.optim.Optimizer = field(init=False)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out_dir)


def check_before_work(cfg: TrainConfig, env: DistEnv) -> None:
    """What can be refused before anything is built, loaded or written: world size, weight files, the output
    folder, and a checkpoint there that this run would overwrite or could not continue."""
    if cfg.global_batch_size % env.world_size:
        raise ValueError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by the world size {env.world_size}"
        )
    for name in ("init_from", "teacher"):
        if getattr(cfg, name) is not None:
            weights_path(getattr(cfg, name), name)
    check_output_dir(Path(cfg.out_dir), "out_dir")
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME
    if ckpt_path.exists() and not cfg.resume:
        raise FileExistsError(
            f"{ckpt_path} exists: pass resume=True (--resume) to continue that run, or pick another out_dir"
        )
    if ckpt_path.exists():
        _check_resumable(cfg, env, ckpt_path)


def start_run(cfg: TrainConfig, env: DistEnv) -> Run:
    """Build model, EMA, data, objective and optimizer; restore a checkpoint when there is one.

    Everything that draws random numbers happens before the RNG states are restored (last).
    """
    device = env.device
    on_cuda = device.type == "cuda"
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and on_cuda)
    model = build_model(cfg, device)
    images, labels = load_dataset(cfg.data, cfg.data_dir, model, device)
    loss_fn = make_loss(cfg, model, device, bf16)
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()  # shipped weights; fp32 always
    model.train()  # enables label dropout for classifier-free guidance
    recipe = None if cfg.recipe is None else recipe_from_dict(cfg.recipe)
    nested = recipe.served_bits if isinstance(recipe, QAT) and len(recipe.served_bits) > 1 else ()
    run = Run(
        cfg,
        env,
        model,
        ema,
        Batches(images, labels, env, global_batch_size=cfg.global_batch_size, seed=cfg.seed, hflip=cfg.hflip),
        loss_fn,
        torch.Generator(device=device),
        served_bits=nested,
        served_weights=recipe.served_weights if nested else (),
        default_bits=recipe.w_bits if nested else 0,
    )
    seed_rank(cfg.seed, env.rank, run.noise_gen)
    ckpt_path = run.out / CHECKPOINT_NAME
    state = None
    if ckpt_path.exists():
        state = load_train_state(ckpt_path)
        model.load_state_dict(state.model)
        ema.load_state_dict(state.ema)
        run.start, run.elapsed_before, run.resumed = state.step, state.elapsed_s, True
    run.params = [p for p in model.parameters() if p.requires_grad]
    run.net = DDP(model, device_ids=[device.index] if on_cuda else None) if env.world_size > 1 else model
    if cfg.compile and on_cuda:
        run.net = torch.compile(run.net)
    run.model_fn = autocast_fn(run.net, device, bf16)
    run.opt = torch.optim.AdamW(
        run.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=on_cuda or None
    )
    if state is not None:
        run.opt.load_state_dict(state.optimizer)
        restore_rng(state.rng[env.rank], run.noise_gen, device)  # last: nothing may draw after this
    return run


def announce(run: Run) -> None:
    """Rank 0: write config.json, start or trim log.jsonl, and say what is being trained."""
    if not run.env.is_main:
        return
    cfg, log_path = run.cfg, run.out / LOG_NAME
    (run.out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_json(run.out / "config.json", cfg.to_dict())
    if run.resumed:
        trim_log(log_path, run.start)
    else:
        log_path.write_text("")
    n_params = sum(p.numel() for p in run.model.parameters())
    quant = "" if cfg.recipe is None else f", QAT {cfg.recipe}"
    log.info(
        "%s: %s parameters, %d rank(s) x batch %d, %s%s",
        cfg.model,
        f"{n_params:,}",
        run.env.world_size,
        run.batches.batch,
        run.env.device,
        quant,
    )
    if run.resumed:
        log.info("resumed from %s at step %d", run.out / CHECKPOINT_NAME, run.start)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero grads, loss (Σ_r λ_r · L_r over nested bit-widths, same draws for each), backward, clip, AdamW step.

    Each width replays the same draws (`capture_rng`): the loss's generator and torch's global one, which the
    model's label dropout reads.
    Returns the detached loss and the gradient norm before clipping.
    """
    run.opt.zero_grad(set_to_none=True)
    widths = list(zip(run.served_bits, run.served_weights, strict=True)) or [(None, 1.0)]
    draws = capture_rng(run.noise_gen, x.device) if run.served_bits else None
    total = torch.zeros((), device=x.device)
    for i, (b, weight) in enumerate(widths):
        if b is not None:
            set_served_bits(run.model, b)
            restore_rng(draws, run.noise_gen, x.device)
        last = i == len(widths) - 1
        with nullcontext() if last or not isinstance(run.net, DDP) else run.net.no_sync():
            loss = run.loss_fn(run.model_fn, x, y, run.noise_gen)
            if weight != 1.0:
                loss = weight * loss
            loss.backward()
        total += loss.detach()
    if run.served_bits:
        set_served_bits(run.model, run.default_bits)
    clip = run.cfg.grad_clip if run.cfg.grad_clip is not None else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, clip)
    run.opt.step()
    return total, grad_norm


def save_checkpoint(run: Run, done: int, elapsed: float) -> None:
    """Every rank's RNG states to rank 0, which writes the training state; then all ranks wait."""
    env = run.env
    every_rank = [capture_rng(run.noise_gen, env.device)]
    if env.world_size > 1:
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, every_rank[0])
        every_rank = gathered
    if env.is_main:
        epoch, position = divmod(done, run.batches.steps_per_epoch)
        state = TrainState(
            done,
            epoch,
            position,
            elapsed,
            env.world_size,
            run.cfg.to_dict(),
            run.model.state_dict(),
            run.ema.state_dict(),
            run.opt.state_dict(),
            every_rank,
        )
        save_train_state(run.out / CHECKPOINT_NAME, state)
    env.barrier()


def run_steps(run: Run, deadline: float | None = None) -> None:
    """Steps `run.start` .. `cfg.steps`: batch, step, EMA, log lines and checkpoints as configured.

    Ctrl-C, or the `time.monotonic()` clock passing `deadline`: the step finishes, its checkpoint is written,
    then `TrainingInterrupted` (a KeyboardInterrupt).
    """
    cfg, env = run.cfg, run.env
    pbar = tqdm(
        total=cfg.steps, initial=run.start, disable=not (env.is_main and cfg.progress), dynamic_ncols=True
    )
    meter = LogMeter(env.device, run.elapsed_before, env.world_size)
    with pbar, StopRequest(env.world_size, deadline) as stop:
        for step in range(run.start, cfg.steps):
            x, y = run.batches.at(step, run.noise_gen)  # (B, C, H, W), (B,)
            lr = lr_at(cfg, step)
            for group in run.opt.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(run, x, y)
            update_ema(run.ema, run.model, ema_decay_at(cfg, step + 1))
            meter.add(loss, grad_norm)
            done = step + 1
            pbar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                epoch = (done - 1) // run.batches.steps_per_epoch
                record = meter.record(done, epoch, lr, ema_decay_at(cfg, done))
                if env.is_main:
                    append_json_line(run.out / LOG_NAME, record)
                    pbar.set_postfix(loss=f"{record['loss']:.4f}", it_s=f"{record['steps_per_s']:.1f}")
            saved = done % cfg.ckpt_every == 0 or done == cfg.steps
            if saved:
                save_checkpoint(run, done, meter.elapsed())
            if done < cfg.steps and stop.should_stop():
                if not saved:
                    save_checkpoint(run, done, meter.elapsed())
                raise TrainingInterrupted(done, run.out / CHECKPOINT_NAME, stop.reason)


def ship_ema(run: Run) -> Path:
    """Rank 0 writes the EMA weights (after checking that every rank holds the same) as a ditq checkpoint."""
    cfg, ema_path = run.cfg, run.out / EMA_NAME
    check_ranks_agree(run.ema, run.env)
    if run.env.is_main:
        save_weights(
            run.ema, ema_path, model=cfg.model, step=max(run.start, cfg.steps), train_config=cfg.to_dict()
        )
        log.info("EMA weights written to %s", ema_path)
    run.env.barrier()
    return ema_path


def _check_resumable(cfg: TrainConfig, env: DistEnv, path: Path) -> None:
    """The checkpoint's header must describe this run: same data, model and objective, same world size."""
    header = read_header(path, kind="train_state")
    try:
        saved = TrainConfig.from_dict(header_field(path, header, "config", dict))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: header field 'config': {err}") from None
    changed = [
        f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}"
        for k in RESUME_FIXED
        if getattr(saved, k) != getattr(cfg, k)
    ]
    if changed:
        raise ValueError(
            f"cannot resume {path}: these settings differ from the saved run: {'; '.join(changed)}"
        )
    world_size = header_field(path, header, "world_size", int)
    if world_size != env.world_size:
        raise ValueError(
            f"cannot resume {path}: it was written by {world_size} processes, this run has {env.world_size}"
        )


def train(cfg: TrainConfig) -> Path:
    """Train `cfg.model` on MNIST and return the path of the final EMA weights (fp32 safetensors).

    Run directly for one device or under torchrun for DDP. On CUDA it enables TF32 matmuls
    (`torch.set_float32_matmul_precision("high")`) for the duration of the call only. With
    `cfg.time_limit_s`, the clock starts here (building, loading and compiling count).
    """
    deadline = None if cfg.time_limit_s is None else time.monotonic() + cfg.time_limit_s
    env = setup_distributed(cfg.device)
    on_cuda = env.device.type == "cuda"
    previous_precision = torch.get_float32_matmul_precision()
    if on_cuda:
        torch.set_float32_matmul_precision("high")
    try:
        return _train(cfg, env, deadline)
    finally:
        torch.set_float32_matmul_precision(previous_precision)
        if env.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, env: DistEnv, deadline: float | None) -> Path:
    check_before_work(cfg, env)
    run = start_run(cfg, env)
    announce(run)
    run_steps(run, deadline)
    return ship_ema(run)
