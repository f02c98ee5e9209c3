"""The Flax Linen model, built on the pure functions of `attention_jax.core`.

- `config`: `TransformerConfig`, the frozen hyperparameters, with the paper's presets
  (`base`, `big`) and `tiny` for tests.
- `layers`: the modules that own parameters (attention projections with the KV cache,
  feed-forward, residual blocks, encoder / decoder layers, the embedding).
- `model`: `Transformer` (encoder-decoder), `TransformerLM` (decoder-only), `shift_right`,
  and the boundary checks of token arrays.
- `sharding`: the logical axis names the parameters carry, the one rules table that maps them
  onto the mesh axes ``('data', 'fsdp', 'model')``, the mesh itself and batch placement.

Depends on `attention_jax.core` only.
"""
