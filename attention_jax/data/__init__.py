"""Data: what the model reads, as token ids.

- `tokenizer`: the SentencePiece vocabulary and the special ids (`PAD_ID`, `EOS_ID`,
  `UNK_ID`), defined here once for the whole package.
- `sources`: parallel text (WMT14, local corpora) and monolingual text (lm1b, local text
  corpora) as random-access TFDS ``array_record`` datasets.
- `toy_translation`: the built-in translation corpus, generated offline (its English side
  is the built-in language-model corpus, ``toy_lm``).
- `synthetic`: the built-in sequence-reversal task.
- `pipeline`: grain pipelines: packed training batches, padded evaluation batches; for
  language models, packed text with per-token byte counts, and bits per byte.
- `tasks`: a run's data (batches per step, evaluation splits, vocabulary) from its config:
  reversal, translation or language modelling (`tasks.task_kind`).
- `_checks`: the argument checks these modules share.

Depends on nothing in the package but `attention_jax.workdir`'s names (no model code).
"""
