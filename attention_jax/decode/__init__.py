"""Decoding trained models: search, the model's step functions, scores, and translation.

- `search`: beam search, greedy search and sampling over any one-token step function
  ``tokens -> logits`` (model-agnostic, pure JAX).
- `decoding`: the `Transformer` / `TransformerLM` step functions over the KV cache, and
  `translate` / `generate` built on `search`.
- `metrics`: BLEU and chrF through sacreBLEU.
- `translator`: a workdir -> `Translator` (config, vocabulary and checkpoint loaded; text in,
  text out).

Depends on `core`, `nn`, `data` (token ids) and `workdir`.
"""
