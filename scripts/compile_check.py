"""Compile the fused backward kernel for sm90 on a machine without a GPU; report spills.

    python scripts/compile_check.py [block_n block_m warps stages] ...
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, "src")
from baracuda_kernels.attention.triton_bwd import _bwd_dkdv_kernel  # noqa: E402
from baracuda_kernels.attention.triton_bwd_fused import _bwd_fused_kernel  # noqa: E402


def compile_fused(bn, bm, warps, stages, causal=True, d=128, dtype="bf16", fused=True):
    fn = _bwd_fused_kernel if fused else _bwd_dkdv_kernel
    ptr = f"*{dtype}"
    sig, const = {}, {}
    for name in fn.arg_names:
        p = fn.params[fn.arg_names.index(name)]
        if p.is_constexpr:
            continue
        if name in ("Q", "K", "V", "DY", "DK", "DV"):
            sig[name] = ptr
        elif name in ("LSE2", "DELTA", "ACC"):
            sig[name] = "*fp32"
        elif name == "SCALE64":
            sig[name] = ptr
        elif name in ("LOCKS", "Q_INDEX", "Q_COUNT_FULL", "Q_COUNT", "DQ_RANK", "DQ_START"):
            sig[name] = "*i32"
        elif name in ("scale", "qk_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    const = dict(BS=128, D_K=d, D_V=d, BLOCK_DK=d, BLOCK_DV=d, BLOCK_M=bm, BLOCK_N=bn,
                 SUBS_M=128 // bm, TILES_N=128 // bn, RAGGED_Q=False, RAGGED_K=False,
                 IS_CAUSAL=causal, IS_F64=False, PRECISION="ieee", SPIN_ASM=True,
                 NUM_WARPS=warps)
    if not fused:
        for name in ("RAGGED_Q", "RAGGED_K", "SUBS_M", "SPIN_ASM", "NUM_WARPS"):
            const.pop(name)
        const.update(SUBS_M=128 // bm, EVEN_M=True, TILE_MAJOR=False)
    for c in const:
        sig[c] = "constexpr"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    return out


def usage(kernel) -> str:
    """Registers and spill bytes from cuobjdump's resource usage of the cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (f"regs={regs and regs.group(1)} stack={stack and stack.group(1)} "
            f"local={local and local.group(1)}")


if __name__ == "__main__":
    fused = "--two-kernel" not in sys.argv
    args = [int(a) for a in sys.argv[1:] if a[0] != "-"] or [128, 64, 8, 2]
    for i in range(0, len(args), 4):
        bn, bm, w, s = args[i:i + 4]
        for causal in (False, True):
            k = compile_fused(bn, bm, w, s, causal, fused=fused)
            ptx = k.asm["ptx"]
            print(f"bn={bn} bm={bm} warps={w} stages={s} causal={causal}: {usage(k)} "
                  f"shared={k.metadata.shared} wgmma={ptx.count('wgmma.mma_async')} "
                  f"cp.async={ptx.count('cp.async.ca') + ptx.count('cp.async.cg')}")
