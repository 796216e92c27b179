"""The transformers drop-in on a GPU, one run (issue 14's benchmark): a Llama-like model
(8 layers, hidden 2048, 16 heads, 4 K/V heads) built from its config, bf16, random weights.

* training step (forward + backward of the LM loss, no optimizer) tokens/s at 8k and 32k
  context, dense causal (LlamaConfig) and a 4096-token sliding window (MistralConfig, the
  same sizes), with attn_implementation "baracuda" vs "sdpa" vs "flex_attention";
* generate(): decode tokens/s after a 32k-token prompt (32 new tokens, greedy, batch 1).

    PYTHONPATH=src python scripts/bench_transformers.py [--quick | --smoke] [--generate-only]

--quick: 2k context and 2 layers on the GPU; --smoke: a tiny model on the CPU in float32
(checks the script itself, no figures worth keeping). Every figure is one median over a few
repeats after a warm-up; compare only figures of one run.
"""
import statistics
import sys
import time

import torch
import transformers

from baracuda_kernels.integrations.transformers import register

IMPLS = ("baracuda", "sdpa", "flex_attention")
SMOKE = "--smoke" in sys.argv
DEVICE, DTYPE = ("cpu", torch.float32) if SMOKE else ("cuda", torch.bfloat16)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def model(kind: str, impl: str, layers: int, window: int):
    hidden = 256 if SMOKE else 2048
    common = dict(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                  max_position_embeddings=65536)
    if kind == "window":
        config = transformers.MistralConfig(sliding_window=window, **common)
    else:
        config = transformers.LlamaConfig(**common)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    return m.to(DEVICE, DTYPE)


def timed(fn, repeats: int = 3) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_tokens_per_s(m, n: int) -> float:
    ids = torch.randint(0, 32000, (1, n), device=DEVICE)

    def step():
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids).loss.backward()

    return n / timed(step)


def decode_tokens_per_s(m, prompt: int, new: int = 32) -> float:
    ids = torch.randint(0, 32000, (1, prompt), device=DEVICE)
    m.eval()
    with torch.no_grad():
        prefill = timed(lambda: m.generate(ids, max_new_tokens=1, do_sample=False), 1)
        total = timed(lambda: m.generate(ids, max_new_tokens=new + 1, do_sample=False), 1)
    return new / max(total - prefill, 1e-9)


def main():
    if SMOKE:
        layers, lengths, prompt = 2, (256,), 256
    elif "--quick" in sys.argv:
        layers, lengths, prompt = 2, (2048,), 2048
    else:
        layers, lengths, prompt = 8, (8192, 32768), 32768
    register()
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)",
          "transformers", transformers.__version__, flush=True)
    for kind in () if "--generate-only" in sys.argv else ("causal", "window"):
        for n in lengths:
            row = []
            for impl in IMPLS:
                try:
                    m = model(kind, impl, layers, 4096)
                    row.append(f"{impl} {train_tokens_per_s(m, n):9.0f}")
                except Exception as exc:  # a baseline that cannot run this is reported
                    row.append(f"{impl} {type(exc).__name__}: {str(exc)[:80]}")
                m = None
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
            print(f"train {kind:6} N={n:6}: tokens/s " + " | ".join(row), flush=True)
    row = []
    for impl in IMPLS:
        try:
            m = model("causal", impl, layers, 4096)
            row.append(f"{impl} {decode_tokens_per_s(m, prompt):7.1f}")
        except Exception as exc:
            row.append(f"{impl} {type(exc).__name__}: {str(exc)[:80]}")
        m = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print(f"generate after {prompt} tokens: decode tokens/s " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
