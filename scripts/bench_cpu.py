"""CPU benchmark of issue 15: the fused ``cpu`` backend against PyTorch's dense CPU attention.

Problems (f32, D=64, block 64, causal sliding window of 512 tokens + 64 sink tokens, ~7.5%
of the causal pairs at N=8192): B=1, H=8 at N=8192 and N=32768; and a decode step (Nq=1
against 2048 keys, bottom-right). Implementations: ours (``cpu`` backend, prepared pattern),
ours (``reference`` backend), SDPA causal (dense: 13x more pairs at 8k), SDPA with the
equivalent boolean mask (8k only: the mask alone is 1 GiB at 32k); at 8k also both of ours
with a logit softcap of 30 (Grok's; SDPA has none, so the ratio is against uncapped SDPA
causal); for the decode step also
``block_sparse_attention_with_kvcache`` on a [B, N, H, D] cache and SDPA given that cache's
head-major views. Threads 1 and 2. Each measurement runs in its own process: forward and
backward (median of the repeats after the warm-up steps; decode: the forward alone under
no_grad, as in inference), and the process's peak RSS above its inputs. The implementations of a
row take turns, round after round (--rounds, default 3; one at N=32768), so a slow spell
of the host falls on all of them alike: the table gives each implementation's median over
the rounds and the range of the per-round speedups over SDPA causal.

    PYTHONPATH=src python scripts/bench_cpu.py [--quick | --decode] [--rounds R]
"""
import json
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

CHILD = r"""
import json, resource, sys, time, torch
import baracuda_kernels as bk
from baracuda_kernels.patterns import sliding_window
N, Nq, impl, threads, repeats, warmup = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                         int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
torch.set_num_threads(threads)
torch.manual_seed(0)
H, D, bs, W, S = 8, 64, 64, 512, 64
q = torch.randn(1, H, Nq, D, requires_grad=True)
k, v = (torch.randn(1, H, N, D, requires_grad=True) for _ in range(2))
dy = torch.randn(1, H, Nq, D)
decode = Nq != N
if impl == "ours-kvcache":  # the decode entry point on a [B, N, H, D] cache
    qc, kc, vc = (t.detach().transpose(1, 2).contiguous() for t in (q, k, v))
    call = lambda: bk.block_sparse_attention_with_kvcache(qc, kc, vc, cache_seqlens=N)
elif impl == "sdpa-cache":  # SDPA handed the same cache's head-major views
    qc, kc, vc = (t.detach().transpose(1, 2).contiguous() for t in (q, k, v))
    call = lambda: torch.nn.functional.scaled_dot_product_attention(
        qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2))
elif impl.startswith("ours"):  # ours-<backend>[-softcap]
    backend = impl.split("-")[1]
    softcap = 30.0 if impl.endswith("-softcap") else None
    if decode:
        prep = bk.prepare_pattern(torch.ones(1, 1, 1, -(-N // bs), dtype=torch.bool), query_len=Nq,
                                  key_len=N, block_size=bs, is_causal="bottom_right")
    else:
        prep = sliding_window(N, window=W, block_size=bs, sinks=S).prepare()
    call = lambda: bk.block_sparse_attention(q, k, v, prep, backend=backend, softcap=softcap)
elif impl == "sdpa-causal":
    call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=not decode)
else:  # sdpa-mask: the window's boolean token mask
    i = torch.arange(Nq)[:, None] + (N - Nq)
    j = torch.arange(N)[None, :]
    mask = (j <= i) & ((i - j < W) | (j < S))
    call = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fwd, bwd = [], []
for it in range(repeats + warmup):
    if decode:  # inference: the forward alone, no autograd graph
        with torch.no_grad():
            t0 = time.perf_counter()
            call()
            t1 = t2 = time.perf_counter()
    else:
        t0 = time.perf_counter()
        y = call()
        t1 = time.perf_counter()
        torch.autograd.grad(y, (q, k, v), dy)
        t2 = time.perf_counter()
    if it >= warmup:  # a process's first steps fault in fresh memory (RSS still grows)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
med = lambda x: sorted(x)[len(x) // 2]
print(json.dumps(dict(fwd=med(fwd), bwd=med(bwd), peak_mib=peak)))
"""


def measure(n, nq, impl, threads, repeats, warmup=1):
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(nq), impl, str(threads),
                          str(repeats), str(warmup)], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def rounds_of(impls, n, nq, threads, repeats, warmup, rounds):
    """{impl: median fwd / bwd / peak over the rounds, with the per-round runs}: in each
    round every implementation runs once, in turn."""
    runs = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            runs[impl].append(measure(n, nq, impl, threads, repeats, warmup))
    rows = {}
    for impl, rs in runs.items():
        failed = [r for r in rs if "error" in r]
        if failed:
            rows[impl] = failed[0]
            continue
        rows[impl] = {key: median([r[key] for r in rs]) for key in ("fwd", "bwd", "peak_mib")}
        rows[impl]["runs"] = rs
    return rows


def speedups(row, ref) -> str:
    """'median fwd / bwd' speedup of ref over row, and the per-round range when several."""
    if "error" in ref or "error" in row:
        return ""
    text = f"{ref['fwd'] / row['fwd']:.2f}x" + (f" / {ref['bwd'] / row['bwd']:.2f}x" if row["bwd"] else "")
    if len(row["runs"]) > 1:
        pairs = list(zip(row["runs"], ref["runs"]))
        f = [b["fwd"] / a["fwd"] for a, b in pairs]
        text += f"   rounds fwd {min(f):.2f}-{max(f):.2f}x"
        if row["bwd"]:
            g = [b["bwd"] / a["bwd"] for a, b in pairs]
            text += f", bwd {min(g):.2f}-{max(g):.2f}x"
    return text


def main():
    quick = "--quick" in sys.argv
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 3
    # (N, Nq, repeats, warm-up steps): a process's first steps run slower while the allocator
    # faults in fresh memory (ours: 2-3 steps at 8k, 2 threads); 32k steps are long enough.
    problems = [(8192, 8192, 3, 2), (1, 2048, 20, 5)] if quick else \
        [(8192, 8192, 5, 3), (32768, 32768, 1, 1), (2048, 1, 200, 20)]
    if "--decode" in sys.argv:
        problems = problems[-1:]
    print(f"impl                   threads  problem        fwd s    bwd s   peak MiB   vs sdpa-causal fwd / bwd "
          f"(median of {rounds} rounds; 1 at N=32768)")
    for n, nq, repeats, warmup in problems:
        n, nq = (n, nq) if nq <= n else (nq, n)
        label = f"N={n}" if nq == n else f"decode 1x{n}"
        impls = ["ours-cpu", "ours-reference", "sdpa-causal"] + (["sdpa-mask"] if nq == n <= 8192 else [])
        if nq == n <= 8192:  # the same window with a logit softcap of 30 (no SDPA has one)
            impls += ["ours-cpu-softcap", "ours-reference-softcap"]
        if nq != n:  # decode: also the KV-cache entry point and SDPA on the same cache layout
            impls += ["ours-kvcache", "sdpa-cache"]
        for threads in (1, 2):
            rows = rounds_of(impls, n, nq, threads, repeats, warmup, 1 if n > 8192 else rounds)
            ref = rows["sdpa-causal"]
            for impl, r in rows.items():
                if "error" in r:
                    print(f"{impl:<23}{threads:>7}  {label:<12}  failed: {r['error']}")
                    continue
                ratio = speedups(r, ref) if impl != "sdpa-causal" else ""
                print(f"{impl:<23}{threads:>7}  {label:<14}{r['fwd']:>10.4g} {r['bwd']:>8.4g} "
                      f"{r['peak_mib']:>10.0f}   {ratio}", flush=True)


if __name__ == "__main__":
    main()
