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
from hf_models import (  # noqa: E402  (registered: the autouse fixture)
    CACHE_KW, MODELS, N, NAME, STRICT, TOL, build_model, max_diff, model_pair, padded_batch,
    registered)


def test_dense_reference_agrees_with_gemma2_eager():
    """The float64 reference used for Gemma 2 is its eager attention up to eager's float32
    softmax (no padding: eager's float64 mask minimum turns padded rows into NaN)."""
    ids, _ = padded_batch()
    with torch.no_grad():
        a = build_model("gemma2", "dense_f64")(ids).logits
        b = build_model("gemma2", "eager")(ids).logits
    assert (a - b).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", list(MODELS))
def test_forward_matches_reference_with_left_and_right_padding(kind):
    ours, ref = model_pair(kind)
    ids, mask = padded_batch()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
    assert a.dtype == torch.float64
    assert max_diff(a, b, mask.bool()) <= TOL
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
    ids, mask = padded_batch()
    with torch.no_grad():
        a = build_model("mistral", "baracuda_spy")(ids, attention_mask=mask).logits
    assert max_diff(a, model_pair("mistral")[1](ids, attention_mask=mask).logits, mask.bool()) <= TOL
    assert len(seen) == 2 and all(isinstance(m, HFMaskRule) for m in seen)
    rule = seen[0]
    assert rule.causal and rule.window == 7 and rule.offset == 0 and rule.documents is None
    assert rule.key_ids.shape == (3, N) and rule.key_ids.dtype == torch.int32
    assert rule.key_ids[1, :5].eq(-1).all() and rule.key_ids[2, -7:].eq(-1).all()
    assert rule.key_ids[0].eq(0).all()


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", list(MODELS))
def test_training_step_gradients_match_reference(kind):
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for impl in (NAME, MODELS[kind][2]):
        model = build_model(kind, impl).train()
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
    ours, ref = model_pair(kind)
    ids, mask = padded_batch()
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
    ours, ref = model_pair(kind)
    ids, _ = padded_batch()
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
    ours, ref = model_pair("llama")
    ids, mask = padded_batch()
    outs = []
    for model in (ours, ref):
        with torch.no_grad():
            first = model(ids[:, :-3], attention_mask=mask[:, :-3], use_cache=True)
            cache = {CACHE_KW: first.past_key_values}
            nxt = model(ids[:, -3:], attention_mask=mask, use_cache=True, **cache)
        outs.append(nxt.logits)
    assert max_diff(outs[0], outs[1], mask[:, -3:].bool()) <= TOL


# ----------------------------------------------------------------------------- other rules
def test_packed_sequences_become_documents():
    """No 2D mask, no cache, position_ids restarting: transformers' packed-sequence rule."""
    ours, ref = model_pair("qwen2")
    ids, _ = padded_batch()
    pos = torch.cat([torch.arange(10), torch.arange(N - 10)])[None].expand(3, -1)
    with torch.no_grad():
        a = ours(ids, position_ids=pos, use_cache=False).logits
        b = ref(ids, position_ids=pos, use_cache=False).logits
    assert (a - b).abs().max().item() <= TOL


def test_custom_4d_mask_runs_as_bias():
    ours, ref = model_pair("llama")
    ids, _ = padded_batch()
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
    ours = build_model("llama", name)
    ref = build_model("llama", "sdpa")
    ids, _ = padded_batch()
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
    ours, ref = build_model("llama", name), build_model("llama", "sdpa")
    ids, mask = padded_batch()
    allowed = sliding_window(N, window=5, block_size=8).to_dense_token_mask()
    allowed = allowed & mask.bool()[:, None, None, :]
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, use_cache=False).logits
        b = ref(ids, attention_mask=allowed, use_cache=False).logits
    assert max_diff(a, b, mask.bool()) <= TOL
    with pytest.raises(bk.InvalidProblem, match="pattern.mask"):
        with torch.no_grad():
            build_model("mistral", name)(ids, attention_mask=mask)


def test_pattern_option_refuses_a_prepared_pattern_with_the_fix():
    from baracuda_kernels.patterns import sliding_window

    name = "baracuda_prepared_pattern"
    bk_hf.register(name, pattern=lambda layer, nq, nk: sliding_window(
        nq, window=5, block_size=8).prepare())
    ids, mask = padded_batch()
    with pytest.raises(bk.InvalidProblem, match="before .prepare"):
        with torch.no_grad():
            build_model("llama", name)(ids, attention_mask=mask)


# ----------------------------------------------------------------------------- declines
def test_output_attentions_falls_back_with_one_warning_and_strict_raises():
    """Weights are never formed here: the call runs the model's own eager attention (no
    padding in this batch: Llama's eager softmax runs in float32, where the float64 mask
    minimum becomes -inf and padded rows NaN, in eager itself)."""
    ours, _ = model_pair("llama")
    eager = build_model("llama", "eager")
    ids, _ = padded_batch()
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

    strict = build_model("llama", STRICT)
    with pytest.raises(bk.Unsupported, match="output_attentions"):
        with torch.no_grad():
            strict(ids, output_attentions=True)


def test_attention_dropout_in_training_falls_back():
    model = build_model("llama", NAME, attention_dropout=0.5).train()
    ids, mask = padded_batch()
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
    strict = build_model("llama", STRICT, attention_dropout=0.5).train()
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
    ours, _ = model_pair("llama")
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


def test_decode_step_layers_share_one_key_mask(monkeypatch):
    """A rule's valid keys are worked out once per (keys kept, device) and shared by the
    layers of one forward (one rule per forward), and they are the non-padding keys."""
    import baracuda_kernels.attention.decode.kvcache as kvcache
    masks = []
    real = kvcache.block_sparse_attention_with_kvcache
    monkeypatch.setattr(bk_hf, "block_sparse_attention_with_kvcache",
                        lambda *a, **kw: masks.append(kw["key_mask"]) or real(*a, **kw))
    ours, ref = model_pair("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        first = ours(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = ours(ids[:, -1:], attention_mask=mask, use_cache=True,
                    **{CACHE_KW: first.past_key_values})
        want = ref(ids, attention_mask=mask).logits[:, -1:]
    layers = ours.config.num_hidden_layers
    assert len(masks) == layers and all(m is masks[0] for m in masks)
    assert torch.equal(masks[0], mask.bool())
    assert max_diff(step.logits, want, mask[:, -1:].bool()) <= TOL
    rule = HFMaskRule(2, 1, 5, 4, True, key_ids=torch.tensor([[0, 0, -1, 0, 0], [-1] * 5]))
    assert rule.valid_keys(3, "cpu") is rule.valid_keys(3, "cpu")
    assert rule.valid_keys(3, "cpu").tolist() == [[True, True, False], [False] * 3]
