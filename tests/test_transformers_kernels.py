"""The transformers drop-in on the kernels: bf16 on a GPU against twice sdpa's own error,
plain causal calls taking the dense plan (GPU), torch.compile of a whole model, and
generate()'s decode steps through the KV-cache decode kernel (the Triton interpreter here,
CUDA on a GPU). Models and references: hf_models.py.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from baracuda_kernels.integrations import transformers as bk_hf  # noqa: E402
from hf_models import (  # noqa: E402  (registered: the autouse fixture)
    MODELS, NAME, TOL, VOCAB, build_model, max_diff, model_pair, padded_batch, registered)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_bf16_on_the_gpu_within_twice_sdpa_error(kind):
    """bf16 on CUDA (the triton kernels): logits error against the float64 reference at most
    twice that of the reference attention run in bf16, on a padded batch (a longer one, so
    that the window and the padding cross kernel tiles)."""
    ref64 = build_model(kind, MODELS[kind][2], max_position_embeddings=512).cuda()
    ours = build_model(kind, NAME, max_position_embeddings=512).to("cuda", torch.bfloat16)
    baseline = "eager" if kind == "gemma2" else MODELS[kind][2]  # eager: f32 softmax
    theirs = build_model(kind, baseline, max_position_embeddings=512).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (3, 300), generator=g).cuda()
    mask = torch.ones(3, 300, dtype=torch.long, device="cuda")
    mask[1, :37] = 0
    mask[2, -90:] = 0
    valid = mask.bool()
    with torch.no_grad():
        exact = ref64(ids, attention_mask=mask).logits
        err = max_diff(ours(ids, attention_mask=mask).logits.double(), exact, valid)
        base = max_diff(theirs(ids, attention_mask=mask).logits.double(), exact, valid)
    assert err <= 2 * base + 1e-3, (err, base)


@pytest.mark.gpu
def test_plain_causal_calls_take_the_dense_plan_on_the_gpu(monkeypatch):
    """bf16 on CUDA, no padding, no pattern: every layer's call goes to flash_sdpa (the
    dense plan), and the logits are within twice sdpa's own error against float64; with a
    padded batch the calls stay block-sparse."""
    calls = []
    real = bk_hf.flash_sdpa
    monkeypatch.setattr(bk_hf, "flash_sdpa", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ref64 = build_model("llama", MODELS["llama"][2], max_position_embeddings=512).cuda()
    ours = build_model("llama", NAME, max_position_embeddings=512).to("cuda", torch.bfloat16)
    theirs = build_model("llama", MODELS["llama"][2], max_position_embeddings=512).to(
        "cuda", torch.bfloat16)
    ids = torch.randint(1, VOCAB, (2, 300), generator=torch.Generator().manual_seed(5)).cuda()
    every = torch.ones(ids.shape, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        exact = ref64(ids).logits
        err = max_diff(ours(ids).logits.double(), exact, every)
        base = max_diff(theirs(ids).logits.double(), exact, every)
        assert calls and err <= 2 * base + 1e-3, (len(calls), err, base)
        calls.clear()
        mask = torch.ones_like(ids)
        mask[0, :20] = 0
        ours(ids, attention_mask=mask)
    assert not calls


def test_torch_compile_traces_the_attention_exactly():
    """torch.compile of a whole model (AOT autograd, eager kernels: the graph capture is
    what is tested; inductor's own CPU codegen takes ~1 minute here) gives the logits of
    the uncompiled sdpa model on a left-padded batch."""
    ours, ref = model_pair("llama")
    ids, mask = padded_batch()
    compiled = torch.compile(ours, backend="aot_eager")
    with torch.no_grad():
        a = compiled(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
    assert max_diff(a, b, mask.bool()) <= TOL


@pytest.mark.parametrize("kind,cache", [("mistral", "dynamic"), ("gpt_oss", "dynamic"),
                                        ("llama", "static")])
def test_generate_decode_steps_run_the_decode_kernel(kind, cache, monkeypatch):
    """float32 on the triton backend (the interpreter here, CUDA on a GPU): generate()'s
    decode steps go to the KV-cache entry point's decode kernel (left padding as its
    key_mask, window, sinks) and give the tokens and, to float32 rounding, the scores of the
    reference attention."""
    import baracuda_kernels.attention.decode.kvcache as kvcache
    calls = []
    real = kvcache.decode_forward_triton
    monkeypatch.setattr(kvcache, "decode_forward_triton",
                        lambda *a, **kw: calls.append(kw["key_mask"] is not None) or real(*a, **kw))
    name = "baracuda_triton"
    bk_hf.register(name, backend="triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = build_model(kind, name).float().to(device)
    ref = build_model(kind, MODELS[kind][2]).float().to(device)
    ids, _ = padded_batch()
    ids, mask = ids[:2, :12].to(device), torch.ones(2, 12, dtype=torch.long, device=device)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        assert (sa - sb).abs().max().item() <= 1e-3
    layers = ours.config.num_hidden_layers
    assert len(calls) == 3 * layers and all(calls)   # 3 decode steps after the prefill
