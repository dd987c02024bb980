import pytest
import torch

from ditq.calib.reservoir import RowReservoir, layer_generator


def stream(reservoir, n_rows, batch, step_of=lambda start: 0):
    for start in range(0, n_rows, batch):
        index = torch.arange(start, min(n_rows, start + batch), dtype=torch.float32)
        reservoir.add(index[:, None].repeat(1, 3), step_of(start))  # row i holds the value i


def test_never_holds_more_than_its_capacity():
    reservoir = RowReservoir(50, layer_generator(0, "a"))
    for _ in range(40):
        reservoir.add(torch.randn(37, 8), 0)
        assert reservoir.count <= 50 and reservoir.rows.shape[0] <= 50
    assert reservoir.seen == 40 * 37 and reservoir.sample()[0].shape == (50, 8)


def test_keeps_everything_while_under_capacity_in_arrival_order():
    reservoir = RowReservoir(100, layer_generator(0, "a"))
    stream(reservoir, 30, 7, step_of=lambda start: start // 7)
    rows, steps = reservoir.sample()
    assert torch.equal(rows[:, 0], torch.arange(30.0))
    assert torch.equal(steps, torch.arange(30) // 7)
    assert reservoir.rows.shape[0] < 100  # a layer that sees few rows does not allocate the bound


def test_sample_is_uniform_over_the_stream_and_tags_each_row():
    reservoir = RowReservoir(1000, layer_generator(3, "blocks.0.attn.qkv"))
    stream(reservoir, 20000, 500, step_of=lambda start: start // 2000)
    rows, steps = reservoir.sample()
    index = rows[:, 0].long()
    assert len(set(index.tolist())) == 1000
    assert torch.equal(steps, index // 2000)  # every row knows the step it came from
    assert torch.equal(index, index.sort().values)
    per_step = torch.bincount(steps, minlength=10)
    assert per_step.min() > 60 and per_step.max() < 140, per_step  # 100 expected per step


def test_seeded_and_independent_per_layer():
    def kept(seed, name):
        reservoir = RowReservoir(64, layer_generator(seed, name))
        stream(reservoir, 5000, 250)
        return reservoir.sample()[0][:, 0]

    assert torch.equal(kept(0, "a"), kept(0, "a"))
    assert not torch.equal(kept(0, "a"), kept(1, "a"))
    assert not torch.equal(kept(0, "a"), kept(0, "b"))


def test_zero_capacity_keeps_nothing():
    reservoir = RowReservoir(0, layer_generator(0, "a"))
    reservoir.add(torch.randn(10, 4), 0)
    assert reservoir.sample() is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rows_keep_the_dtype_the_layer_saw(dtype):
    reservoir = RowReservoir(8, layer_generator(0, "a"))
    x = torch.randn(20, 4).to(dtype)
    reservoir.add(x, 0)
    rows, _ = reservoir.sample()
    assert rows.dtype == dtype and all(any(torch.equal(r, row) for row in x) for r in rows)
