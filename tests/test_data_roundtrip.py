"""Local corpus round trip: text files -> TFDS dataset -> tokenized batches (packed for
training, padded for evaluation) -> decoded text equals the input lines."""

import numpy as np

from attention_jax.data import pipeline, sources, toy_translation
from attention_jax.data.tokenizer import EOS_ID, Tokenizer


def test_files_to_batches_to_text(tmp_path):
    pairs = toy_translation.load_split("validation", sizes=(0, 40, 0))
    pairs += [("Grüße, naïve café — «quoted»", "Größe: 3½ m²")]  # non-ASCII survives
    (tmp_path / "train.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (tmp_path / "train.xx").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    sources.prepare_local_corpus(
        {"train": (tmp_path / "train.en", tmp_path / "train.xx")},
        data_dir=tmp_path / "data",
        name="roundtrip",
    )
    source = sources.load_source("roundtrip", "train", data_dir=tmp_path / "data")
    assert [(x["source"], x["target"]) for x in source] == pairs

    tokenizer = Tokenizer.train((t for p in pairs for t in p), 120)
    ev = pipeline.eval_batches(source, tokenizer, batch_size=16, max_length=128)
    decoded = [
        (tokenizer.decode(x), tokenizer.decode(y))
        for batch in ev
        for x, y, ok in zip(batch["inputs"], batch["targets"], batch["valid"], strict=True)
        if ok
    ]
    assert decoded == pairs and ev.num_truncated == 0

    # Packed training rows: cut each row at its segment boundaries; every pair comes back.
    it = iter(pipeline.train_dataset(source, tokenizer, seed=0, batch_size=4, max_length=128))
    seen = set()
    while len(seen) < len(pairs):
        batch = next(it)
        for row in range(4):
            sides = []
            for side in ("inputs", "targets"):
                tokens, segments = batch[side][row], batch[f"{side}_segmentation"][row]
                sides.append([tokens[segments == s] for s in np.unique(segments[segments > 0])])
            for x, y in zip(*sides, strict=True):
                assert x[-1] == EOS_ID and y[-1] == EOS_ID
                seen.add((tokenizer.decode(x), tokenizer.decode(y)))
    assert seen == set(pairs)
