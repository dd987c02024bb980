"""Mix'n'Match searched: one served width per nested layer of one MatQuant checkpoint, under a bit budget."""

import json
import math

import pytest
import torch

import ditq
from ditq.qat import QAT, convert, prepare
from ditq.quant.served import average_bits, served_widths, slice_bits_per_weight
from ditq.search import BitsSearch, SearchConfig, main, run_search
from tests.search.test_search import Counting
from tests.tiny import make_tiny_mnist_dit

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = (8, 6, 4, 3, 2)
NESTED = QAT(w_bits=8, stored_bits=8, nested_bits=WIDTHS)  # converted untrained: int8 round to nearest
CONFIG = SearchConfig(generations=3, population=6, top_k=2, n_crossover=3, n_mutation=3, mutation_prob=0.3, seed=1)
X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
T, Y = torch.tensor([10, 900]), torch.tensor([1, 2])


@pytest.fixture(scope="module")
def fp_and_checkpoint(tmp_path_factory):
    """(the FP model, the path of its nested int8 checkpoint)."""
    fp = make_tiny_mnist_dit()
    nested = convert(prepare(make_tiny_mnist_dit(), NESTED))
    return fp, ditq.save(nested, tmp_path_factory.mktemp("nested") / "nested.safetensors")


def test_a_stored_slice_costs_its_codes_slot_and_the_shared_scales(fp_and_checkpoint):
    nested = ditq.load(fp_and_checkpoint[1])
    search = BitsSearch(nested, budget=3.5, cost="stored")
    layer = nested.get_submodule("blocks.0.mlp.fc2")  # in 512: one float32 scale per row
    costs = search.space.bits[search.space.names.index("blocks.0.mlp.fc2")]
    assert costs == {8: 8 + 32 / 512, 4: 4 + 32 / 512, 2: 2 + 32 / 512}  # 6 and 3 cost as much as 8 and 4
    assert slice_bits_per_weight(layer.spec, 6, 512, layer.out_features, "stored") == costs[8]
    assert slice_bits_per_weight(layer.spec, 3, 512, layer.out_features, "stored") == costs[4]
    assert search.space.choices[0] == (8, 4, 2)  # of the checkpoint recipe's nested_bits, widest first
    assert BitsSearch(nested, widths=(6, 3, 2), budget=3.5).space.choices[0] == (6, 3, 2)
    with pytest.raises(ValueError, match="below the cheapest"):
        BitsSearch(nested, budget=2.0)  # the scales alone take more than nothing
    with pytest.raises(ValueError, match="widths"):
        BitsSearch(nested, widths=(4, 9), budget=3.5)
    with pytest.raises(ValueError, match="no nested layer"):
        BitsSearch(fp_and_checkpoint[0], budget=3.5)


def test_a_nominal_slice_costs_its_width_and_the_shared_scales(fp_and_checkpoint):
    """The paper's effective bits: every width is offered, int3 below int4, so a 3-bit budget can be met by
    more than uniform int3 (under the stored cost, int3 takes int4's slot and is never offered)."""
    nested = ditq.load(fp_and_checkpoint[1])
    uniform3 = average_bits(nested, dict.fromkeys(served_widths(nested), 3))
    search = BitsSearch(nested, budget=uniform3)
    assert search.cost == "nominal" and search.settings()["space"]["cost"] == "nominal"
    costs = search.space.bits[search.space.names.index("blocks.0.mlp.fc2")]
    assert costs == {w: w + 32 / 512 for w in WIDTHS}
    assert all(choices == WIDTHS for choices in search.space.choices)
    assert search.initial() == [(3,) * len(search.space.names)]  # the widest uniform width within budget
    stored = BitsSearch(nested, budget=uniform3, cost="stored")
    assert stored.initial() == [(2,) * len(stored.space.names)]  # int3 costs int4's slot there
    with pytest.raises(ValueError, match=r"cost='packed' is not one of \('nominal', 'stored'\)"):
        BitsSearch(nested, budget=3.0, cost="packed")


def test_the_extra_precision_int2_slice_costs_five_levels_nominally_and_a_4_bit_slot_stored():
    layer = convert(prepare(make_tiny_mnist_dit(), QAT(w_bits=2, stored_bits=8, nested_bits=(8, 2),
                                                       extra_precision=True))).get_submodule("blocks.0.mlp.fc2")
    scales = 32 / 512
    assert slice_bits_per_weight(layer.spec, 2, 512, layer.out_features) == pytest.approx(math.log2(5) + scales,
                                                                                          rel=1e-15)
    assert slice_bits_per_weight(layer.spec, 2, 512, layer.out_features, "stored") == 4 + scales  # 3-bit codes
    assert slice_bits_per_weight(layer.spec, 4, 512, layer.out_features) == 4 + scales  # wider slices: as ever


def test_search_respects_the_budget_resumes_and_its_plan_reloads_bit_exactly(fp_and_checkpoint, tmp_path):
    fp, path = fp_and_checkpoint
    nested = ditq.load(path)
    came_with = served_widths(nested)
    search = BitsSearch(nested, budget=3.5)
    whole = Counting(fp)
    expected = run_search(fp, search, CONFIG, tmp_path / "whole", fitness=whole, progress=False)
    assert whole.calls == expected.evaluations > CONFIG.population
    logged = [json.loads(line) for line in (tmp_path / "whole" / "evaluations.jsonl").read_text().splitlines()]
    assert max(record["bits"] for record in logged) <= 3.5 + 1e-9  # every candidate scored was within budget
    assert len({record["key"] for record in logged}) == len(logged) == expected.evaluations
    assert len(set(expected.best.values())) > 1  # a mix: no uniform width lands between 2 and 4 bits here
    assert served_widths(nested) == came_with  # the search leaves the model serving what it came with

    with pytest.raises(KeyboardInterrupt):  # killed in the middle of generation 1
        run_search(fp, search, CONFIG, tmp_path / "cut", fitness=Counting(fp, die_after=8), progress=False)
    resumed = Counting(fp)
    result = run_search(fp, search, CONFIG, tmp_path / "cut", fitness=resumed, progress=False)
    assert resumed.calls == expected.evaluations - 8  # nothing evaluated twice
    assert (result.best_key, result.best_fitness, result.history) == (
        expected.best_key, expected.best_fitness, expected.history)  # fmt: skip

    plan_file = tmp_path / "whole" / "plan.json"
    assert json.loads(plan_file.read_text()) == expected.output
    reloaded = ditq.load(path, bits=plan_file)
    assert served_widths(reloaded) == expected.best
    assert average_bits(reloaded, expected.best) == pytest.approx(expected.best_bits, abs=1e-12)
    searched = search.candidate(search.space.genome(expected.best))
    with torch.no_grad():
        assert torch.equal(reloaded(X, T, Y), searched(X, T, Y))
    assert Counting(fp)(reloaded) == pytest.approx(expected.best_fitness, rel=1e-6)


def test_a_resume_refuses_another_checkpoint(fp_and_checkpoint, tmp_path):
    fp, path = fp_and_checkpoint
    small = SearchConfig(generations=1, population=3, top_k=1, n_crossover=1, n_mutation=1)
    run_search(fp, BitsSearch(ditq.load(path), budget=3.5), small, tmp_path, fitness=Counting(fp), progress=False)
    other = ditq.load(path)
    with torch.no_grad():
        other.get_submodule("blocks.0.mlp.fc2").scales.mul_(2)
    with pytest.raises(ValueError, match="model.weights="):
        run_search(fp, BitsSearch(other, budget=3.5), small, tmp_path, fitness=Counting(fp), progress=False)


FLAGS = ["--fitness", "output", "--fitness-samples", "2", "--fitness-steps", "2", "--generations", "1",
         "--population", "3", "--top-k", "1", "--no-progress", "--device", "cpu"]  # fmt: skip


def test_cli_writes_a_plan(fp_and_checkpoint, tmp_path, capsys, monkeypatch):
    fp, path = fp_and_checkpoint
    monkeypatch.setattr("ditq.bundled.open_model", lambda *a, **k: (fp, "tiny"))
    argv = ["--space", "bits", "--checkpoint", str(path), "--budget", "3.5", "--widths", "8,4,2", "--out"]
    assert main([*argv, str(tmp_path / "s"), *FLAGS]) == 0
    out = capsys.readouterr().out
    assert "layers per width" in out and str(tmp_path / "s" / "plan.json") in out
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert set(plan.values()) <= {8, 4, 2}
    assert served_widths(ditq.load(path, bits=tmp_path / "s" / "plan.json")) == plan


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budget", "3.5"], "--space bits needs --checkpoint"),
        (["--checkpoint", "CKPT"], "needs --budget in bits per weight"),
        (["--checkpoint", "CKPT", "--budget", "g128"], "needs --budget in bits per weight"),
        (["--checkpoint", "CKPT", "--budget", "3.5", "--w-bits", "3"], "--w-bits apply to --space groups"),
        (["--checkpoint", "CKPT", "--budget", "3.5", "--widths", "8,9"], "--widths: '8,9': widths"),
        (["--checkpoint", "CKPT", "--budget", "2.01"], "below the cheapest"),
        (["--checkpoint", "OTHER", "--budget", "3.5"], "layer 'blocks.0.attn.qkv' has no Linear of its shape"),
        (["--checkpoint", "FP", "--budget", "3.5"], "no nested layer"),
    ],
)
def test_cli_names_bad_input_before_any_work(flags, message, fp_and_checkpoint, tmp_path, capsys, monkeypatch):
    fp, path = fp_and_checkpoint
    monkeypatch.setattr("ditq.bundled.open_model", lambda *a, **k: (fp, "tiny"))
    monkeypatch.setattr("ditq.search.run.make_fitness", lambda *a, **k: pytest.fail("work began"))
    other = ditq.save(convert(prepare(ditq.models.create("DiT-MNIST", depth=1, hidden_size=64, num_heads=2), NESTED)),
                      tmp_path / "other.safetensors")  # fmt: skip
    fp_file = ditq.save(fp, tmp_path / "fp.safetensors")
    files = {"CKPT": str(path), "OTHER": str(other), "FP": str(fp_file)}
    flags = [files.get(f, f) for f in flags]
    assert main(["--space", "bits", "--out", str(tmp_path / "s"), *flags, *FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ditq search: error: ") and message in err, err
    assert not (tmp_path / "s" / "state.json").exists()
