"""The transformers drop-in on a GPU, one run (issue 14's benchmark): a Llama-like model
(8 layers, hidden 2048, 16 heads, 4 K/V heads) built from its config, bf16, random weights.

* training step (forward + backward of the LM loss, no optimizer) tokens/s at 8k and 32k
  context, dense causal (LlamaConfig) and a 4096-token sliding window (MistralConfig, the
  same sizes), with attn_implementation "baracuda" vs "sdpa" vs "flex_attention";
* the same training step with a 4096-token window plus 64 attention-sink tokens (the first
  64 keys stay visible; LlamaConfig): each implementation gets the rule as its users would
  give it: baracuda through register(pattern=...) (a token-exact BlockPattern), sdpa as a
  4D bool mask, flex_attention as a BlockMask;
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
from baracuda_kernels.patterns import sliding_window

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
    with torch.device(DEVICE):  # random init on the device (CPU init of 8 layers: seconds)
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


def train_tokens_per_s(m, n: int, mask=None) -> float:
    ids = torch.randint(0, 32000, (1, n), device=DEVICE)
    extra = {} if mask is None else {"attention_mask": mask}

    def step():
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids, **extra).loss.backward()

    return n / timed(step)


WINDOW, SINK_TOKENS = 4096, 64


def window_sinks_rule(impl: str, n: int):
    """(attn_implementation, attention_mask) giving the window + sink-token rule to impl."""
    if impl == "baracuda":
        return "baracuda_window_sinks", None          # the rule is the registered pattern
    if impl == "sdpa":
        i = torch.arange(n, device=DEVICE)[:, None]
        j = torch.arange(n, device=DEVICE)[None, :]
        return impl, ((j <= i) & ((i - j < WINDOW) | (j < SINK_TOKENS)))[None, None]
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, qi, kj):
        return (kj <= qi) & ((qi - kj < WINDOW) | (kj < SINK_TOKENS))
    return impl, create_block_mask(rule, None, None, n, n, device=DEVICE)


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
    register("baracuda_window_sinks", pattern=lambda layer, q_len, kv_len: sliding_window(
        q_len, WINDOW, block_size=128, sinks=SINK_TOKENS, key_len=kv_len))
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
    for n in () if "--generate-only" in sys.argv else lengths:
        row = []
        for impl in IMPLS:
            try:
                name, mask = window_sinks_rule(impl, n)
                m = model("causal", name, layers, WINDOW)
                row.append(f"{impl} {train_tokens_per_s(m, n, mask):9.0f}")
            except Exception as exc:
                row.append(f"{impl} {type(exc).__name__}: {str(exc)[:80]}")
            m = mask = None
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        print(f"train window+sinks N={n:6}: tokens/s " + " | ".join(row), flush=True)
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
