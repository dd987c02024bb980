"""SVDQuant: smoothing keeps the FP function, the branch plus the residual is the weight, the error falls with
the rank, SVDQuant beats RTN and SmoothQuant at W4A4, shared input groups are stored once, a killed run
resumes exactly, the fast search keeps what a float64 SVD search finds whatever the worker count, and bad
configurations are refused by name."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ditq
from ditq.api import shallow_clone
from ditq.fileformat import CheckpointError
from ditq.kernels.reference import linear_reference
from ditq.methods import svdquant as sq
from ditq.methods.smoothing import smooth_candidates
from ditq.methods.svdquant import SVDQuant, low_rank_branch, svdquant_group, svdquant_modules
from ditq.quant.spec import QuantSpec
from ditq.recipes import RTN, load_recipe, recipe_from_dict
from tests.tiny import make_tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")  # small SVDs and matmuls: threads cost more than they save

FAST = {"alphas": (0.0, 0.25, 0.5, 0.75), "weight_exponent": "1-alpha", "search_rows": 256}


def _outlier_layer(in_f: int = 128, out_f: int = 192, seed: int = 0):
    """A Linear and inputs with planted outlier input channels, as DiT activations have (SPEC §4)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    w[:, :3] *= 12.0  # weight outliers in three input channels
    def rows(n: int, s: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(s)
        x = torch.randn(n, in_f, generator=g)
        x[:, 5:9] *= 25.0  # activation outliers in four others
        return x
    return w, rows(1024, seed + 1), rows(1024, seed + 2)


def _group_error(w: torch.Tensor, x: torch.Tensor, result, recipe: SVDQuant) -> float:
    """Relative output error of the group's SVDQuant layer on rows x (the oracle's forward)."""
    from ditq.quant.primitives import dequantize

    codes, scales, _ = result.codes[0]
    w_hat = dequantize(codes, scales, None, recipe.group_size)
    spec = recipe.spec()
    y = linear_reference(x, w_hat, None, result.smooth, result.down, result.ups[0], None, None, spec)
    ref = x @ w.T
    return float((y - ref).square().mean() / ref.square().mean())


# ---- the algorithm, one layer ---------------------------------------------------------------------------


def test_smoothing_alone_leaves_the_fp_output_unchanged():
    w, x, _ = _outlier_layer()
    bias = torch.randn(w.shape[0])
    spec = QuantSpec(w_bits=8, smooth=True)  # no activation quantization: the function must be the FP one
    candidates = smooth_candidates(x.abs().amax(0), w.abs().amax(0), (0.0, 0.3, 0.5, 0.9), "both")
    assert any(bool((s == 1).all()) for _, _, s in candidates)  # "no smoothing" is always a candidate
    for alpha, beta, s in candidates:
        y = linear_reference(x, w * s, bias, s, None, None, None, None, spec)  # stored W·diag(s), forward x / s
        assert torch.allclose(y, F.linear(x, w, bias), rtol=1e-4, atol=1e-4), (alpha, beta)
    _, _, s = next(c for c in candidates if c[:2] == (0.5, 0.5))
    before = x.abs().amax(0)
    after = (x / s).abs().amax(0)
    assert float(after.max() / after.median()) < 0.5 * float(before.max() / before.median())  # outliers flattened


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_low_rank_branch_plus_residual_reconstructs_the_weight(method):
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(600, 300, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(700, 300, generator=gen))
    sigma = torch.logspace(2, -2, 300)
    w = (u * sigma) @ v.T  # (600, 700), decaying spectrum
    down, up = low_rank_branch(w, 32, method, seed=3)
    assert down.shape == (700, 32) and up.shape == (32, 600)
    tail = float(sigma[32:].square().sum().sqrt())  # Eckart–Young: the best any rank-32 branch can do
    assert float(torch.linalg.norm(w - (down @ up).T)) == pytest.approx(tail, rel=1e-3)
    full_down, full_up = low_rank_branch(w[:, :64], 64, method)
    assert torch.allclose((full_down @ full_up).T, w[:, :64], atol=1e-3)  # full rank: the weight itself


def test_quantized_layer_reconstructs_the_smoothed_weight():
    """What the method stores: Q(R) + (L1 L2)ᵀ = W·diag(s), up to the residual's own 8-bit rounding."""
    w, x, _ = _outlier_layer()
    recipe = SVDQuant(w_bits=8, a_bits=None, a_group_size=None, rank=16, **FAST)
    result = svdquant_group([w], x, x.abs().amax(0), recipe)
    from ditq.quant.primitives import dequantize

    codes, scales, _ = result.codes[0]
    rebuilt = dequantize(codes, scales, None, 64) + (result.down @ result.ups[0]).T
    target = w * result.smooth
    assert float((rebuilt - target).abs().max()) < 2 * float(scales.max())
    assert _group_error(w, x, result, recipe) < 1e-4


def test_error_falls_as_the_rank_rises_on_planted_outliers():
    w, x, held_out = _outlier_layer()
    errors = []
    for rank in (0, 4, 8, 16, 32):
        recipe = SVDQuant(rank=rank, **FAST)
        errors.append(_group_error(w, held_out, svdquant_group([w], x, x.abs().amax(0), recipe), recipe))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_refinement_and_gptq_lower_the_error():
    w, x, held_out = _outlier_layer()
    base = SVDQuant(rank=8, **FAST)
    refined = svdquant_group([w], x, x.abs().amax(0), replace(base, refine_iters=3))
    assert refined.info["error"] <= refined.info["error_search"]
    # GPTQ needs correlated inputs to beat rounding: mix the channels (weight error only, A16).
    mix = torch.randn(128, 128, generator=torch.Generator().manual_seed(4)) / 128**0.5
    x, held_out = x @ mix, held_out @ mix
    a16 = replace(base, a_bits=None, a_group_size=None)
    plain = _group_error(w, held_out, svdquant_group([w], x, x.abs().amax(0), a16), a16)
    with_gptq = replace(a16, gptq=True)
    assert _group_error(w, held_out, svdquant_group([w], x, x.abs().amax(0), with_gptq), with_gptq) < 0.8 * plain


# ---- the method on a tiny DiT ---------------------------------------------------------------------------


def _dit_with_outliers() -> nn.Module:
    """A tiny DiT whose blocks matter (adaLN gates of order one) and whose modulated activations have outlier
    channels (large shifts on a few channels), as trained DiTs do."""
    model = make_tiny_dit()
    hidden = model.config["hidden_size"]
    with torch.no_grad():
        for block in model.blocks:
            adaln = block.adaLN_modulation[1]
            adaln.weight.mul_(10.0)
            adaln.bias[0:4] += 8.0  # shift_msa: outliers into qkv
            adaln.bias[3 * hidden:3 * hidden + 4] += 8.0  # shift_mlp: outliers into fc1
    return model


@pytest.fixture(scope="module")
def dit_and_calib():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (a module fixture is set up before their one_thread)
    try:
        model = _dit_with_outliers()
        calib = ditq.calibrate(model, n_samples=4, steps=6, rows_per_layer=256, seed=1)
    finally:
        torch.set_num_threads(before)
    gen = torch.Generator().manual_seed(9)
    inputs = (torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 1000, (8,), generator=gen),
              torch.randint(0, 10, (8,), generator=gen))
    return model, calib, inputs


def _model_error(model, quantized, inputs) -> float:
    with torch.no_grad():
        ref, out = model(*inputs), quantized(*inputs)
    return float((out - ref).square().mean() / ref.square().mean())


def test_svdquant_w4a4_beats_rtn_and_smoothquant_on_a_tiny_dit(dit_and_calib):
    model, calib, inputs = dit_and_calib
    rows = {
        "rtn": RTN(w_bits=4, group_size=64, a_bits=4, a_group_size=64),
        "smoothquant": SVDQuant(rank=0, **FAST),
        "svdquant": SVDQuant(rank=16, **FAST),
    }
    errors = {k: _model_error(model, ditq.quantize(shallow_clone(model), r, calib), inputs) for k, r in rows.items()}
    assert errors["svdquant"] < 0.5 * errors["smoothquant"], errors
    assert errors["smoothquant"] < 0.9 * errors["rtn"], errors


def test_shared_input_group_stores_one_vector_and_one_down_projection(dit_and_calib, tmp_path):
    model, calib, inputs = dit_and_calib
    recipe = replace(load_recipe("svdquant-w4a4"), rank=8, **FAST)
    quantized = ditq.quantize(shallow_clone(model), recipe, calib)
    a, b = quantized.blocks[0].adaLN_modulation[1], quantized.blocks[1].adaLN_modulation[1]
    assert a.spec.input_group == b.spec.input_group is not None
    assert torch.equal(a.smooth, b.smooth) and torch.equal(a.lowrank_down, b.lowrank_down)
    assert not torch.equal(a.lowrank_up, b.lowrank_up)
    path = ditq.save(quantized, tmp_path / "q.safetensors")
    header = ditq.io.read_header(path)
    gid = a.spec.input_group
    assert header["input_groups"] == {gid: ["blocks.0.adaLN_modulation.1", "blocks.1.adaLN_modulation.1"]}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert {f"input_groups.{gid}.smooth", f"input_groups.{gid}.lowrank_down"} <= keys
    assert not any(k.startswith("blocks.0.adaLN_modulation.1.") and k.endswith(("smooth", "lowrank_down"))
                   for k in keys)
    loaded = ditq.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), quantized(*inputs))
    la, lb = loaded.blocks[0].adaLN_modulation[1], loaded.blocks[1].adaLN_modulation[1]
    assert la.lowrank_down.data_ptr() == lb.lowrank_down.data_ptr()


def test_w4a8_fp8_preset_is_closer_than_w4a4(dit_and_calib):
    model, calib, inputs = dit_and_calib
    w4a4 = replace(load_recipe("svdquant-w4a4"), rank=8, **FAST)
    w4a8 = replace(load_recipe("svdquant-w4a8"), rank=8, **FAST)
    assert w4a8.spec().a_format == "fp8" and w4a8.spec().a_group_size is None
    blocks = {"skip": None}  # adaLN in 16 bits, so the activation format decides
    e4 = _model_error(model, ditq.quantize(shallow_clone(model), replace(w4a4, **blocks), calib), inputs)
    e8 = _model_error(model, ditq.quantize(shallow_clone(model), replace(w4a8, **blocks), calib), inputs)
    assert e8 < 0.8 * e4, (e8, e4)


def test_killed_calibration_resumes_to_the_same_modules(dit_and_calib, tmp_path, monkeypatch):
    model, calib, _ = dit_and_calib
    recipe = replace(load_recipe("svdquant-w4a4"), rank=8, **FAST)
    targets = ditq.api.plan(model, recipe)
    clean, _ = svdquant_modules(model, targets, calib)
    real, calls, killed = sq.svdquant_group, [], []

    def dies_on_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 and not killed:
            killed.append(True)
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sq, "svdquant_group", dies_on_the_fourth)
    with pytest.raises(RuntimeError, match="killed"):
        svdquant_modules(model, targets, calib, state_dir=tmp_path / "state")
    assert len(list((tmp_path / "state").iterdir())) == 3
    calls.clear()
    resumed, _ = svdquant_modules(model, targets, calib, state_dir=tmp_path / "state")
    assert len(calls) == len(list((tmp_path / "state").iterdir())) - 3  # only the unfinished groups ran
    assert set(resumed) == set(clean)
    for name, module in clean.items():
        for key, tensor in module.state_dict().items():
            assert torch.equal(resumed[name].state_dict()[key], tensor), (name, key)
    # The resumed run ends with the same checkpoint as an uninterrupted one.
    whole = ditq.quantize(shallow_clone(model), recipe, calib)
    again = shallow_clone(model)
    sq.svdquant_quantize(again, recipe, calib, state_dir=tmp_path / "state")
    files = [ditq.save(m, tmp_path / f"{i}.safetensors") for i, m in enumerate((whole, again))]
    assert ditq.io.read_header(files[0])["sha256"] == ditq.io.read_header(files[1])["sha256"]
    other = replace(recipe, rank=4)
    with pytest.raises(CheckpointError, match="other inputs"):
        svdquant_modules(model, ditq.api.plan(model, other), calib, state_dir=tmp_path / "state")


# ---- bad configurations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (lambda: SVDQuant(rank=200, **FAST), r"blocks\.0\.attn\.qkv: rank=200 exceeds"),
        (lambda: SVDQuant(group_size=48, **FAST), r"blocks\.0\.attn\.qkv: group_size=48 does not divide"),
        (lambda: SVDQuant(a_group_size=96, **FAST), "a_group_size=96 does not divide"),
        (lambda: SVDQuant(input_groups=(("blocks.0.attn.qkv", "blocks.0.mlp.fc1"),), **FAST),
         "do not read the same input"),
        (lambda: SVDQuant(input_groups=(("blocks.0.attn.qkv", "blocks.0.nope"),), **FAST),
         r"\['blocks\.0\.nope'\] are not Linears"),
        (lambda: SVDQuant(input_groups=(("blocks.0.attn.qkv", "blocks.0.mlp.fc2"),), **FAST),
         "different in_features"),
    ],
)
def test_bad_configurations_are_refused_by_name(dit_and_calib, recipe, message):
    model, calib, _ = dit_and_calib
    with pytest.raises(ValueError, match=message):
        ditq.quantize(shallow_clone(model), recipe(), calib)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"alphas": (0.5, 1.5)}, r"alphas=\(0\.5, 1\.5\) must be a non-empty tuple of values in \[0, 1\]"),
        ({"alphas": (-0.1,)}, "in \\[0, 1\\]"),
        ({"alphas": ()}, "non-empty"),
        ({"rank": -1}, "rank=-1"),
        ({"input_groups": (("a",),)}, "at least two distinct layers"),
        ({"input_groups": (("a", "b"), ("b", "c"))}, r"\['b'\] appear in two groups"),
        ({"a_format": "fp8", "a_bits": 4}, "fp8 activations have 8 bits"),
        ({"weight_exponent": "half"}, "weight_exponent"),
        ({"search_rows": 0}, "search_rows=0"),
    ],
)
def test_bad_recipe_fields(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SVDQuant(**fields)


def test_needs_calibration_and_reads_json_lists(dit_and_calib):
    model, _, _ = dit_and_calib
    with pytest.raises(ValueError, match="SVDQuant needs calibration data"):
        ditq.quantize(shallow_clone(model), SVDQuant(**FAST))
    recipe = recipe_from_dict({"method": "svdquant", "alphas": [0.0, 0.5], "input_groups": [["a", "b"]]})
    assert recipe.alphas == (0.0, 0.5) and recipe.input_groups == (("a", "b"),)
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_generic_model_with_declared_group():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.a(x).sum(-1) + self.b(x).sum(-1)

    torch.manual_seed(0)
    model = TwoHeads()
    calib = ditq.calibrate(model, run=lambda m: m(torch.randn(64, 64)), rows_per_layer=64)
    quantized = ditq.quantize(shallow_clone(model), SVDQuant(rank=4, input_groups=(("a", "b"),), **FAST), calib)
    assert quantized.a.spec.input_group == quantized.b.spec.input_group == "svdquant0"
    assert torch.equal(quantized.a.lowrank_down, quantized.b.lowrank_down)
    ungrouped = ditq.quantize(shallow_clone(model), SVDQuant(rank=4, **FAST), calib)
    assert ungrouped.a.spec.input_group is None  # generic models have no groups unless declared


@pytest.mark.parametrize("preset", ["svdquant-w4a4", "svdquant-w4a8"])
def test_presets_quantize_blocks_and_adaln_only(preset):
    targets = set(ditq.api.plan(make_tiny_dit(), load_recipe(preset)))
    assert {"blocks.0.adaLN_modulation.1", "blocks.1.mlp.fc2", "blocks.0.attn.qkv"} <= targets
    assert not any(n.startswith(("final_layer", "t_embedder", "y_embedder", "x_embedder")) for n in targets)
    assert not any("adaLN" in n for n in ditq.api.plan(make_tiny_dit(), SVDQuant()))  # off unless asked


# ---- the fast paths keep the result ----------------------------------------------------------------------


def _svd_branch(weight, rank, *_args, **_kwargs):
    """The branch from a float64 SVD of the weight: the slow reference path."""
    u, sigma, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = sigma[:rank].sqrt()
    return (vh[:rank].T * root).float(), (u[:, :rank] * root).T.float()


@pytest.mark.parametrize("shape", [(192, 128), (96, 160)])  # tall (from WᵀW, also reused) and wide (from WWᵀ)
def test_exact_branch_is_the_float64_svd_to_float32_rounding(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=gen)
    w[:, :3] *= 12.0
    s = 2.0 ** torch.randint(-2, 3, (shape[1],), generator=gen).float()  # powers of two: W·diag(s) is exact
    ws, rank = w * s, 16
    u, sigma, vh = torch.linalg.svd(ws.double(), full_matrices=False)
    best = (u[:, :rank] * sigma[:rank]) @ vh[:rank]
    # Float64 up to the factors, each rounded to float32 (2^-24 relative), then r products summed in float32;
    # every |factor entry| is at most √σ_k, so each entry of down @ up is off by at most (r + 2)·2^-24·Σσ_k.
    bound = (rank + 2) * 2.0**-24 * float(sigma[:rank].sum())
    grams = [None] + ([s.double()[:, None] * (w.double().T @ w.double()) * s.double()] if shape[0] >= shape[1] else [])
    for gram in grams:
        down, up = low_rank_branch(ws, rank, "exact", gram=gram)
        assert float(((down @ up).T.double() - best).abs().max()) <= bound


def test_grid_search_picks_what_a_float64_svd_search_picks(monkeypatch):
    w, x, _ = _outlier_layer()
    recipe = SVDQuant(rank=16, **FAST)
    fast = svdquant_group([w], x, x.abs().amax(0), recipe)
    monkeypatch.setattr(sq, "low_rank_branch", _svd_branch)
    slow = svdquant_group([w], x, x.abs().amax(0), recipe)
    assert (fast.info["alpha"], fast.info["beta"]) == (slow.info["alpha"], slow.info["beta"])
    assert torch.equal(fast.smooth, slow.smooth)
    # The branches agree to float32 rounding; a residual code can then flip only where R sits within that
    # rounding of a step boundary, which moves the search error by far less than 1e-4 of itself.
    assert fast.info["error"] == pytest.approx(slow.info["error"], rel=1e-4)


def test_worker_count_does_not_change_the_group():
    w, x, _ = _outlier_layer()
    recipe = SVDQuant(rank=16, gptq=True, **FAST)
    one, three = (svdquant_group([w[:96], w[96:]], x, x.abs().amax(0), recipe, workers=n) for n in (1, 3))
    assert one.info == three.info
    for a, b in [(one.smooth, three.smooth), (one.down, three.down), *zip(one.ups, three.ups, strict=True)]:
        assert torch.equal(a, b)
    for a, b in zip(one.codes, three.codes, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
