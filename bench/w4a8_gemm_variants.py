"""Experiment: variants of the fused W4A8-FP8 GEMM (conversion, operand order, tiles). Not part of the package."""
import json, os, sys, itertools
import torch, triton, triton.language as tl

@triton.jit
def _kernel(x, x_scale, packed, scales, bias, out, M, N, K: tl.constexpr, n_bytes, stride_xm, stride_om,
            CONVERT: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_K // 2)
    rk = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rm < M, rn < N
    x_rows = x + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = packed + rn.to(tl.int64)[:, None] * n_bytes
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_rows + (k0 + rk)[None, :], mask=row_ok[:, None] & (k0 + rk < K)[None, :], other=0.0)
        byte = tl.load(w_rows + (k0 // 2 + rb)[None, :], mask=col_ok[:, None] & (k0 // 2 + rb < n_bytes)[None, :], other=0)
        if CONVERT == 0:
            u = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, BLOCK_K)).to(tl.int32)
            w = (u - 8).to(tl.float32).to(tl.float8e4nv)
        else:  # e4m3 bits of q·2^-9: sign-magnitude, |q| ≤ 8 (subnormals and the first binade are steps of 2^-9)
            d = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_N, BLOCK_K)).to(tl.int32) - 8
            w = (tl.abs(d) | ((d >> 24) & 0x80)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        if SWAP:
            acc += tl.dot(w, tl.trans(a), out_dtype=tl.float32)
        else:
            acc += tl.dot(a, tl.trans(w), out_dtype=tl.float32)
    if SWAP:
        acc = tl.trans(acc)
    s = tl.load(scales + rn, mask=col_ok, other=0.0)
    if CONVERT == 1:
        s = s * 512.0
    acc = acc * s[None, :] * tl.load(x_scale + rm, mask=row_ok, other=0.0)[:, None]
    acc += tl.load(bias + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rm.to(tl.int64)[:, None] * stride_om + rn[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])

def launch(xq, sx, packed, scales, bias, convert, swap, bm, bn, bk, warps, stages):
    m, k = xq.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=xq.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _kernel[grid](xq, sx, packed, scales, bias, out, m, n, k, packed.shape[1], xq.stride(0), out.stride(0),
                  CONVERT=convert, SWAP=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out

if __name__ == "__main__" and sys.argv[1] == "ptx":
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import re
    names = _kernel.arg_names
    types = dict(x="*fp8e4nv", x_scale="*fp32", packed="*u8", scales="*fp32", bias="*bf16", out="*bf16", M="i32", N="i32", n_bytes="i32", stride_xm="i32", stride_om="i32")
    for convert, swap, bm in itertools.product((0, 1), (0, 1), (64, 128)):
        ce = dict(K=1152, CONVERT=convert, SWAP=swap, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128)
        sig = {nm: "constexpr" if nm in ce else types[nm] for nm in names}
        c = triton.compile(ASTSource(_kernel, sig, {(names.index(k),): v for k, v in ce.items()}), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3))
        ptx = c.asm["ptx"]
        print(convert, swap, bm, set(re.findall(r"wgmma\.mma_async[^ ]*", ptx)), "regA" if re.search(r"wgmma\.mma_async[^\n]*\{[^}]*\}, \{", ptx) else "", "cvt", ptx.count("cvt"), "smem", c.metadata.shared)

if __name__ == "__main__" and sys.argv[1] == "bench":
    sys.path.insert(0, "bench")
    from timing import replay_us
    from ditq.quant.primitives import fp8_quantize
    from ditq.quant.qlinear import QuantLinear
    from ditq.quant.spec import QuantSpec
    from ditq.kernels.triton.expand import expand_to_fp8
    rows = []
    for name, m, k, n in [("qkv B2", 512, 1152, 3456), ("fc2 B2", 512, 4608, 1152), ("qkv B64", 16384, 1152, 3456), ("fc2 B64", 16384, 4608, 1152)]:
        torch.manual_seed(0)
        layers = 8 if m > 2048 else 32
        xq, sx = fp8_quantize(torch.randn(m, k, device="cuda")); sx = sx.float().contiguous()
        lins = [torch.nn.Linear(k, n, device="cuda") for _ in range(layers)]
        qs = [QuantLinear.from_linear(l, QuantSpec(w_bits=4)).requires_grad_(False) for l in lins]
        bs = [l.bias.detach().to(torch.bfloat16) for l in lins]
        ws = [expand_to_fp8(q.qweight, 4, k) for q in qs]
        sc = [q.scales.reshape(1, n).float().contiguous() for q in qs]
        cub = replay_us(lambda: [torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=s, bias=b, out_dtype=torch.bfloat16) for w, s, b in zip(ws, sc, bs)], rep=60) / layers
        ref = (xq.float() * sx) @ qs[0].dequantized_weight(torch.float32).t() + bs[0].float()
        res = {"shape": name, "cublas_fp8_cached_us": cub}
        for convert, swap in itertools.product((0, 1), (0, 1)):
            for bm, bn, bk, w, st in [(64, 128, 128, 4, 3), (128, 64, 128, 4, 3), (128, 128, 128, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 128, 8, 3)]:
                if swap and bm == 256: continue
                try:
                    f = lambda: launch(xq, sx, qs[0].qweight, qs[0].scales.reshape(-1), bs[0], convert, swap, bm, bn, bk, w, st)
                    err = float((f().float() - ref).norm() / ref.norm())
                    us = replay_us(lambda: [launch(xq, sx, q.qweight, q.scales.reshape(-1), b, convert, swap, bm, bn, bk, w, st) for q, b in zip(qs, bs)], rep=60) / layers
                    res[f"c{convert}s{swap} {(bm, bn, bk, w, st)}"] = (round(us, 2), err)
                except Exception as e:
                    res[f"c{convert}s{swap} {(bm, bn, bk, w, st)}"] = repr(e)[:80]
        rows.append(res)
        print(json.dumps(res), flush=True)
    out = os.environ.get("OUT", ".")
    json.dump(rows, open(f"{out}/w4a8_variants.json", "w"), indent=1)
    for r in rows:
        best = sorted(((v[0], k) for k, v in r.items() if isinstance(v, tuple)))[:5]
        print(r["shape"], "cublas", round(r["cublas_fp8_cached_us"], 2), best)
