"""Attention of a few new queries against a KV cache (decode, chunked prefill)."""
