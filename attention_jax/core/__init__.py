"""The pure core: attention, masks and positional encodings in JAX alone (no Flax).

Which file holds what:

* ``attention.py``: the paper's attention. :func:`~.attention.scaled_dot_product_attention`
  (one head, the four steps: scores, scale, masked softmax, weighted sum of the values),
  :func:`~.attention.attention_weights` (steps 1-3), :func:`~.attention.masked_softmax`
  (step 3), :func:`~.attention.dot_product_attention` (the same over heads and batch,
  signature-compatible with flax's, running one of several implementations) and
  :func:`~.attention.multi_head_attention` (with the learned projections).
* ``dispatch.py``: the one place that decides which implementation runs a call: the
  policy for ``implementation=None`` / ``'auto'``, the checks of an explicit choice, and
  what the fused kernels accept on which device.
* ``blockwise.py``: the memory-efficient pure-JAX algorithm (tiles, online softmax, custom
  VJP). A leaf: it imports nothing from the package.
* ``kernels.py``: wrappers of the fused kernels JAX ships (cuDNN through ``jax.nn``, the
  Pallas flash-attention kernels) behind one ``[B, T, N, H]`` interface.
* ``masks.py``: bool masks, True = attend (causal, padding, segments, their AND).
* ``positional.py``: the paper's sinusoidal encoding and rotary embeddings.
* ``_checks.py``: the argument checks the files above share.

Imports point one way: ``attention`` -> ``dispatch``, ``blockwise``, ``kernels``,
``positional``; ``kernels`` -> ``dispatch``; everything may use ``_checks``.

Dimension legend, used in every docstring, shape comment and einsum string of the core:

    B batch · T query length · S key/value length · N heads · K key/value heads
    (grouped-query attention, as in jax.nn: K divides N, query head n uses key/value head
    n // (N // K); K = N unless stated) · H head dim of queries and keys · Hv head dim of
    values (written E in einsum strings, which take one letter per axis) · D model width
    (d_model) · G batch × heads, flattened.

V is kept for the vocabulary (the model's legend), so a value head dim never reads as V.
"""
