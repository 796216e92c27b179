"""The transformers drop-in (baracuda_kernels.integrations.transformers), on the CPU.

Tiny random-init models (hidden 64, 2 layers, vocab 128) built from configs, no downloads,
in float64, against the same weights under transformers' own "sdpa" attention, or "eager"
for gpt-oss (no sdpa: sinks). The q/k projections are scaled up so attention is peaked:
uniform attention would hide masking errors. The bar is max |logits difference| <= 1e-10 on
every real (non-padding) position.

Gemma 2 has no sdpa (softcap) and its eager attention computes the softmax in float32
(``softmax(..., dtype=torch.float32)``: ~1e-7 error, and -inf / NaN rows from the float64
mask minimum under padding), so it is compared with ``dense_f64``: a plain float64 eager
attention written here (scale, softcap, transformers' own sdpa bool mask, softmax in
float64), which ``test_dense_reference_agrees_with_gemma2_eager`` ties to Gemma 2's eager.
"""

import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import baracuda_kernels as bk  # noqa: E402
from baracuda_kernels.integrations import transformers as bk_hf  # noqa: E402
from baracuda_kernels.integrations.hf_masks import HFMaskRule, mask_rule  # noqa: E402

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


def _dense_f64(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
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


def _dense_f64_mask(**kwargs):
    return transformers.masking_utils.sdpa_mask(**dict(kwargs, allow_is_causal_skip=False))


@pytest.fixture(scope="module", autouse=True)
def registered():
    bk_hf.register(NAME)
    bk_hf.register(STRICT, strict=True)
    transformers.AttentionInterface.register("dense_f64", _dense_f64)
    transformers.AttentionMaskInterface.register("dense_f64", _dense_f64_mask)


def test_dense_reference_agrees_with_gemma2_eager():
    """The float64 reference used for Gemma 2 is its eager attention up to eager's float32
    softmax (no padding: eager's float64 mask minimum turns padded rows into NaN)."""
    ids, _ = _batch()
    with torch.no_grad():
        a = _model("gemma2", "dense_f64")(ids).logits
        b = _model("gemma2", "eager")(ids).logits
    assert (a - b).abs().max().item() <= 1e-5


def _config(kind, **extra):
    cls_name, over, _ = MODELS[kind]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    return cls(**{**COMMON, **over, **extra})


def _model(kind, impl, **extra):
    """A float64 model of ``kind`` with attention ``impl``; the same weights every time
    (seeded init, then q/k projections x6 and sinks ~ N(0, 1) so the rules matter)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, **extra),
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
_CACHE_KW = "cache" if "cache" in inspect.signature(
    transformers.LlamaForCausalLM.forward).parameters else "past_key_values"
_PAIRS = {}


def _pair(kind):
    """(ours, reference) for ``kind``, built once per module."""
    if kind not in _PAIRS:
        _PAIRS[kind] = (_model(kind, NAME), _model(kind, MODELS[kind][2]))
    return _PAIRS[kind]


def _batch():
    """input_ids [3, N] and a 2D mask: row 0 full, row 1 left-padded by 5, row 2
    right-padded by 7."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, N), generator=g)
    mask = torch.ones(3, N, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, -7:] = 0
    return ids, mask


def _max_diff(a, b, valid):
    return (a - b)[valid].abs().max().item()


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", list(MODELS))
def test_forward_matches_reference_with_left_and_right_padding(kind):
    ours, ref = _pair(kind)
    ids, mask = _batch()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
    assert a.dtype == torch.float64
    assert _max_diff(a, b, mask.bool()) <= TOL
    with torch.no_grad():                       # no 2D mask at all, and without a cache
        a = ours(ids, use_cache=False).logits
        b = ref(ids, use_cache=False).logits
    assert (a - b).abs().max().item() <= TOL


def test_mask_function_returns_a_rule_not_a_dense_mask():
    seen = []
    attention = bk_hf.HFAttention()

    def spy(module, q, k, v, attention_mask, **kw):
        seen.append(attention_mask)
        return attention(module, q, k, v, attention_mask, **kw)

    transformers.AttentionInterface.register("baracuda_spy", spy)
    transformers.AttentionMaskInterface.register("baracuda_spy", mask_rule)
    ids, mask = _batch()
    with torch.no_grad():
        a = _model("mistral", "baracuda_spy")(ids, attention_mask=mask).logits
    assert _max_diff(a, _pair("mistral")[1](ids, attention_mask=mask).logits, mask.bool()) <= TOL
    assert len(seen) == 2 and all(isinstance(m, HFMaskRule) for m in seen)
    rule = seen[0]
    assert rule.causal and rule.window == 7 and rule.offset == 0 and rule.documents is None
    assert rule.key_ids.shape == (3, N) and rule.key_ids.dtype == torch.int32
    assert rule.key_ids[1, :5].eq(-1).all() and rule.key_ids[2, -7:].eq(-1).all()
    assert rule.key_ids[0].eq(0).all()


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", list(MODELS))
def test_training_step_gradients_match_reference(kind):
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for impl in (NAME, MODELS[kind][2]):
        model = _model(kind, impl).train()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        diff = (grads[0][name] - grads[1][name]).abs().max().item()
        assert diff <= TOL, f"{kind}: grad of {name} differs by {diff:.3g}"
    if kind == "gpt_oss":
        assert any(n.endswith("sinks") for n in grads[0])


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_generate_left_padded_batch_matches_reference(kind):
    ours, ref = _pair(kind)
    ids, mask = _batch()
    ids, mask = ids[:2, :12], torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0                             # left padding, as generate() expects
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert a.sequences.shape == (2, 20)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):      # every decode step, not only the argmax
        assert (sa - sb).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_generate_with_a_static_cache_matches_reference(kind):
    """A static cache: keys are the whole preallocated cache (its unused tail past every
    query's diagonal), masks prepared once per step by generate()."""
    ours, ref = _pair(kind)
    ids, _ = _batch()
    ids, mask = ids[:2, :12], torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
              cache_implementation="static", output_scores=True, return_dict_in_generate=True)
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        assert (sa - sb).abs().max().item() <= TOL


def test_decode_step_is_bottom_right_causal():
    """One decode step against a DynamicCache: Nq = 1 query at the end of the keys."""
    ours, ref = _pair("llama")
    ids, mask = _batch()
    outs = []
    for model in (ours, ref):
        with torch.no_grad():
            first = model(ids[:, :-3], attention_mask=mask[:, :-3], use_cache=True)
            cache = {_CACHE_KW: first.past_key_values}
            nxt = model(ids[:, -3:], attention_mask=mask, use_cache=True, **cache)
        outs.append(nxt.logits)
    assert _max_diff(outs[0], outs[1], mask[:, -3:].bool()) <= TOL


# ----------------------------------------------------------------------------- other rules
def test_packed_sequences_become_documents():
    """No 2D mask, no cache, position_ids restarting: transformers' packed-sequence rule."""
    ours, ref = _pair("qwen2")
    ids, _ = _batch()
    pos = torch.cat([torch.arange(10), torch.arange(N - 10)])[None].expand(3, -1)
    with torch.no_grad():
        a = ours(ids, position_ids=pos, use_cache=False).logits
        b = ref(ids, position_ids=pos, use_cache=False).logits
    assert (a - b).abs().max().item() <= TOL


def test_custom_4d_mask_runs_as_bias():
    ours, ref = _pair("llama")
    ids, _ = _batch()
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(3, 1, N, N, generator=g) < 0.6
    allowed |= torch.eye(N, dtype=torch.bool)       # every row keeps a key
    with torch.no_grad():
        a = ours(ids, attention_mask=allowed, use_cache=False).logits
        b = ref(ids, attention_mask=allowed, use_cache=False).logits
    assert (a - b).abs().max().item() <= TOL


def test_unrecognised_mask_function_is_built_densely_and_exact():
    """A rule we do not translate (chunked attention) comes back as transformers' dense
    bool mask, which the attention function runs as a bias."""
    mu = transformers.masking_utils
    fn = mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long))
    kwargs = dict(batch_size=2, kv_length=10, kv_offset=0, mask_function=fn,
                  attention_mask=None, dtype=torch.float64, config=None)
    if "cache_position" in inspect.signature(mu.sdpa_mask).parameters:
        kwargs["cache_position"] = torch.arange(10)
    else:
        kwargs.update(q_length=10, q_offset=0)
    dense = mask_rule(**kwargs)
    assert isinstance(dense, torch.Tensor) and dense.dtype == torch.bool
    assert dense.shape == (2, 1, 10, 10)
    assert dense[0, 0, 5].tolist() == [False] * 4 + [True, True] + [False] * 4


def test_pattern_option_is_called_per_layer_and_anded():
    calls = []
    bs = 8
    nb = -(-N // bs)
    blocks = torch.ones(1, 1, nb, nb, dtype=torch.bool)
    blocks[..., 2, 0] = False                        # the last query block skips the first

    def pattern(layer_idx, q_len, kv_len):
        calls.append((layer_idx, q_len, kv_len))
        return blocks if layer_idx == 1 else None

    name = "baracuda_pattern"
    bk_hf.register(name, pattern=pattern, block_size=bs)
    ours = _model("llama", name)
    ref = _model("llama", "sdpa")
    ids, _ = _batch()
    token = blocks[0, 0].repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:N, :N]
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    with torch.no_grad():
        h = ref.model.embed_tokens(ids)
        pos = torch.arange(N)[None]
        emb = ref.model.rotary_emb(h, pos)
        for i, layer in enumerate(ref.model.layers):   # per-layer masks for the reference
            m = causal & token if i == 1 else causal
            h = layer(h, attention_mask=m[None, None].expand(3, 1, N, N),
                      position_embeddings=emb, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        b = ref.lm_head(ref.model.norm(h))
        a = ours(ids, use_cache=False).logits
    assert sorted(set(calls)) == [(0, N, N), (1, N, N)]
    assert (a - b).abs().max().item() <= TOL


def test_pattern_option_accepts_a_block_pattern_with_its_own_rules():
    """A BlockPattern carrying a token window applies it exactly, beside the model's
    padding; on a model with a window of its own it is refused, with the fix."""
    from baracuda_kernels.patterns import sliding_window

    name = "baracuda_window_pattern"
    bk_hf.register(name, pattern=lambda layer, nq, nk: sliding_window(nq, window=5,
                                                                      block_size=8))
    ours, ref = _model("llama", name), _model("llama", "sdpa")
    ids, mask = _batch()
    allowed = sliding_window(N, window=5, block_size=8).to_dense_token_mask()
    allowed = allowed & mask.bool()[:, None, None, :]
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, use_cache=False).logits
        b = ref(ids, attention_mask=allowed, use_cache=False).logits
    assert _max_diff(a, b, mask.bool()) <= TOL
    with pytest.raises(bk.InvalidProblem, match="pattern.mask"):
        with torch.no_grad():
            _model("mistral", name)(ids, attention_mask=mask)


def test_pattern_option_refuses_a_prepared_pattern_with_the_fix():
    from baracuda_kernels.patterns import sliding_window

    name = "baracuda_prepared_pattern"
    bk_hf.register(name, pattern=lambda layer, nq, nk: sliding_window(
        nq, window=5, block_size=8).prepare())
    ids, mask = _batch()
    with pytest.raises(bk.InvalidProblem, match="before .prepare"):
        with torch.no_grad():
            _model("llama", name)(ids, attention_mask=mask)


# ----------------------------------------------------------------------------- declines
def test_output_attentions_falls_back_with_one_warning_and_strict_raises():
    """Weights are never formed here: the call runs the model's own eager attention (no
    padding in this batch: Llama's eager softmax runs in float32, where the float64 mask
    minimum becomes -inf and padded rows NaN, in eager itself)."""
    ours, _ = _pair("llama")
    eager = _model("llama", "eager")
    ids, _ = _batch()
    fn = transformers.AttentionInterface._global_mapping[NAME]
    fn._warned.clear()
    with pytest.warns(UserWarning, match="baracuda attention: output_attentions"):
        with torch.no_grad():
            out = ours(ids, output_attentions=True)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        with torch.no_grad():
            ours(ids, output_attentions=True)
            want = eager(ids, output_attentions=True)
    # Ours is given once (transformers 4.5x adds its own about non-eager implementations).
    assert not [w for w in again if "baracuda" in str(w.message)]
    assert out.attentions is not None and len(out.attentions) == 2
    for x, y in zip(out.attentions, want.attentions):
        assert x.shape == (3, 4, N, N) and (x - y).abs().max().item() <= TOL
    assert (out.logits - want.logits).abs().max().item() <= TOL

    strict = _model("llama", STRICT)
    with pytest.raises(bk.Unsupported, match="output_attentions"):
        with torch.no_grad():
            strict(ids, output_attentions=True)


def test_attention_dropout_in_training_falls_back():
    model = _model("llama", NAME, attention_dropout=0.5).train()
    ids, mask = _batch()
    transformers.AttentionInterface._global_mapping[NAME]._warned.clear()
    with pytest.warns(UserWarning, match="baracuda attention: attention dropout"):
        model(ids, attention_mask=mask).logits.sum().backward()
    fn = transformers.AttentionInterface._global_mapping[NAME]
    fn._warned.clear()
    with torch.no_grad():                           # eval: dropout is 0, nothing declined
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            model.eval()(ids, attention_mask=mask)
    assert not [w for w in seen if "baracuda" in str(w.message)]
    strict = _model("llama", STRICT, attention_dropout=0.5).train()
    with pytest.raises(bk.Unsupported, match="dropout"):
        strict(ids, attention_mask=mask)


def test_register_validates_its_options():
    with pytest.raises(bk.InvalidProblem, match="block_size"):
        bk_hf.register("x", block_size=0)
    with pytest.raises(bk.InvalidProblem, match="pattern"):
        bk_hf.register("x", pattern=torch.ones(1))
    with pytest.raises(bk.InvalidProblem, match="name"):
        bk_hf.register("org/kernel")


def test_mixed_dtypes_under_autocast_are_cast_explicitly():
    """q/k in float32 beside a bfloat16 v (autocast projections): one common dtype."""
    fn = transformers.AttentionInterface._global_mapping[NAME]
    ours, _ = _pair("llama")
    module = ours.model.layers[0].self_attn
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k = torch.randn(2, 2, 9, 16, generator=g)
    v = torch.randn(2, 2, 9, 16, generator=g).to(torch.bfloat16)
    rule = HFMaskRule(2, 9, 9, 0, True)
    out, weights = fn(module, q, k, v, rule, scaling=0.25)
    assert weights is None and out.shape == (2, 9, 4, 16) and out.dtype == torch.bfloat16
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1),
        is_causal=True, scale=0.25).transpose(1, 2)
    assert (out.double() - want).abs().max().item() < 3e-2


# ---------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "mistral", "gemma2"])
def test_bf16_on_the_gpu_within_twice_sdpa_error(kind):
    """bf16 on CUDA (the triton kernels): logits error against the float64 reference at most
    twice that of the reference attention run in bf16, on a padded batch (a longer one, so
    that the window and the padding cross kernel tiles)."""
    ref64 = _model(kind, MODELS[kind][2], max_position_embeddings=512).cuda()
    ours = _model(kind, NAME, max_position_embeddings=512).to("cuda", torch.bfloat16)
    baseline = "eager" if kind == "gemma2" else MODELS[kind][2]  # eager: f32 softmax
    theirs = _model(kind, baseline, max_position_embeddings=512).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (3, 300), generator=g).cuda()
    mask = torch.ones(3, 300, dtype=torch.long, device="cuda")
    mask[1, :37] = 0
    mask[2, -90:] = 0
    valid = mask.bool()
    with torch.no_grad():
        exact = ref64(ids, attention_mask=mask).logits
        err = _max_diff(ours(ids, attention_mask=mask).logits.double(), exact, valid)
        base = _max_diff(theirs(ids, attention_mask=mask).logits.double(), exact, valid)
    assert err <= 2 * base + 1e-3, (err, base)


@pytest.mark.gpu
def test_plain_causal_calls_take_the_dense_plan_on_the_gpu(monkeypatch):
    """bf16 on CUDA, no padding, no pattern: every layer's call goes to flash_sdpa (the
    dense plan), and the logits are within twice sdpa's own error against float64; with a
    padded batch the calls stay block-sparse."""
    calls = []
    real = bk_hf.flash_sdpa
    monkeypatch.setattr(bk_hf, "flash_sdpa", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ref64 = _model("llama", MODELS["llama"][2], max_position_embeddings=512).cuda()
    ours = _model("llama", NAME, max_position_embeddings=512).to("cuda", torch.bfloat16)
    theirs = _model("llama", MODELS["llama"][2], max_position_embeddings=512).to(
        "cuda", torch.bfloat16)
    ids = torch.randint(1, VOCAB, (2, 300), generator=torch.Generator().manual_seed(5)).cuda()
    every = torch.ones(ids.shape, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        exact = ref64(ids).logits
        err = _max_diff(ours(ids).logits.double(), exact, every)
        base = _max_diff(theirs(ids).logits.double(), exact, every)
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
    ours, ref = _pair("llama")
    ids, mask = _batch()
    compiled = torch.compile(ours, backend="aot_eager")
    with torch.no_grad():
        a = compiled(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
    assert _max_diff(a, b, mask.bool()) <= TOL


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
    ours = _model(kind, name).float().to(device)
    ref = _model(kind, MODELS[kind][2]).float().to(device)
    ids, _ = _batch()
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
