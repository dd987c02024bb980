"""The ImageNet protocol end to end on CPU with a tiny latent DiT, a tiny random VAE and a random-weight
Inception; two gloo processes give the same scores as one."""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ditq.eval.imagenet import GUIDED_CHANNELS, evaluate_imagenet, sample_decoded, shard
from ditq.eval.inception import InceptionOutput, InceptionV3, ReferenceStats
from ditq.eval.runner import SampleSettings
from ditq.training.distributed import DistEnv
from tests.integrations.tiny_diffusers import make_vae
from tests.tiny import make_tiny_dit

pytest.importorskip("diffusers")
SETTINGS = SampleSettings(samples=4, steps=2, cfg_scale=4.0, batch_size=2)


class SmallInception(InceptionV3):
    """The FID network on the CPU's budget: at 75 px, its smallest input, instead of 299 (the same code path, 15×
    less time), keeping 64 of the 2048 pool features (FID's matrix square root of 2048² took most of a minute),
    and one image at a time, so each image's features do not depend on the batch it came in (a GEMM's sums do:
    one process and two batch the same images differently)."""

    POOL = 64

    def __init__(self) -> None:
        super().__init__(resize_input=False)

    def forward(self, x):
        outs = [InceptionV3.forward(self, F.interpolate(image[None], size=(75, 75), mode="bilinear")) for image in x]
        return InceptionOutput(torch.cat([o.pool[:, : self.POOL] for o in outs]), torch.cat([o.spatial for o in outs]),
                               torch.cat([o.logits for o in outs]))  # fmt: skip


def _parts():
    torch.manual_seed(0)
    inception = SmallInception().eval()
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((8, SmallInception.POOL))
    reference = ReferenceStats(mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), pool=pool)
    return make_tiny_dit(in_channels=4), make_vae(), inception, reference


def test_shards_cover_every_index_once():
    assert [list(shard(5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert sum(len(shard(50_000, r, 8)) for r in range(8)) == 50_000


def test_guidance_only_on_the_first_three_channels():
    model, vae, _, _ = _parts()
    images = sample_decoded(model, vae, SETTINGS, range(0, 2))
    assert images.dtype == torch.uint8 and images.shape == (2, 8, 8, 3)
    assert GUIDED_CHANNELS == 3
    # a shard draws what the whole run draws for the same indices: the same noise, through sums whose order
    # depends on the batch (float32 rounding: decoded values 6e-7 apart here), so a pixel may land one uint8
    # level apart where its value sits on a rounding boundary, never more
    alone = sample_decoded(model, vae, SETTINGS, range(1, 2))
    assert int((alone.int() - images[1:2].int()).abs().max()) <= 1


def _rank(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model, vae, inception, reference = _parts()
        env = DistEnv(rank, 2, torch.device("cpu"), False)
        result = evaluate_imagenet({"FP": model}, SETTINGS, vae=vae, inception=inception, reference=reference,
                                   env=env)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path, one_thread):
    model, vae, inception, reference = _parts()
    alone = evaluate_imagenet({"FP": model}, SETTINGS, vae=vae, inception=inception, reference=reference)
    assert np.isfinite(alone["FP"]["fid"]) and {"is", "precision", "recall"} <= set(alone["FP"])
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    ranks = [json.load(open(f"{out}.{r}")) for r in range(2)]
    for r in ranks:
        r["FP"].pop("sample_seconds_rank0")
    assert ranks[0] == ranks[1]  # every rank returns the gathered scores
    for key in ("fid", "is", "precision", "recall"):
        assert ranks[0]["FP"][key] == pytest.approx(alone["FP"][key], rel=1e-9, abs=1e-9), key
    assert ranks[0]["world_size"] == 2 and os.path.exists(f"{out}.1")
