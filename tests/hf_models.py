"""Tiny random-init transformers models for the drop-in's tests (no downloads): configs,
the float64 reference attention ``dense_f64`` (for Gemma 2, whose eager softmax runs in
float32), a left/right-padded batch, and the registration fixture the test modules use.

The models are float64 with the q/k projections scaled up so attention is peaked (uniform
attention would hide masking errors); ``model_pair(kind)`` gives (ours, reference) on the
same weights, built once per process.
"""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from baracuda_kernels.integrations import transformers as bk_hf  # noqa: E402

NAME = "baracuda"
STRICT = "baracuda_strict"
TOL = 1e-10
VOCAB, N = 128, 24

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              attention_dropout=0.0)
HYBRID = ["sliding_attention", "full_attention"]
# name: (config class, config overrides, reference attn_implementation)
MODELS = {
    "llama": ("LlamaConfig", {}, "sdpa"),
    "mistral": ("MistralConfig", dict(sliding_window=7), "sdpa"),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6,
                                  max_window_layers=1), "sdpa"),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
                                    attn_logit_softcapping=2.5, final_logit_softcapping=30.0,
                                    layer_types=HYBRID), "dense_f64"),
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, intermediate_size=32, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=6,
                                     layer_types=HYBRID, rope_scaling=None,
                                     # transformers 5's default grouped_mm has no float64
                                     experts_implementation="eager"), "eager"),
}


def dense_f64(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
               softcap=None, s_aux=None, **kwargs):
    """Reference attention: dense, float64 softmax, transformers' bool mask (True = attend);
    a row with no allowed key gives 0, as SDPA."""
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = (query @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~attention_mask[..., :k.shape[2]], -torch.inf)
    if s_aux is not None:
        s = torch.cat([s, s_aux.reshape(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    y = p[..., :k.shape[2]] @ v
    return y.transpose(1, 2).contiguous(), None


def dense_f64_mask(**kwargs):
    return transformers.masking_utils.sdpa_mask(**dict(kwargs, allow_is_causal_skip=False))


@pytest.fixture(scope="module", autouse=True)
def registered():
    bk_hf.register(NAME)
    bk_hf.register(STRICT, strict=True)
    transformers.AttentionInterface.register("dense_f64", dense_f64)
    transformers.AttentionMaskInterface.register("dense_f64", dense_f64_mask)


def model_config(kind, **extra):
    cls_name, over, _ = MODELS[kind]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    return cls(**{**COMMON, **over, **extra})


def build_model(kind, impl, **extra):
    """A float64 model of ``kind`` with attention ``impl``; the same weights every time
    (seeded init, then q/k projections x6 and sinks ~ N(0, 1) so the rules matter)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config(kind, **extra),
                                                          attn_implementation=impl)
    model.to(torch.float64)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.mul_(6.0)
            attn.k_proj.weight.mul_(6.0)
            if hasattr(attn, "sinks"):
                attn.sinks.copy_(torch.randn(attn.sinks.shape, dtype=torch.float64))
    return model.eval()


# transformers 5 renames the forward's past_key_values to cache (the old name warns)
CACHE_KW = "cache" if "cache" in inspect.signature(
    transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
PAIRS = {}


def model_pair(kind):
    """(ours, reference) for ``kind``, built once per module."""
    if kind not in PAIRS:
        PAIRS[kind] = (build_model(kind, NAME), build_model(kind, MODELS[kind][2]))
    return PAIRS[kind]


def padded_batch():
    """input_ids [3, N] and a 2D mask: row 0 full, row 1 left-padded by 5, row 2
    right-padded by 7."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, N), generator=g)
    mask = torch.ones(3, N, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, -7:] = 0
    return ids, mask


def max_diff(a, b, valid):
    return (a - b)[valid].abs().max().item()
