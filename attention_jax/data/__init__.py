"""Data: what the model reads, as token ids.

- `tokenizer`: the SentencePiece vocabulary and the special ids (`PAD_ID`, `EOS_ID`,
  `UNK_ID`), defined here once for the whole package.
- `sources`: parallel text as random-access TFDS ``array_record`` datasets (WMT14, local
  corpora).
- `toy_translation`: the built-in translation corpus, generated offline.
- `synthetic`: the built-in sequence-reversal task.
- `pipeline`: grain pipelines: packed training batches, padded evaluation batches.
- `tasks`: a run's data (batches per step, evaluation splits, vocabulary) from its config.
- `_checks`: the argument checks these modules share.

Depends on nothing in the package but `attention_jax.workdir`'s names (no model code).
"""
