"""Per-timestep precision: a nested model served at other widths at other sampling steps, from the same codes."""

import copy
import json

import pytest
import torch

import ditq
from ditq.bits_schedule import BitsSchedule
from ditq.cli import main
from ditq.io import apply_served_bits
from ditq.qat import QAT, convert, prepare
from ditq.quant.served import average_bits, served_widths
from tests.tiny import make_tiny_mnist_dit

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = [1, 7]
STEPS = 10
SCHEDULE = [(0, 2), (0.5, {"blocks.0.*": 8, "*": 4}), (0.8, 8)]


@pytest.fixture(scope="module")
def nested():
    """A tiny DiT-MNIST with int8 codes that serve 8, 4 and 2 bits; it serves 8."""
    return convert(prepare(make_tiny_mnist_dit(), QAT(w_bits=8, stored_bits=8, nested_bits=(8, 4, 2))))


def record_widths(model):
    """Every model call's served widths, appended to the list returned."""
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(served_widths(module)))
    return seen, handle


def test_each_step_serves_its_entry_and_the_model_comes_back(nested):
    model = copy.deepcopy(nested)
    schedule = BitsSchedule(SCHEDULE)
    assert [schedule.entry_at(k, STEPS) for k in range(STEPS)] == [0] * 5 + [1] * 3 + [2] * 2
    assert schedule.steps_served(STEPS) == [5, 3, 2]
    expected = schedule.widths(model)
    names = list(served_widths(model))
    assert {expected[1][n] for n in names if n.startswith("blocks.0.")} == {8}
    assert {expected[1][n] for n in names if not n.startswith("blocks.0.")} == {4}
    seen, handle = record_widths(model)
    try:
        ditq.sample(model, LABELS, steps=STEPS, cfg_scale=1.5, bits_schedule=SCHEDULE)
    finally:
        handle.remove()
    assert seen == [expected[schedule.entry_at(k, STEPS)] for k in range(STEPS)]  # one guided call per step
    assert set(served_widths(model).values()) == {8}  # serves its own widths again


def test_batches_each_run_the_whole_schedule(nested):
    model = copy.deepcopy(nested)
    seen, handle = record_widths(model)
    try:
        ditq.sample(model, LABELS, steps=4, cfg_scale=1.0, batch_size=1, bits_schedule=[(0, 2), (0.5, 4)])
    finally:
        handle.remove()
    assert [set(widths.values()) for widths in seen] == [{2}, {2}, {4}, {4}] * 2


def test_a_constant_schedule_is_plain_sampling_at_that_width(nested):
    model = copy.deepcopy(nested)
    scheduled = ditq.sample(model, LABELS, steps=STEPS, bits_schedule=[(0, 4)])
    ditq.set_served_bits(model, 4)
    assert torch.equal(scheduled, ditq.sample(model, LABELS, steps=STEPS))
    ditq.set_served_bits(model, 8)
    assert torch.equal(ditq.sample(model, LABELS, steps=STEPS, bits_schedule=[(0, 8)]),
                       ditq.sample(model, LABELS, steps=STEPS))  # fmt: skip


def test_average_bits_weighs_each_entry_by_its_steps(nested):
    schedule = BitsSchedule(SCHEDULE)
    per_entry = [average_bits(nested, widths) for widths in schedule.widths(nested)]
    assert per_entry[0] < per_entry[1] < per_entry[2]
    expected = (5 * per_entry[0] + 3 * per_entry[1] + 2 * per_entry[2]) / 10
    assert schedule.average_bits(nested, STEPS) == pytest.approx(expected, rel=1e-12)
    uniform4 = dict.fromkeys(served_widths(nested), 4)
    assert BitsSchedule([(0, 4)]).average_bits(nested, STEPS) == average_bits(nested, uniform4)


def test_the_model_comes_back_when_sampling_fails(nested):
    model = copy.deepcopy(nested)
    with pytest.raises(RuntimeError, match="stop"), BitsSchedule([(0, 2)]).serving(model) as before_step:
        before_step(0, STEPS)
        assert set(served_widths(model).values()) == {2}
        raise RuntimeError("stop")
    assert set(served_widths(model).values()) == {8}


def test_served_widths_reads_a_plan_as_applying_it_does(nested):
    model = copy.deepcopy(nested)
    plan = {"blocks.0.attn.*": 8, "*": 2, "blocks.0.mlp.fc1": 4}  # fc1 is taken by "*" first
    predicted = served_widths(model, plan)
    apply_served_bits(model, plan)
    assert served_widths(model) == predicted and set(predicted.values()) == {8, 2}


@pytest.mark.parametrize(
    "entries, message",
    [
        ([], "non-empty list"),
        ([(0.1, 4)], "entry 0: from=0.1; the first entry starts at 0"),
        ([(0, 4), (0.5, 2), (0.5, 8)], "entry 2: from=0.5"),
        ([(0, 4), (1.0, 2)], r"entry 1: from=1.0 must be a fraction of the steps in \[0, 1\)"),
        ([(0, 4), (float("nan"), 2)], "entry 1: from=nan"),
        ([(0, 9)], r"entry 0: bits: pattern '\*' → 9: bits must be an int in 2\.\.8"),
        ([(0, True)], "entry 0: bits must be an int"),
        ([(True, 4)], "entry 0: from=True"),
        ([(0, 4, 2)], "entry 0: .* is not a \\(from, bits\\) pair"),
    ],
)
def test_bad_schedules_are_named(entries, message):
    with pytest.raises(ValueError, match=message):
        BitsSchedule(entries)


@pytest.mark.parametrize(
    "entries, message",
    [
        ([(0, {"blocks.0.*": 4})], r"entry 0: no pattern matches nested layers \['blocks.1"),
        ([(0, 4), (0.5, {"blocks.9.*": 4, "*": 2})], "entry 1: pattern 'blocks.9.*' matches no nested layer"),
    ],
)
def test_entries_that_do_not_fit_the_model_are_refused_before_sampling(nested, entries, message):
    model = copy.deepcopy(nested)
    seen, handle = record_widths(model)
    try:
        with pytest.raises(ValueError, match=message):
            ditq.sample(model, LABELS, steps=STEPS, bits_schedule=entries)
    finally:
        handle.remove()
    assert seen == []


def test_json_schedule_reads_plan_files_beside_it(nested, tmp_path):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "mixed.json").write_text(json.dumps({"blocks.0.*": 8, "*": 2}))
    (tmp_path / "schedule.json").write_text(json.dumps([[0, 2], [0.5, "plans/mixed.json"], [0.75, 8]]))
    schedule = BitsSchedule.read(tmp_path / "schedule.json")
    assert schedule == BitsSchedule([(0, 2), (0.5, {"blocks.0.*": 8, "*": 2}), (0.75, 8)])
    assert BitsSchedule.parse("0:2,0.5:4") == BitsSchedule([(0, 2), (0.5, 4)])
    for text in ("0:2,0.5", "0:2,x:4", "0:2,inf:4", "0:2.5"):
        with pytest.raises(ValueError, match="is not FROM:BITS"):
            BitsSchedule.parse(text)
    (tmp_path / "bad.json").write_text(json.dumps([[0, 2], [0.5, "missing.json"]]))
    with pytest.raises(ValueError, match=r"bad.json: bits schedule entry 1: bits plan .*missing.json: cannot be read"):
        BitsSchedule.read(tmp_path / "bad.json")


def test_cli_samples_with_a_schedule_and_names_bad_ones(nested, tmp_path, capsys):
    path = ditq.save(nested, tmp_path / "nested.safetensors")
    fp = ditq.save(make_tiny_mnist_dit(), tmp_path / "fp.safetensors")
    flags = ["sample", "--samples", "2", "--steps", "4", "--device", "cpu"]
    assert main([*flags, "--model", str(path), "--bits-schedule", "0:2,0.5:8", "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "steps per entry: [2, 2]" in out and (tmp_path / "a.png").is_file()
    for model, schedule, message in [
        (path, "0:2,0.5", "--bits-schedule: bits schedule '0:2,0.5': '0.5' is not FROM:BITS"),
        (path, "0.2:2", "--bits-schedule: bits schedule entry 0: from=0.2"),
        (fp, "0:2", "has no nested layer"),
    ]:
        argv = [*flags, "--model", str(model), "--bits-schedule", schedule, "--out", str(tmp_path / "b.png")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "b.png").exists()
