"""Thread choice: the count comes back after a block, tasks come back in order, and tasks spread over workers
compute exactly what they compute one after another on one thread."""

import pytest
import torch

import ditq
from ditq.api import shallow_clone
from ditq.eval.runner import SampleSettings, draw, draw_models
from ditq.recipes import RTN
from ditq.threads import map_tasks, torch_threads
from tests.tiny import make_tiny_mnist_dit


def test_thread_count_is_restored_after_the_block_even_on_error():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), torch_threads(1):
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("count", [0, -1, True, 1.5])
def test_bad_thread_counts_are_refused(count):
    with pytest.raises(ValueError, match="thread count must be a positive integer"), torch_threads(count):
        pass


def test_tasks_on_workers_equal_one_thread_runs_in_order():
    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(96 + 8 * i, 64, generator=gen) for i in range(6)]

    def task(m: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(m.T @ m) @ (m.T @ m)

    with torch_threads(1):
        expected = [task(m) for m in mats]
    for workers in (1, 3):
        with torch_threads(1):
            got = list(map_tasks(task, mats, workers))
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_models_sampled_side_by_side_draw_what_they_draw_alone():
    fp = make_tiny_mnist_dit()
    calib = ditq.calibrate(fp, n_samples=2, steps=2, seed=1)
    models = {"fp": fp, "quant": ditq.quantize(shallow_clone(fp), RTN(w_bits=4, a_bits=8), calib)}
    settings = SampleSettings(samples=6, steps=3, batch_size=2)  # three batches per model: six tasks
    with torch_threads(1):
        alone = {name: draw(model, settings)[0] for name, model in models.items()}  # one run per model
    together = draw_models(models, settings, workers=2, progress=True)  # one bar counting every forward
    assert list(together) == ["fp", "quant"]  # the caller's order, whichever started first
    for name in models:
        assert torch.equal(together[name][0], alone[name]), name
