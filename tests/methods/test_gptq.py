"""GPTQ: beats round-to-nearest on the output error when inputs are correlated, stores exactly what
`QuantLinear.set_codes` takes for every group size and symmetry, equals RTN when H is the identity, and
names its bad arguments."""

import pytest
import torch
from torch import nn

from ditq.methods.gptq import gptq, hessian
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated(rows: int = 512, dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels are strongly correlated and unequal in scale, as a Linear's inputs are."""
    mix = torch.randn(dim, dim, generator=torch.Generator().manual_seed(123)) / dim**0.5  # one distribution
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, dim, generator=gen) * torch.linspace(3.0, 0.1, dim)
    return latent @ mix + 0.3 * torch.randn(rows, dim, generator=gen)


def _linear(out_f: int = 64, in_f: int = 128, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def _output_error(linear: nn.Linear, module: QuantLinear, x: torch.Tensor) -> float:
    w_hat = module.dequantized_weight()
    return float((x @ (linear.weight.detach() - w_hat).T).square().mean())


def _gptq_module(linear: nn.Linear, spec: QuantSpec, x: torch.Tensor, **kw) -> QuantLinear:
    codes, scales, zeros = gptq(linear.weight.detach(), hessian(x), spec, **kw)
    module = QuantLinear(linear.in_features, linear.out_features, spec)
    module.set_codes(codes, scales, zeros)
    return module


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(w_bits=4, group_size=64),
        QuantSpec(w_bits=4, group_size=32, symmetric=False),
        QuantSpec(w_bits=3, group_size=None),
        QuantSpec(w_bits=8, group_size=128),
        QuantSpec(w_bits=4, group_size=8),
    ],
    ids=["w4g64", "w4g32asym", "w3perch", "w8g128", "w4g8"],
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(spec, act_order):
    linear, x = _linear(), _correlated()
    rtn = QuantLinear.from_linear(linear, spec)
    ours = _gptq_module(linear, spec, x, act_order=act_order, block_size=32)
    held_out = _correlated(seed=5)  # same distribution, other rows: not just fitted to the calibration rows
    assert _output_error(linear, ours, held_out) < 0.7 * _output_error(linear, rtn, held_out)


@pytest.mark.parametrize("group_size", [None, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_in_range_and_every_group_honoured(group_size, symmetric, bits):
    spec = QuantSpec(w_bits=bits, group_size=group_size, symmetric=symmetric)
    linear, x = _linear(out_f=16), _correlated(rows=256)
    with torch.no_grad():  # groups of very different magnitude: a scale shared across groups would show
        linear.weight.mul_(torch.logspace(-2, 1, 128))
    codes, scales, zeros = gptq(linear.weight.detach(), hessian(x), spec, act_order=True, block_size=24)
    n_groups = 1 if group_size is None else 128 // group_size
    assert scales.shape == (16, n_groups) and scales.dtype == torch.float32 and bool((scales > 0).all())
    if symmetric:
        assert codes.dtype == torch.int8 and zeros is None
        assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    else:
        assert codes.dtype == torch.uint8 and zeros.dtype == torch.uint8 and zeros.shape == scales.shape
        assert int(codes.max()) <= 2**bits - 1
    module = QuantLinear(128, 16, spec)
    module.set_codes(codes, scales, zeros)  # exactly the layout the module stores
    assert torch.equal(module.weight_codes(), codes)
    if group_size is not None and group_size <= 32:
        first, last = scales[:, 0].mean(), scales[:, -1].mean()
        assert float(last / first) > 10  # the per-group scales really are per group


@pytest.mark.parametrize("group_size", [None, 8, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_gives_round_to_nearest(group_size, symmetric):
    """With H = I no error has anywhere to go: GPTQ must reduce to RTN exactly (scales from the weight)."""
    spec = QuantSpec(w_bits=4, group_size=group_size, symmetric=symmetric)
    linear = _linear()
    codes, scales, zeros = gptq(linear.weight.detach(), torch.eye(128), spec, damp=0.0, block_size=48)
    rtn = QuantLinear.from_linear(linear, spec)
    assert torch.equal(codes, rtn.weight_codes())
    assert torch.allclose(scales, rtn.scales)
    if not symmetric:
        assert torch.equal(zeros, rtn.zeros)


def test_deterministic_and_dead_inputs_survive():
    linear, x = _linear(), _correlated()
    x[:, 5] = 0.0  # an input channel never active in calibration
    spec = QuantSpec(w_bits=4, group_size=64)
    a = gptq(linear.weight.detach(), hessian(x), spec, act_order=True)
    b = gptq(linear.weight.detach(), hessian(x), spec, act_order=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.isfinite(a[1]).all()


def test_singular_hessian_is_damped_not_fatal():
    x = torch.randn(8, 1) * torch.ones(8, 128)  # rank-1 inputs: H is singular
    codes, scales, _ = gptq(_linear().weight.detach(), hessian(x), QuantSpec(w_bits=4, group_size=64), damp=0.0)
    assert torch.isfinite(scales).all() and codes.shape == (64, 128)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": torch.randn(128)}, "weight must be a 2-D tensor"),
        ({"hessian": torch.eye(64)}, r"hessian must have shape \(in, in\) = \(128, 128\)"),
        ({"spec": QuantSpec(w_bits=4, group_size=48)}, "group_size=48 does not divide in_features=128"),
        ({"spec": QuantSpec(w_bits=2, w_format="ternary")}, "w_format='ternary'"),
        ({"spec": {"w_bits": 4}}, "spec must be a QuantSpec"),
        ({"block_size": 0}, "block_size=0"),
        ({"damp": -0.1}, "damp=-0.1"),
        ({"damp": float("nan")}, "damp=nan"),
        ({"act_order": 1}, "act_order=1"),
        ({"weight": torch.full((64, 128), float("nan"))}, "weight holds NaN"),
        ({"hessian": torch.full((128, 128), float("inf"))}, "hessian holds NaN"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"weight": torch.randn(64, 128), "hessian": torch.eye(128), "spec": QuantSpec(w_bits=4, group_size=64)}
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args |= kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        gptq(args["weight"], args["hessian"], args["spec"], **extra)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [(torch.randn(128), r"shape \(rows, in\)"), (torch.empty(0, 8), "no rows"),
     (torch.tensor([[float("nan"), 1.0]]), "NaN")],
)
def test_hessian_bad_inputs(inputs, message):
    with pytest.raises(ValueError, match=message):
        hessian(inputs)


def test_hessian_is_mean_outer_product():
    x = torch.randn(10, 4, 6)
    flat = x.reshape(-1, 6).double()
    assert torch.allclose(hessian(x).double(), flat.T @ flat / 40, atol=1e-5)


def _column_sweep(weight: torch.Tensor, h: torch.Tensor, spec: QuantSpec, block_size: int):
    """GPTQ as the algorithm box writes it, one (out,) column at a time on an (out, B) block, for groups that
    never straddle a block (group_size divides block_size, or one group per row): the arithmetic of every
    update is the sweep's, so the result must be the same to the bit."""
    from ditq.methods.gptq import _inverse_cholesky
    from ditq.quant.primitives import compute_qparams, qrange

    qmin, qmax = qrange(spec.code_bits, spec.symmetric)
    w = weight.clone()
    out_f, in_f = w.shape
    u = _inverse_cholesky(h.double(), 0.01).float()
    group = spec.group_size or in_f
    codes = torch.zeros(out_f, in_f)
    scales = torch.zeros(out_f, in_f // group)
    zeros = None if spec.symmetric else torch.zeros(out_f, in_f // group)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        wb, errors = w[:, b0:b1].clone(), torch.zeros(out_f, b1 - b0)
        for i in range(b1 - b0):
            j = b0 + i
            if j % group == 0:
                s, z = compute_qparams(w if spec.group_size is None else wb[:, i:i + group], spec.code_bits, None,
                                       spec.symmetric)
                scales[:, j // group] = spec.store_scale(s)[:, 0]
                if zeros is not None:
                    zeros[:, j // group] = z[:, 0].float()
            s = scales[:, j // group]
            z = 0 if zeros is None else zeros[:, j // group]
            q = (torch.round(wb[:, i] / s) + z).clamp(qmin, qmax)
            codes[:, j] = q
            err = (wb[:, i] - s * (q - z)) / u[j, j]
            wb[:, i + 1:] -= err[:, None] * u[j, j + 1:b1][None, :]
            errors[:, i] = err
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return codes, scales, zeros


@pytest.mark.parametrize(("group_size", "symmetric", "block_size"), [(32, True, 128), (64, False, 64), (None, True, 48)])
def test_sweep_equals_the_column_by_column_algorithm_to_the_bit(group_size, symmetric, block_size):
    spec = QuantSpec(w_bits=4, group_size=group_size, symmetric=symmetric)
    weight = _linear(96, 192).weight.detach()
    h = hessian(_correlated(dim=192))
    codes, scales, zeros = gptq(weight, h, spec, block_size=block_size)
    ref_codes, ref_scales, ref_zeros = _column_sweep(weight, h, spec, block_size)
    assert torch.equal(codes.float(), ref_codes) and torch.equal(scales, ref_scales)
    assert zeros is None if symmetric else torch.equal(zeros.float(), ref_zeros)
