"""Issue 14, training side: the README's local-corpus recipe, the vocabulary size and data
directory a run records, model options reachable from the flags of every shipped config,
and the optimizer / schedule values a config is refused for.

(The one-line CLI errors are in test_bad_inputs.py, the lock in test_workdir.py, the wheel in
test_packaging.py.)
"""

import dataclasses
import json
import math

import pytest
from absl import flags
from ml_collections import config_flags

from attention_jax import configs
from attention_jax.data import sources, tasks, toy_translation
from attention_jax.data.tokenizer import Tokenizer, default_vocab_path
from attention_jax.nn.config import TransformerConfig
from attention_jax.train import loop as train_loop
from attention_jax.workdir import load_config
from attention_jax.workdir.experiment import check_experiment, model_config

VOCAB = 200  # what the corpus was prepared with; the config file says 37000


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
    """The README's recipe, step 1, for a small corpus: `prepare --dataset=local
    --name=my_corpus --train=train.en,train.de --validation=dev.tsv --vocab_size=200` (what
    cli/prepare_data.py does, in-process): train and validation splits, no test split."""
    root = tmp_path_factory.mktemp("corpus")
    train = toy_translation.load_split("train", sizes=(400, 40, 0))
    dev = toy_translation.load_split("validation", sizes=(400, 40, 0))
    (root / "train.en").write_text("".join(s + "\n" for s, _ in train), encoding="utf-8")
    (root / "train.de").write_text("".join(t + "\n" for _, t in train), encoding="utf-8")
    (root / "dev.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in dev), encoding="utf-8")
    data = root / "data"
    splits = {"train": (root / "train.en", root / "train.de"), "validation": root / "dev.tsv"}
    sources.prepare_local_corpus(splits, data_dir=data, name="my_corpus")
    sentences = [text for pair in train for text in pair]
    Tokenizer.train(sentences, VOCAB).save(default_vocab_path(data, "my_corpus", VOCAB))
    return data


def _wmt14_base(steps):
    """configs/wmt14_base.py with tiny overrides (step 2 of the recipe)."""
    config = _load("wmt14_base")
    config.model.update(d_model=32, num_heads=4, num_layers=1, d_ff=64, max_len=64)
    config.model.dtype = "float32"
    config.data.update(dataset="my_corpus", max_length=40, tokens_per_batch=640, workers=0)
    config.data.update(prefetch=0, eval_examples=16, eval_batch_size=16)
    config.update(num_train_steps=steps, warmup_steps=2, log_every=2, eval_every=2)
    config.update(checkpoint_every=2, beam_size=1)
    return config


def _load(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, configs.path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_readme_local_corpus_recipe_trains_resumes_and_evaluates(
    local_corpus, tmp_path, monkeypatch
):
    """Was: a traceback after the last step (no test split), again on every rerun; and the
    model's vocab_size was the config's 37000, not the prepared vocabulary's 200."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(local_corpus))  # how the README's user finds it
    work = str(tmp_path / "w")
    final = train_loop.train_and_evaluate(_wmt14_base(2), work)
    assert {"loss", "accuracy", "bleu"} <= set(final)  # the validation scores stand in
    again = train_loop.train_and_evaluate(_wmt14_base(2), work)  # the rerun: nothing to do
    assert again == pytest.approx(final)
    saved = json.loads((tmp_path / "w" / "config.json").read_text())
    assert saved["model"]["vocab_size"] == VOCAB
    assert saved["data"]["data_dir"] == str(local_corpus)  # recorded for evaluation
    assert Tokenizer.load(tmp_path / "w" / "vocab.model").vocab_size == VOCAB
    records = [
        json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().split("\n")[:-1]
    ]
    assert not any(k.startswith("test_") for r in records for k in r)

    # Evaluation reads the data dir training found through $TFDS_DATA_DIR from config.json.
    monkeypatch.delenv("TFDS_DATA_DIR")
    sources_, references = tasks.load_eval_pairs(load_config(work), "validation")
    assert len(sources_) == len(references) == 40
    with pytest.raises(ValueError, match=r"no 'test' split \(it has \['train', 'validation'\]\)"):
        tasks.load_eval_pairs(load_config(work), "test")


def test_the_prepared_vocabulary_sets_the_model_size(local_corpus, tmp_path):
    config = _wmt14_base(1)
    config.data.data_dir = str(local_corpus)
    assert tasks.resolve_vocab_size(config, str(tmp_path)) == (
        VOCAB, str(default_vocab_path(local_corpus, "my_corpus", VOCAB)),
    )  # fmt: skip
    # Two prepared sizes and the config names neither: the user must choose.
    other = default_vocab_path(local_corpus, "my_corpus", 150)
    other.write_bytes(default_vocab_path(local_corpus, "my_corpus", VOCAB).read_bytes())
    try:
        with pytest.raises(ValueError, match=r"vocabularies of \[150, 200\] pieces .* "
                                             r"--config.model.vocab_size=150"):  # fmt: skip
            tasks.resolve_vocab_size(config, str(tmp_path))
        config.model.vocab_size = VOCAB
        assert tasks.resolve_vocab_size(config, str(tmp_path))[0] == VOCAB
    finally:
        other.unlink()


# ---- every TransformerConfig field from the command line, for every shipped config -------

# An override for each field, all different from every shipped config's value, and valid
# together. A new TransformerConfig field without a line here fails the test.
OVERRIDES = {
    "vocab_size": ("77", 77),
    "target_vocab_size": ("91", 91),
    "share_embeddings": ("False", False),
    "d_model": ("48", 48),
    "num_heads": ("2", 2),
    "num_layers": ("1", 1),
    "num_decoder_layers": ("3", 3),
    "d_ff": ("96", 96),
    "dropout_rate": ("0.25", 0.25),
    "attention_dropout_rate": ("0.05", 0.05),
    "max_len": ("300", 300),
    "positional": ("rotary", "rotary"),
    "pre_ln": ("True", True),
    "activation": ("gelu", "gelu"),
    "layer_norm_epsilon": ("1e-05", 1e-5),
    "pad_id": ("1", 1),
    "dtype": ("float16", "float16"),
    "param_dtype": ("bfloat16", "bfloat16"),
    "attention_implementation": ("blockwise", "blockwise"),
    "num_kv_heads": ("1", 1),
    "norm": ("rmsnorm", "rmsnorm"),
    "feed_forward": ("swiglu", "swiglu"),
    "attention_bias": ("False", False),
    "tie_output_embedding": ("True", True),
    "remat": ("dots", "dots"),
    "scan_layers": ("True", True),
}


def _parse(argv):
    """The real flag parsing of the train command (config_flags), on fresh FlagValues."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.filterwarnings("ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", configs.names())
def test_every_model_field_can_be_set_from_the_flags(name):
    fields = [f.name for f in dataclasses.fields(TransformerConfig)]
    assert sorted(OVERRIDES) == sorted(fields)
    argv = ["train", f"--config={configs.path(name)}"]
    argv += [f"--config.model.{field}={OVERRIDES[field][0]}" for field in fields]
    config = _parse(argv)
    cfg = model_config(config)
    import jax.numpy as jnp

    for field in fields:
        got = getattr(cfg, field)
        if field in ("dtype", "param_dtype"):
            got = jnp.dtype(got).name
        assert got == OVERRIDES[field][1], field


# ---- optimizer and schedule values --------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lr_factor", -1.0, r"config.lr_factor must be a number > 0, got -1.0"),
        ("lr_factor", math.nan, r"config.lr_factor must be a number > 0, got nan"),
        ("clip_norm", -0.5, r"config.clip_norm must be a number >= 0 \(0: no clipping\)"),
        ("beam_size", 0, r"config.beam_size must be a positive int, got 0"),
        ("alpha", -0.6, r"config.alpha must be a number >= 0, got -0.6"),
        ("nonfinite", "ignore", r"config.nonfinite must be one of \('stop', 'skip'\)"),
        ("data.tokens_per_batch", 0, r"config.data.tokens_per_batch must be a positive int"),
    ],
)
def test_nonsense_optimizer_values_are_refused(field, value, match):
    config = _load("default")
    *parents, key = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[key] = value
    with pytest.raises(ValueError, match=match):
        check_experiment(config)


def test_the_shipped_configs_pass_the_checks_and_the_experiments_copies_are_the_same():
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for name in configs.names():
        config = _load(name)
        check_experiment(config)
        model_config(config)
        spec = importlib.util.spec_from_file_location(
            f"exp_{name}", root / "experiments" / "configs" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.get_config().to_dict() == config.to_dict()


def test_the_library_refuses_them_too_before_the_workdir_exists(tmp_path):
    """Notebooks call train_and_evaluate directly, without the command's checks."""
    config = _load("reversal")
    config.lr_factor = -1.0
    with pytest.raises(ValueError, match=r"config.lr_factor must be a number > 0, got -1.0"):
        train_loop.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_the_built_in_corpus_keeps_the_configured_size(local_corpus, tmp_path):
    """Its data is generated in memory: a prepared vocabulary of another size is not used
    (tests and the README override model.vocab_size for it)."""
    vocab = default_vocab_path(tmp_path, "toy_translation", 150)
    vocab.parent.mkdir(parents=True)
    vocab.write_bytes(default_vocab_path(local_corpus, "my_corpus", VOCAB).read_bytes())
    config = _load("default")
    config.data.data_dir = str(tmp_path)
    config.model.vocab_size = 300
    assert tasks.resolve_vocab_size(config, None) == (300, None)
