"""Checks the FP8 fusion pass (`ditq.kernels.fusion`) on a GPU: compiles a 2-block DiT-XL/2-shaped zoo DiT and a
tiny FLUX-shaped diffusers transformer (bf16, W4A8-FP8 on `fp8-cached`) with inductor, prints what the pass folded
per kind and the compiled output's relative error against the same model compiled without the pass and against
eager on the reference backend; exits 1 when a count differs from what the blocks imply or the first error passes
`MAX_REL_ERR`.

    PYTHONPATH=. python bench/check_fusion_gpu.py
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

import ditq
from ditq.integrations.diffusers import SUPPORTED
from ditq.kernels.fusion import COUNTER
from ditq.models import create

# Relative error (Frobenius) of the output with the pass against without: the pre-pass rounds each op to bf16 where
# eager does and inductor's own kernels keep float32 in between, so a code here and there is one step apart (both
# models in bf16 under Triton's CPU interpreter at smaller widths: 5e-3 and 7e-3), far under a wrongly folded
# producer's error (the output's size).
MAX_REL_ERR = 2e-2
FP8 = ditq.RTN(w_bits=4, a_bits=8, a_format="fp8")


def zoo_dit() -> tuple[torch.nn.Module, tuple, Counter]:
    """DiT-XL/2's widths, 2 blocks, 8 samples of 256 tokens; expected: per block norm1 + modulate → qkv,
    norm2 + modulate → fc1 with the attention's residual add, GELU → fc2, attention output → proj, and block 0's
    MLP add into block 1's qkv."""
    torch.manual_seed(0)
    model = create("DiT-XL/2", depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # the official init zeroes adaLN: every block an identity
    model = ditq.quantize(model.cuda().to(torch.bfloat16).eval(), FP8)
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(8, 4, 32, 32, generator=g), torch.randint(0, 1000, (8,), generator=g),
            torch.randint(0, 1000, (8,), generator=g))  # fmt: skip
    args = (args[0].cuda().to(torch.bfloat16), args[1].cuda(), args[2].cuda())
    return model, args, Counter(norm_modulate=4, residual=3, gelu=2, attention=2)


def tiny_flux() -> tuple[torch.nn.Module, tuple, Counter]:
    """A FLUX transformer of 1 double and 2 single blocks (width 256), 2 samples of 256 image + 16 text tokens;
    expected: the double block's norm1/norm1_context + modulate → q/k/v and the added projections (one pre-pass
    each, two deduped), norm2/norm2_context → ff/ff_context with the attention's residual adds, their GELUs; each
    single block's norm + modulate of its cat([text, image]) tokens (read part by part) → proj_mlp, q, k, v (one
    pre-pass, three deduped) and cat([attention, GELU(mlp)]) → proj_out; left to inductor: the joint attention's
    outputs (token slices of two samples). The GEMMs of q, k, v, of the added q, k, v and of each single block's
    q, k, v and proj_mlp are one each (14 layers joined)."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = ditq.quantize(model.cuda().to(torch.bfloat16).eval(), FP8)  # the adapter's skip: not the wrapper's
    inputs = SUPPORTED["FluxTransformer2DModel"].example_inputs(model, 2, 16, 16, 0.5, torch.Generator().manual_seed(1))
    inputs = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda() for k, v in inputs.items()}

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *values):
            return self.model(**dict(zip(inputs, values, strict=True)), return_dict=False)[0]

    return Positional(), tuple(inputs.values()), Counter(norm_modulate=6, deduped=10, gelu=2, residual=2, plain=2, concat=2, token_concat=2,
                                                  joined_gemm=6 + 2 * 4)


def check(name: str, model: torch.nn.Module, args: tuple, expected: Counter) -> bool:
    """Whether the quantized `model` compiled folds `expected` and computes what it computes compiled without the
    pass (inductor's own kernels for the same ops: eager's bf16 ops round elsewhere, by several % on FLUX)."""
    with torch.no_grad():
        ditq.prepare_for_inference(model, "reference")
        reference = model(*args).float()
        ditq.prepare_for_inference(model, "fp8-cached")  # installs the pass
        runs = {}
        for label, custom_pass in (("without the pass", None), ("with", inductor_config.pre_grad_custom_pass)):
            counters[COUNTER].clear()
            torch._dynamo.reset()
            with inductor_config.patch(fx_graph_cache=False, pre_grad_custom_pass=custom_pass), \
                    torch._functorch.config.patch(enable_autograd_cache=False):  # the pass runs, not a cache
                runs[label] = torch.compile(model, fullgraph=True)(*args).float()
    folded = +counters[COUNTER]
    errors = {against: float((runs["with"] - out).norm() / out.norm()) for against, out in
              (("compiled without the pass", runs["without the pass"]), ("eager reference", reference))}  # fmt: skip
    ok = folded == expected and errors["compiled without the pass"] <= MAX_REL_ERR
    print(f"{name}: folded {dict(folded)} (expected {dict(expected)}); relative error of the compiled output vs "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + ("" if ok else "  MISMATCH"))  # fmt: skip
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("check_fusion_gpu: error: needs a CUDA GPU with FP8 tensor cores (sm_89+)", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
    results = [check("zoo DiT-XL/2, 2 blocks", *zoo_dit()), check("FLUX, 1 + 2 blocks", *tiny_flux())]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
