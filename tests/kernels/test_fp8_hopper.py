"""The `"fp8-gluon"` backend on Hopper (`ditq.kernels.hopper`): which layers get the Gluon GEMM's re-packed codes, the
backend's output through its op against the reference, few-row calls, and a compiled DiT.

On the CPU, a capability of 9.0 is read for the CPU (`hopper.device_capability`) and the op computes the kernel's
float64 reference; on an sm_90 GPU the same tests run the kernel; other GPUs skip them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters

import ditq
from ditq.kernels import fp8, hopper, prepare_for_inference
from ditq.kernels.fusion import COUNTER
from ditq.kernels.triton.wgmma_codes import repack_for_wgmma
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from tests.kernels.compiled import assert_compiled_matches_eager, pre_grad_only
from tests.tiny import make_tiny_dit

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMM = torch.ops.ditq.gluon_w4a8_gemm.default


@pytest.fixture
def on_hopper(monkeypatch):
    """Layers prepared in the test see a device of capability 9.0: the CPU, or an sm_90 GPU."""
    if DEVICE == "cpu":
        monkeypatch.setattr(hopper, "device_capability", lambda device: hopper.CAPABILITY)
    elif torch.cuda.get_device_capability() != hopper.CAPABILITY:
        pytest.skip("the Gluon GEMM runs on sm_90")


def fp8_spec(**fields) -> QuantSpec:
    return QuantSpec(**(dict(w_bits=4, a_bits=8, a_format="fp8") | fields))


def gemm_calls(monkeypatch) -> list:
    """Record the backend's calls of the Gluon GEMM op (eager)."""
    calls = []
    op = fp8.gluon_w4a8_gemm
    monkeypatch.setattr(fp8, "gluon_w4a8_gemm", lambda *a: calls.append(a) or op(*a))
    return calls


# ---- which layers get the re-packed codes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [fp8_spec(), fp8_spec(w_bits=3), fp8_spec(w_bits=2), fp8_spec(w_bits=2, w_format="ternary"),
     fp8_spec(group_size=64), fp8_spec(group_size=128, smooth=True)],
    ids=["int4", "int3", "int2", "ternary", "int4_g64", "int4_g128_smooth"],
)  # fmt: skip
def test_supported_layers_get_their_codes_repacked_as_a_kernel_buffer(spec, on_hopper):
    extras = dict(smooth=torch.rand(256) + 0.5) if spec.smooth else {}
    m = QuantLinear.from_linear(torch.nn.Linear(256, 32), spec, **extras).to(DEVICE)
    codes = m.qweight.clone()
    prepare_for_inference(m, "fp8-gluon")
    assert m.backend == "fp8-gluon" and hopper.WGMMA_CODES in m.kernel_buffers
    assert torch.equal(m.qweight_wgmma, repack_for_wgmma(codes, spec.w_bits, 256))
    assert torch.equal(m.qweight.cpu(), codes.cpu())  # parked in host memory on a GPU: one copy there
    assert m.codes_home == (codes.device if codes.is_cuda else None)
    assert hopper.WGMMA_CODES not in m.state_dict()  # checkpoints keep the canonical layout
    assert "fp8_scale_w" not in m.kernel_buffers  # the kernel reads `scales` as they are
    prepare_for_inference(m, "fp8-cached")  # another backend drops it
    assert not hasattr(m, hopper.WGMMA_CODES)


@pytest.mark.parametrize(
    ("spec", "k", "reason"),
    [(fp8_spec(smooth=True, rank=4), 256, "a low-rank branch"),
     (fp8_spec(group_size=32), 256, "groups of 64 or 128"),
     (fp8_spec(), 192, "in_features divisible by 128")],
    ids=["lowrank", "g32", "k192"],
)  # fmt: skip
def test_layers_the_kernel_refuses_keep_the_fp8_path_they_had(spec, k, reason, on_hopper):
    g = torch.Generator().manual_seed(k)
    extras = dict(smooth=torch.rand(k, generator=g) + 0.5, lowrank_down=torch.randn(k, 4, generator=g) * 0.1,
                  lowrank_up=torch.randn(4, 32, generator=g) * 0.1) if spec.rank else {}  # fmt: skip
    m = QuantLinear.from_linear(torch.nn.Linear(k, 32), spec, **extras).to(DEVICE)
    assert reason in hopper.gluon_support(m, fast_accumulation=True)
    prepare_for_inference(m, "fp8-gluon")
    assert m.backend == "fp8-gluon" and hopper.WGMMA_CODES not in m.kernel_buffers


@pytest.mark.parametrize("group_size", [None, 64], ids=["channel", "g64"])
def test_without_fast_accumulation_only_per_group_layers_take_the_gluon_gemm(
    group_size, on_hopper, monkeypatch
):
    """Per channel the kernel sums all of K on the tensor cores: a layer prepared without fast accumulation keeps
    cuBLAS's promoted sums; per group, each group's sum joins a float32 accumulator either way."""
    m = QuantLinear.from_linear(torch.nn.Linear(256, 32), fp8_spec(group_size=group_size)).to(DEVICE)
    prepare_for_inference(m, "fp8-gluon", fast_accumulation=False)
    assert (hopper.WGMMA_CODES in m.kernel_buffers) == (group_size is not None)
    asked, scaled_mm = [], torch._scaled_mm
    monkeypatch.setattr(
        torch, "_scaled_mm", lambda *a, **kw: asked.append(kw["use_fast_accum"]) or scaled_mm(*a, **kw)
    )
    m(torch.randn(160, 256, device=DEVICE))
    assert asked == ([False] if group_size is None else [])
    prepare_for_inference(m, "fp8-gluon")  # the default: fast accumulation
    assert hopper.WGMMA_CODES in m.kernel_buffers


def test_the_fp8_backend_keeps_its_expansion_on_hopper(on_hopper):
    m = QuantLinear.from_linear(torch.nn.Linear(256, 32), fp8_spec()).to(DEVICE)
    prepare_for_inference(m, "fp8")
    assert m.backend == "fp8" and "fp8_scale_w" in m.kernel_buffers and not hasattr(m, hopper.WGMMA_CODES)


@pytest.mark.parametrize("bits", [5, 8])
def test_5_to_8_bit_layers_get_no_repacked_codes(bits, on_hopper):
    m = prepare_for_inference(
        QuantLinear.from_linear(torch.nn.Linear(256, 32), fp8_spec(w_bits=bits)).to(DEVICE), "fp8-gluon"
    )
    assert m.backend == "reference" and not hasattr(m, hopper.WGMMA_CODES)


@pytest.mark.parametrize("capability", [(8, 9), (10, 0), None], ids=["sm89", "sm100", "not_cuda"])
def test_devices_other_than_sm90_keep_the_expansion(capability, monkeypatch):
    monkeypatch.setattr(hopper, "device_capability", lambda device: capability)
    m = QuantLinear.from_linear(torch.nn.Linear(256, 32), fp8_spec()).to(DEVICE)
    assert hopper.gluon_support(m, fast_accumulation=True) == "the Gluon GEMM needs compute capability 9.0"
    prepare_for_inference(m, "fp8-gluon")
    assert m.backend == "fp8-gluon" and "fp8_scale_w" in m.kernel_buffers and not hasattr(m, hopper.WGMMA_CODES)


# ---- what the backend computes through the op ---------------------------------------------------------------


def exact_layer_and_input(spec: QuantSpec, k: int = 256, n: int = 32) -> tuple[QuantLinear, torch.Tensor]:
    """A layer and an input (2, 80, k) whose every product and sum is exact in float32 and in the tensor cores'
    accumulation (13 significant bits or more): smoothed input rows 2^r · (±448, then values in {−1, 0, 1}), so the
    row scale is 2^r and the codes are the values; smoothing, weight scales and bias powers of two or eighths;
    the codes of column 0 within ±4, so every partial sum is an integer below 448·4 + 255·8 < 2^12."""
    g = torch.Generator().manual_seed(spec.w_bits + (spec.group_size or 0))
    low, high = (-1, 2) if spec.w_format == "ternary" else (-(2 ** (spec.w_bits - 1)), 2 ** (spec.w_bits - 1))
    q = torch.randint(low, high, (n, k), generator=g, dtype=torch.int8)
    q[:, 0] = q[:, 0].clamp(-4, 4)
    scales = torch.exp2(torch.randint(-6, -1, (n, spec.n_groups(k)), generator=g).float())
    smooth = torch.exp2(torch.randint(-1, 2, (k,), generator=g).float()) if spec.smooth else None
    m = QuantLinear(k, n, spec)
    if smooth is not None:
        m.smooth.copy_(smooth)
    m.set_codes(q, scales)
    m.bias.copy_(torch.randint(-64, 65, (n,), generator=g) / 8)
    h = torch.randint(-1, 2, (160, k), generator=g).float()
    h[:, 0] = torch.where(torch.rand(160, generator=g) < 0.5, -448.0, 448.0)
    h *= torch.exp2(torch.randint(-3, 3, (160, 1), generator=g).float())
    x = h if smooth is None else h * smooth
    return m.to(DEVICE), x.reshape(2, 80, k).to(DEVICE)


@pytest.mark.parametrize("group_size", [None, 64, 128], ids=["channel", "g64", "g128"])
@pytest.mark.parametrize(
    "fields", [dict(), dict(w_bits=3), dict(w_bits=2), dict(w_bits=2, w_format="ternary"), dict(smooth=True)],
    ids=["int4", "int3", "int2", "ternary", "int4_smooth"],
)  # fmt: skip
def test_the_gluon_path_computes_the_reference_bit_for_bit_on_exact_data(
    fields, group_size, on_hopper, monkeypatch
):
    m, x = exact_layer_and_input(fp8_spec(group_size=group_size, **fields))
    reference = m(x)  # the oracle: dequantized weights, fake-quantized input, float32 matmul
    prepare_for_inference(m, "fp8-gluon")
    calls = gemm_calls(monkeypatch)
    out = m(x)
    assert len(calls) == 1 and calls[0][0].dtype == torch.float8_e4m3fn and calls[0][2] is m.qweight_wgmma
    assert out.dtype == reference.dtype and torch.equal(out, reference)


def test_few_row_calls_go_to_the_gluon_gemm_too(on_hopper, monkeypatch):
    """The lowbit kernel reads the canonical layout, which is not on the device: few rows run the Gluon GEMM."""
    m, x = exact_layer_and_input(fp8_spec())
    few = x[0, :100]  # ≤ LOWBIT_MAX_ROWS rows
    reference = m(few)
    prepare_for_inference(m, "fp8-gluon")
    lowbit, route = [], fp8.lowbit_forward
    monkeypatch.setattr(fp8, "lowbit_forward", lambda *a: lowbit.append(a) or route(*a))
    calls = gemm_calls(monkeypatch)
    out = m(few)
    assert not lowbit and len(calls) == 1
    torch.testing.assert_close(out, reference, rtol=0, atol=0)  # exact data: no rounding anywhere


# ---- a compiled DiT ---------------------------------------------------------------------------------------------


def test_a_dit_compiled_fullgraph_runs_the_gluon_gemm_and_keeps_its_folds(on_hopper):
    """Dynamo traces the op whole (fullgraph), the fusion pass still folds every block producer into the layers'
    input pre-passes, and the compiled model computes what eager does. Per block, qkv, proj, fc1 and fc2 run
    the Gluon GEMM (144 rows); adaLN's 9 rows go to the lowbit kernel."""
    depth = 2
    model = ditq.quantize(make_tiny_dit(depth=depth), ditq.RTN(w_bits=4, a_bits=8, a_format="fp8")).to(DEVICE)
    prepare_for_inference(model, "fp8-gluon")  # on the device: the choice reads its capability
    g = torch.Generator().manual_seed(3)
    args = tuple(a.to(DEVICE) for a in (torch.randn(9, 1, 8, 8, generator=g), torch.randint(0, 1000, (9,), generator=g),
                                        torch.randint(0, 10, (9,), generator=g)))  # fmt: skip
    graphs = []

    def recorded(gm, example_inputs):
        graphs.append(gm)
        return pre_grad_only(gm, example_inputs)

    counters[COUNTER].clear()
    assert_compiled_matches_eager(model, *args, backend=recorded)
    assert +counters[COUNTER] == Counter(
        norm_modulate=2 * depth, residual=2 * depth - 1, gelu=depth, attention=depth
    )
    (graph,) = [gm.graph for gm in graphs]
    ops = Counter(node.target for node in graph.nodes if node.op == "call_function")
    assert ops[GEMM] == 4 * depth and not ops[torch.ops.ditq.expand_fp8.default]


def test_the_op_passes_opcheck_for_its_fake(on_hopper):
    m, x = exact_layer_and_input(fp8_spec(group_size=64))
    codes, scale_x = fp8.fp8_input_codes(x.reshape(-1, 256), None)
    for args in ((codes, scale_x, repack_for_wgmma(m.qweight, 4, 256), m.scales, m.bias, 4, False, 64, torch.float32),
                 (codes[:7], scale_x[:7], repack_for_wgmma(m.qweight, 4, 256), m.scales, None, 4, False, 64,
                  torch.bfloat16)):  # fmt: skip
        # not "test_schema": its mutation check compares inputs with `allclose`, which e4m3 tensors lack
        torch.library.opcheck(hopper.gluon_w4a8_gemm, args, test_utils=("test_faketensor",))


def test_a_layer_compiled_by_inductor_computes_what_eager_does(on_hopper):
    m, x = exact_layer_and_input(fp8_spec())
    prepare_for_inference(m, "fp8-gluon")
    torch._dynamo.reset()
    assert torch.equal(torch.compile(m, fullgraph=True)(x), m(x))  # exact data: any summation order
