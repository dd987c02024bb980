"""Group-size search: space and budget, genetic operators, fitness cache, kill/resume, recipe, CLI, ranks."""

import json
import re
import shlex
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

import ditq
from ditq.api import shallow_clone
from ditq.methods.qdit import QDiT
from ditq.search import (
    FitnessSettings,
    GroupSearch,
    SearchConfig,
    genome_key,
    main,
    run_search,
)
from ditq.search.fitness import Fitness, make_fitness
from ditq.search.genetic import crossover, mutate, next_population, random_genome, repair, top_k
from tests.tiny import make_tiny_mnist_dit

CANDIDATES = (32, 64, 128, 256, None)


@pytest.fixture(scope="module")
def fp_and_calib():
    model = make_tiny_mnist_dit()
    return model, ditq.calibrate(model, n_samples=2, steps=3, rows_per_layer=128)


@pytest.fixture(scope="module")
def search(fp_and_calib):
    return GroupSearch(fp_and_calib[0], QDiT(w_bits=4), CANDIDATES, "g128")


@pytest.fixture(scope="module")
def space(search):
    return search.space


def test_space_offers_only_dividing_candidates_and_budget_is_the_uniform_baseline(search, space, fp_and_calib):
    fp = fp_and_calib[0]
    for name, allowed in zip(space.names, space.choices, strict=True):
        width = fp.get_submodule(name).in_features
        assert all(g is None or (width % g == 0 and g < width) for g in allowed)
        assert None in allowed
    assert space.choices[space.names.index("blocks.0.attn.qkv")] == (32, 64, None)  # 128 = one group = per channel
    assert space.choices[space.names.index("blocks.0.mlp.fc2")] == (32, 64, 128, 256, None)
    assert space.budget == space.average_bits(search.uniform(128))
    with pytest.raises(ValueError, match="below the cheapest"):
        GroupSearch(fp, QDiT(w_bits=4), CANDIDATES, 4.0)
    with pytest.raises(ValueError, match="no candidate group size"):
        GroupSearch(fp, QDiT(w_bits=4), (96,), "g32")
    with pytest.raises(ValueError, match="budget 'g96'.*blocks.0.attn.qkv"):
        GroupSearch(fp, QDiT(w_bits=4), CANDIDATES, "g96")


def test_genetic_operators_stay_in_the_space_and_within_budget(space):
    rng = np.random.default_rng(0)
    parents = [random_genome(space, rng) for _ in range(4)]
    children = parents + [crossover(space, parents[0], parents[1], rng) for _ in range(30)]
    children += [mutate(space, parents[2], rng, 0.5) for _ in range(30)]
    finest = tuple(c[0] for c in space.choices)  # g32 everywhere: far over budget
    assert not space.within_budget(finest)
    children.append(repair(space, finest, rng))
    for child in children:
        space.check(child)  # every gene allowed for its layer
        assert space.within_budget(child)
    assert len({genome_key(c) for c in children}) > 10  # the operators do explore
    seen = {genome_key(p) for p in parents}
    new = next_population(space, parents, rng, size=12, n_crossover=4, n_mutation=4, prob=0.3, seen=seen)
    keys = [genome_key(c) for c in new]
    assert len(new) == 12 and len(set(keys)) == 12 and not seen & set(keys)
    assert top_k({"b": 1.0, "a": 1.0, "c": 0.5}, 2) == ["c", "a"]


class Counting(Fitness):
    """The `output` fitness, counting its calls; `die_after` simulates a kill mid-generation."""

    def __init__(self, fp, die_after=None):
        self.inner = make_fitness("output", fp, FitnessSettings(samples=2, steps=2))
        self.calls, self.die_after = 0, die_after

    def __call__(self, model):
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.inner(model)


CONFIG = SearchConfig(generations=3, population=6, top_k=2, n_crossover=3, n_mutation=3, seed=3)


def test_cache_kill_and_resume_give_the_uninterrupted_result(fp_and_calib, tmp_path, one_thread):
    fp, calib = fp_and_calib
    search = GroupSearch(fp, QDiT(w_bits=3), calib=calib)
    whole = Counting(fp)
    expected = run_search(fp, search, CONFIG, tmp_path / "whole", fitness=whole, progress=False)
    assert whole.calls == expected.evaluations  # each genome evaluated once: the cache answers repeats
    assert expected.evaluations > CONFIG.population  # later generations added new genomes
    lines = (tmp_path / "whole" / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == expected.evaluations

    with pytest.raises(KeyboardInterrupt):  # killed in the middle of generation 1
        run_search(fp, search, CONFIG, tmp_path / "cut", fitness=Counting(fp, die_after=8), progress=False)
    with open(tmp_path / "cut" / "evaluations.jsonl", "a") as log:
        log.write('{"torn": ')  # a line cut short by the kill
    resumed = Counting(fp)
    result = run_search(fp, search, CONFIG, tmp_path / "cut", fitness=resumed, progress=False)
    assert resumed.calls == expected.evaluations - 8  # nothing evaluated twice
    assert (result.best_key, result.best_fitness, result.history) == (
        expected.best_key, expected.best_fitness, expected.history)  # fmt: skip
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["fitness"] == json.loads(
        (tmp_path / "whole" / "state.json").read_text())["fitness"]  # fmt: skip
    again = Counting(fp)
    run_search(fp, search, CONFIG, tmp_path / "cut", fitness=again, progress=False)
    assert again.calls == 0  # a finished search only reports
    with pytest.raises(ValueError, match="config.seed=3"):
        run_search(fp, search, replace(CONFIG, seed=4), tmp_path / "cut", fitness=again, progress=False)

    # the recipe file builds, through `ditq.quantize`, the very model the search scored
    recipe = ditq.load_recipe(tmp_path / "whole" / "recipe.json")
    best = search.space.genome(expected.best)
    assert recipe == search.recipe(best) and recipe.to_dict() == expected.output and recipe.w_bits == 3
    final = ditq.prepare_for_inference(ditq.quantize(shallow_clone(fp), recipe, calib), "dequantized")
    searched = search.candidate(best)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([10, 500]), torch.tensor([1, 2])
    assert torch.equal(final(x, t, y), searched(x, t, y))
    assert Counting(fp)(final) == pytest.approx(expected.best_fitness, rel=1e-6)
    assert expected.best_bits <= expected.budget_bits + 1e-9


def test_fitnesses_rank_a_bad_model_below_a_good_one(fp_and_calib, one_thread):
    fp, calib = fp_and_calib
    four = GroupSearch(fp, QDiT(w_bits=4), CANDIDATES, "g128", calib=calib)
    good = four.candidate(four.uniform(None))
    bad = GroupSearch(fp, QDiT(w_bits=2), CANDIDATES, "g128", calib=calib).candidate(four.uniform(None))
    for name in ("psnr", "output"):
        fitness = make_fitness(name, fp, FitnessSettings(samples=2, steps=2))
        assert fitness(fp) <= fitness(good) < fitness(bad)


def test_cli_writes_a_recipe_and_names_bad_input(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setattr("ditq.bundled.open_model", lambda *a, **k: (make_tiny_mnist_dit(), "tiny"))
    flags = ["--calib-samples", "2", "--calib-steps", "2", "--fitness-samples", "2", "--fitness-steps", "2",
             "--generations", "1", "--population", "3", "--top-k", "1", "--no-progress", "--device", "cpu"]
    assert main(["--out", str(tmp_path / "s"), "--fitness", "output", "--w-bits", "3", *flags]) == 0
    assert isinstance(ditq.load_recipe(tmp_path / "s" / "recipe.json"), QDiT)
    assert "bits per weight" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "t"), "--budget", "g96", *flags]) == 2
    assert "g96" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "u"), "--candidates", "32,x", *flags]) == 2
    assert "--candidates: 'x'" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "v"), "--widths", "8,4", *flags]) == 2
    assert "--widths apply to --space bits" in capsys.readouterr().err


# ---- bad budgets, bad saved files, non-finite fitness, Ctrl-C ---------------------------------------------

SMALL = SearchConfig(generations=1, population=3, top_k=1, n_crossover=1, n_mutation=1, seed=0)
RTN_BASE = QDiT(w_bits=3, gptq=False)  # round to nearest: no calibration, quick candidates


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, "g0", "x"])
def test_budget_out_of_range_is_refused_up_front(budget, fp_and_calib):
    with pytest.raises(ValueError, match="budget"):
        GroupSearch(fp_and_calib[0], QDiT(w_bits=4), CANDIDATES, budget)


@pytest.fixture(scope="module")
def finished(fp_and_calib, tmp_path_factory):
    """A finished small search: its folder holds state.json and evaluations.jsonl."""
    out = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread` does for a test
    try:
        run_search(fp_and_calib[0], GroupSearch(fp_and_calib[0], RTN_BASE), SMALL, out,
                   fitness=Counting(fp_and_calib[0]), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _resume(finished, tmp_path, fp_and_calib, edit_state=None, edit_log=None):
    """Copy the finished search, edit its files, resume it: the error it raises."""
    out = tmp_path / "search"
    shutil.copytree(finished, out)
    if edit_state is not None:
        (out / "state.json").write_text(edit_state((out / "state.json").read_text()))
    if edit_log is not None:
        (out / "evaluations.jsonl").write_text(edit_log((out / "evaluations.jsonl").read_text()))
    fp = fp_and_calib[0]
    with pytest.raises(ValueError) as info:
        run_search(fp, GroupSearch(fp, RTN_BASE), SMALL, out, fitness=Counting(fp), progress=False)
    return out, str(info.value)


def _state_edit(change):
    def edit(text):
        state = json.loads(text)
        change(state)
        return json.dumps(state)  # NaN written as json.dumps writes it
    return edit


BAD_STATES = {
    "nan_fitness": _state_edit(lambda s: s["fitness"].update({next(iter(s["fitness"])): float("nan")})),
    "text_fitness": _state_edit(lambda s: s["fitness"].update({next(iter(s["fitness"])): "low"})),
    "rng_of_another_generator": _state_edit(lambda s: s.update(rng={"bit_generator": "MT19937"})),
    "rng_garbled": _state_edit(lambda s: s.update(rng={"bit_generator": "PCG64", "state": 5})),
    "population_bad_key": _state_edit(lambda s: s.update(population=["32,x"])),
    "population_of_numbers": _state_edit(lambda s: s.update(population=[5])),
    "history_of_numbers": _state_edit(lambda s: s.update(history=[1])),
    "negative_generation": _state_edit(lambda s: s.update(generation=-1)),
    "seconds_missing": _state_edit(lambda s: s.pop("seconds")),
    "other_config": _state_edit(lambda s: s["settings"].update(config=[1])),
    "truncated": lambda text: text[: len(text) // 2],
}


@pytest.mark.parametrize("edit", BAD_STATES.values(), ids=BAD_STATES.keys())
def test_resume_names_the_bad_state_file(edit, finished, tmp_path, fp_and_calib, one_thread):
    out, message = _resume(finished, tmp_path, fp_and_calib, edit_state=edit)
    assert message.startswith(f"{out / 'state.json'}: "), message


@pytest.mark.parametrize(
    "fitness", ["NaN", "Infinity", '"low"', "true"],
)
def test_resume_names_the_log_line_with_a_bad_fitness(fitness, finished, tmp_path, fp_and_calib, one_thread):
    def edit(text):
        lines = text.splitlines()
        lines[1] = re.sub(r'"fitness": [^,]+', f'"fitness": {fitness}', lines[1])
        return "\n".join(lines) + "\n"

    out, message = _resume(finished, tmp_path, fp_and_calib, edit_log=edit)
    assert message.startswith(f"{out / 'evaluations.jsonl'} line 2: fitness "), message


class Broken(Counting):
    """The `output` fitness, but the `at`-th candidate scores `value`."""

    def __init__(self, fp, at, value):
        super().__init__(fp)
        self.at, self.value = at, value

    def __call__(self, model):
        return self.value if self.calls + 1 == self.at else super().__call__(model)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_fitness_is_refused_and_never_written(value, fp_and_calib, tmp_path, one_thread):
    fp = fp_and_calib[0]
    with pytest.raises(ValueError, match=r"fitness of candidate [\w,]+ is (nan|inf)"):
        run_search(fp, GroupSearch(fp, RTN_BASE), SMALL, tmp_path, fitness=Broken(fp, 2, value), progress=False)
    for path in tmp_path.iterdir():  # strict JSON in every file
        assert "NaN" not in path.read_text() and "Infinity" not in path.read_text(), path


def test_cli_ctrl_c_keeps_the_evaluations_and_prints_the_command_that_resumes(tmp_path, capsys, monkeypatch,
                                                                              one_thread):
    import ditq.search.run

    monkeypatch.setattr("ditq.bundled.open_model", lambda *a, **k: (make_tiny_mnist_dit(), "tiny"))
    flags = ["--calib-samples", "2", "--calib-steps", "2", "--fitness-samples", "2", "--fitness-steps", "2",
             "--generations", "2", "--population", "3", "--top-k", "1", "--fitness", "output", "--w-bits", "3",
             "--no-gptq", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main([*flags, "--out", str(tmp_path / "whole")]) == 0
    real_make_fitness = ditq.search.run.make_fitness

    def ctrl_c_at_the_fifth_candidate(*args, **kwargs):  # generation 0 saved, one of generation 1 logged
        fitness, calls = real_make_fitness(*args, **kwargs), []

        def score(model):
            if len(calls) == 4:
                raise KeyboardInterrupt
            calls.append(1)
            return fitness(model)

        return score

    monkeypatch.setattr(ditq.search.run, "make_fitness", ctrl_c_at_the_fifth_candidate)
    cut = tmp_path / "cut"
    capsys.readouterr()
    try:
        code = main([*flags, "--out", str(cut)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped ditq search as a KeyboardInterrupt")
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1, err
    assert err.startswith(f"ditq search: interrupted; finished evaluations are kept in {cut} "
                          "(state.json, evaluations.jsonl); resume with: "), err  # fmt: skip
    assert len((cut / "evaluations.jsonl").read_text().splitlines()) == 4

    monkeypatch.setattr(ditq.search.run, "make_fitness", real_make_fitness)
    command = shlex.split(err.split("resume with: ")[1])
    assert command == ["ditq", "search", *flags, "--out", str(cut)]
    assert main(command[2:]) == 0
    whole, resumed = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("whole", "cut"))
    assert {k: v for k, v in whole.items() if k != "seconds"} == {k: v for k, v in resumed.items() if k != "seconds"}
