"""The Hopper W4A8 kernel (`gluon_w4a8.py`) compiles for sm_90a on the CPU, and ptxas's report and the PTX say
what a GPU run would get: no register spills, TMA loads, FP8 wgmma fed from registers, the warp-specialized
register split, and no byte shuffling beyond the conversion itself.

Each launch compiles in a subprocess without `TRITON_INTERPRET` into a fresh cache (so ptxas runs and
reports), as `test_hopper_compile.py` does for the Triton kernels.

    python tests/kernels/test_gluon_w4a8_compile.py   # each launch's facts, one JSON line each
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# (bits, ternary, group_size, output dtype): both code widths, per channel and both group sizes, both outputs
LAUNCHES = [(4, False, None, "bf16"), (4, False, 64, "bf16"), (4, False, 128, "fp32"), (2, False, None, "bf16"),
            (2, True, 64, "bf16")]  # fmt: skip
SERIALIZED = "wgmma.mma_async instructions are serialized"


def launch_facts(bits: int, ternary: bool, group_size: int | None, out: str) -> dict:
    """Compile one launch (the default `LAUNCH`) for sm_90a; what ptxas reports and what the PTX holds."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from ditq.kernels.triton import gluon_w4a8 as g
    from ditq.quant.packing import packed_cols, signed_offset, slot_bits

    launch = g.LAUNCH
    out_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[out]
    x = torch.empty(256, 256, dtype=torch.float8_e4m3fn)
    packed = torch.empty(256, packed_cols(256, bits), dtype=torch.uint8)
    descriptors = dict(
        w_desc=(packed, [g.BLOCK_N, packed_cols(128, bits)], g.gl.uint8),
        x_desc=(x, [g.BLOCK_T, 128], g.gl.float8e4nv),
        out_desc=(
            torch.empty(256, 256, dtype=out_dtype),
            [g.BLOCK_T, g.BLOCK_N],
            g.OUT_DTYPES[out_dtype],
        ),
    )
    types = {name: mangle_type(g._descriptor(*d)) for name, d in descriptors.items()}
    types |= dict(w_scales="*fp32", x_scales="*fp32", bias="*bf16", M="i32", N="i32", n_groups="i32")
    constexprs = dict(SLOT=slot_bits(bits), OFFSET=signed_offset(bits, ternary), GROUP=group_size or 0, HAS_BIAS=True,
                      STAGES=launch["stages"], num_warps=launch["num_warps"])  # fmt: skip
    kernel = g._w4a8_kernel
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
    source = GluonASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: ptxas -v's report, printed
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=launch["num_warps"], maxnreg=launch["maxnreg"]))  # fmt: skip
    report, ptx = log.getvalue(), compiled.asm["ptx"]
    loop = k_loop_opcodes(compiled.asm["cubin"])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return dict(
        launch=[bits, ternary, group_size, out],
        registers=int(re.search(r"Used (\d+) registers", report).group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        serialized=SERIALIZED in report,
        shared_bytes=compiled.metadata.shared,
        tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global", ptx)),
        wgmma=len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k32\.f32\.e4m3\.e4m3", ptx)),
        prmt=len(re.findall(r"\bprmt\.b32", ptx)),
        byte_loads=len(re.findall(r"ld\.shared\.v[24]\.b32", ptx)),
        setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
        k_loop_instructions=sum(loop.values()),
        k_loop_opcodes=dict(loop.most_common()),
    )


def k_loop_opcodes(cubin: bytes) -> collections.Counter:
    """SASS opcodes of the consumers' K loop (one K block of 128 columns): from the label that the branch after the
    kernel's last wgmma jumps back to, through that branch."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        lines = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", file.name], capture_output=True, text=True,
                               check=True).stdout.splitlines()  # fmt: skip
    last_mma = max(i for i, line in enumerate(lines) if "QGMMA" in line)
    branch = next(i for i in range(last_mma, len(lines)) if re.search(r"\bBRA\b", lines[i]))
    label = re.search(r"\(\.(L_x_\d+)\)", lines[branch]).group(1)
    start = lines.index(f".{label}:")
    opcodes = (re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line) for line in lines[start:branch + 1])
    return collections.Counter(match.group(1) for match in opcodes if match)


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict[tuple, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "PYTHONPATH": str(ROOT),
            "TRITON_DUMP_PTXAS_LOG": "1"}  # fmt: skip
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return {tuple(row["launch"]): row for row in rows}


def ids(launch: tuple) -> str:
    bits, ternary, group, out = launch
    return f"{'ternary' if ternary else f'int{bits}'}-{f'g{group}' if group else 'channel'}-{out}"


@pytest.mark.parametrize("launch", LAUNCHES, ids=ids)
def test_no_register_spills(facts, launch) -> None:
    row = facts[launch]
    assert (row["spill_stores"], row["spill_loads"]) == (0, 0), row


@pytest.mark.parametrize("launch", LAUNCHES, ids=ids)
def test_operands_come_by_tma_and_meet_on_fp8_tensor_cores(facts, launch) -> None:
    """Two TMA loads per K block (codes, activations) in the producer; per half block, 64 columns of wgmma
    (two k32 instructions per warpgroup)."""
    row = facts[launch]
    assert row["tma_loads"] == 2 and row["wgmma"] == 4, row


@pytest.mark.parametrize("launch", LAUNCHES, ids=ids)
def test_the_producer_warp_gives_its_registers_to_the_consumers(facts, launch) -> None:
    row = facts[launch]
    assert ["dec", "24"] in row["setmaxnreg"] and any(
        op == "inc" and int(n) > 200 for op, n in row["setmaxnreg"]
    ), row


@pytest.mark.parametrize("launch", LAUNCHES, ids=ids)
def test_codes_reach_the_fragment_with_one_load_per_row_and_no_byte_shuffles(facts, launch) -> None:
    """Per K block a thread holds 2 rows of the 128-channel tile (8 warps), one vector load each; the only byte
    permutes are the conversion's own: 6 per word of 4-bit codes (4 words per row), 4 per word of 2-bit codes
    (2 words per row). Byte-wise re-packing of the e4m3 values (what 8-bit values carried by the loop cost)
    would add ~100 more."""
    row = facts[launch]
    bits = launch[0]
    assert row["byte_loads"] == 2, row
    assert row["prmt"] == (2 * 4 * 6 if bits == 4 else 2 * 2 * 4), row


@pytest.mark.parametrize("launch", LAUNCHES, ids=ids)
def test_wgmmas_are_not_serialized(facts, launch) -> None:
    """ptxas keeps the wgmmas in flight while the next half block is converted: no C7515 "wgmma.mma_async
    instructions are serialized due to non wgmma instructions defining accumulator registers". A K loop that
    may run zero times puts the accumulator's zeros on its exit path, between the last wgmma and the wait,
    which is enough for ptxas to serialize every wgmma of the kernel."""
    assert not facts[launch]["serialized"], facts[launch]


@pytest.mark.parametrize("launch", [launch for launch in LAUNCHES if launch[2] is None], ids=ids)
def test_a_k_block_costs_under_three_instructions_per_weight_converted(facts, launch) -> None:
    """Per K block each of the 256 consumer threads converts 64 weights (128 channels x 128 columns) while its
    warpgroup's wgmmas take 64 x BLOCK_T x 128 products: at 128 tokens the tensor cores leave about four issue
    slots per weight before the conversion, not the products, sets the pace. The whole loop body (loads, waits,
    conversion, four wgmmas) holds 172 instructions for 4-bit codes and 97 for 2-bit ones (sm_90a, Triton 3.6)."""
    row = facts[launch]
    assert row["k_loop_opcodes"]["QGMMA"] == 4, row
    assert row["k_loop_instructions"] <= 3 * 64, row


def main() -> int:
    for launch in LAUNCHES:
        print(json.dumps(launch_facts(*launch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
