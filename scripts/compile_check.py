"""Compile the backward kernels for sm90 without a GPU (Triton's bundled ptxas) and report
registers, stack, shared memory and whether the loop was pipelined (cp.async count).

    python scripts/compile_check.py [--kernel dkdv|dq] [block_a block_b warps stages] ...

The numbers come from this machine's Triton, which may differ from the device image's:
use them to compare variants, not as the device's figures.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from baracuda_kernels.attention.block_sparse.triton_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel  # noqa: E402

POINTERS_16 = {"Q", "K", "V", "DY", "DK", "DV", "DQ", "SCALE64", "Y"}
POINTERS_F32 = {"LSE2", "DELTA", "LSE", "DLSE"}


def compile_kernel(kernel, tile_a, tile_b, warps, stages, causal, d=128, dtype="bf16",
                   extra=None):
    fn = {"dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}[kernel]
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
        elif name in POINTERS_16:
            sig[name] = f"*{dtype}"
        elif name in POINTERS_F32:
            sig[name] = "*fp32"
        elif name.isupper() and name != "H":
            sig[name] = "*i32"
        elif name in ("scale", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    const = dict(BS=128, D_K=d, D_V=d, BLOCK_DK=d, BLOCK_DV=d, IS_CAUSAL=causal, IS_F64=False,
                 PRECISION="ieee", USE_TMA=False)
    if "HAS_DLSE" in fn.arg_names:
        const["HAS_DLSE"] = False
    if kernel == "dkdv":
        const.update(BLOCK_N=tile_a, BLOCK_M=tile_b, SUBS_M=128 // tile_b, EVEN_M=True,
                     TILES_N=128 // tile_a)
    else:
        const.update(BLOCK_M=tile_a, BLOCK_N=tile_b, SUBS_N=128 // tile_b, EVEN_N=True,
                     TILES_M=128 // tile_a)
    const.update(extra or {})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def usage(kernel) -> str:
    """Registers and stack bytes from cuobjdump's resource usage of the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return f"regs={regs and regs.group(1)} stack={stack and stack.group(1)}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="dkdv", choices=["dkdv", "dq"])
    ap.add_argument("tiles", nargs="*", type=int, default=[128, 64, 8, 3])
    a = ap.parse_args()
    for i in range(0, len(a.tiles), 4):
        ta, tb, w, s = a.tiles[i:i + 4]
        for causal in (False, True):
            k = compile_kernel(a.kernel, ta, tb, w, s, causal)
            ptx = k.asm["ptx"]
            print(f"{a.kernel} {ta}x{tb} warps={w} stages={s} causal={causal}: {usage(k)} "
                  f"shared={k.metadata.shared} wgmma={ptx.count('wgmma.mma_async')} "
                  f"cp.async={ptx.count('cp.async.cg') + ptx.count('cp.async.ca')}")
