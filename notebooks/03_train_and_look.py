# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Train a Transformer, then look inside it
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/attention-jax/attention_jax/blob/main/notebooks/03_train_and_look.ipynb)
#
# We train the paper's encoder-decoder on the built-in translation task (English into an
# invented language whose clauses end in the verb and whose adjectives follow their noun),
# plot the training curves, translate a few sentences with beam search, and then run the
# model once more to **look at its attention**: encoder self-attention, decoder
# self-attention and the cross-attention that aligns each output word with the input
# words it translates.
#
# The training is the default experiment (`experiments/configs/default.py`, the same as
# `make train`): a 2-layer, 4-head model, d_model 128, 600 steps, about 3-4 minutes on a
# 2-core laptop CPU, faster on a GPU. Nothing here needs an accelerator.

# %%
# On Colab: install the package, and fetch the repository for experiments/ (the configs).
# ruff: noqa: E402  (the imports below follow this install cell, as notebooks need)
import os
import subprocess
import sys

REPO = "https://github.com/attention-jax/attention_jax"
if "google.colab" in sys.modules:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", f"attention_jax[notebooks] @ git+{REPO}"],
        check=True,
    )
    if not os.path.isdir("/content/attention_jax"):
        subprocess.run(
            ["git", "clone", "-q", "--depth=1", REPO, "/content/attention_jax"], check=True
        )

# %%
import importlib.util
import pathlib
import shutil
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

import attention_jax
from attention_jax import visualize
from attention_jax.data import toy_translation
from attention_jax.data.tasks import load_eval_pairs
from attention_jax.data.tokenizer import EOS_ID
from attention_jax.decode.translator import Translator
from attention_jax.train.loop import train_and_evaluate

# TINY: a few steps of a tiny model, so the whole notebook runs in well under a minute on a
# CPU (the tests run it so). Its translations are wrong and its attention is noise.
TINY = os.environ.get("ATTENTION_JAX_TINY", "0") == "1"


def find_repo_root() -> pathlib.Path:
    """The checkout holding experiments/configs (here, above the notebook, or Colab's clone)."""
    here = pathlib.Path.cwd().resolve()
    package = pathlib.Path(attention_jax.__file__).resolve().parents[1]
    for root in (here, *here.parents, package, pathlib.Path("/content/attention_jax")):
        if (root / "experiments" / "configs" / "default.py").is_file():
            return root
    raise FileNotFoundError("experiments/configs not found: run from a checkout of " + REPO)


def load_config(name: str):
    """`get_config()` of experiments/configs/<name>.py (an ml_collections ConfigDict)."""
    path = ROOT / "experiments" / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


ROOT = find_repo_root()
print(f"TINY={TINY}  devices: {jax.devices()}  repository: {ROOT}")

# %% [markdown]
# ## The experiment
#
# `get_config()` returns an `ml_collections.ConfigDict`: every field is commented in the
# config file, and any of them can be changed here before training (as
# `--config.field=value` does on the command line). The workdir receives the vocabulary,
# the Orbax checkpoints, `config.json` and `metrics.jsonl`; running the training cell again
# with the same workdir resumes from its last checkpoint (a finished run just re-scores).

# %%
config = load_config("default")
if TINY:
    config.model.update(vocab_size=300, d_model=32, d_ff=64)
    config.data.update(
        corpus_sizes=(2000, 64, 64), tokens_per_batch=640, eval_examples=16, eval_batch_size=16
    )
    config.update(num_train_steps=10, log_every=5, eval_every=10, checkpoint_every=10)
    WORKDIR = tempfile.mkdtemp(prefix="attention_jax_03_")  # nothing is written to the repo
else:
    WORKDIR = str(ROOT / "workdir" / "03_train_and_look")
print(config.model)
print(f"{config.num_train_steps} steps of ~{config.data.tokens_per_batch} tokens per side")
print(f"workdir: {WORKDIR}")

# %% [markdown]
# ## Train
#
# `train_and_evaluate` is what `experiments/train.py` calls: it trains a SentencePiece
# vocabulary on the corpus, packs sentence pairs into batches, runs the jitted train step
# (Adam with the paper's warmup schedule, label smoothing 0.1), scores the validation split
# with greedy decoding, and finally the test split with beam search (beam 4, α 0.6).

# %%
start = time.perf_counter()
final = train_and_evaluate(config, WORKDIR)
print(f"{time.perf_counter() - start:.0f} s; test BLEU {final['bleu']:.1f}")

# %% [markdown]
# ## Training curves
#
# The run appended one JSON object per logging step to `WORKDIR/metrics.jsonl` (TensorBoard
# files are there too: `tensorboard --logdir WORKDIR`). The loss is the cross-entropy
# against the label-smoothed target minus that target's entropy, so 0 is a perfect fit;
# the validation and test points come from the evaluations at the end.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
visualize.training_curves(WORKDIR, ax=axes[0], title="loss")
visualize.training_curves(
    WORKDIR, keys=["train_accuracy", "eval_accuracy"], ax=axes[1], title="token accuracy"
)
plt.show()

# %% [markdown]
# ## Translate
#
# `Translator.from_workdir` reads the workdir's config, vocabulary and latest checkpoint;
# `translate` runs beam search with a KV cache. The corpus is generated by a grammar, so
# `toy_translation.translate` gives the exact reference for any sentence it can parse. The
# first sentences are from the held-out test split; the last one we wrote ourselves (its
# source text hashes into the test split too, so the model never trained on it).

# %%
translator = Translator.from_workdir(WORKDIR)
sources, references = load_eval_pairs(config, "test")
SENTENCE = "the old farmer found a key in the garden ."
short = [s for s in sources if len(s.split()) <= 12]  # easier to read
examples = [*short[:4], SENTENCE]
outputs = translator.translate(examples, beam_size=4, alpha=0.6, batch_size=len(examples))
for source, output in zip(examples, outputs, strict=True):
    reference = toy_translation.translate(source)
    mark = "✓" if output == reference else "✗"
    print(f"EN   {source}\nREF  {reference}\nOUT  {output}  {mark}\n")

# %% [markdown]
# ## Collect the attention weights
#
# Every attention block sows its weights `[B, N, T, S]` into the Flax `intermediates`
# collection when that collection is mutable, so one teacher-forced forward pass with
# `mutable=["intermediates"]` returns them next to the logits. We feed the sentence above
# and its reference translation. The decoder reads the target shifted right (it starts
# from `<s>`), so decoder row t is the position that *predicts* target token t: we label
# rows with the token they predict and decoder keys with the token they read.

# %%
tokenizer, model = translator.tokenizer, translator.model
target = toy_translation.translate(SENTENCE)
src_ids = np.append(tokenizer.encode(SENTENCE), EOS_ID)[None]  # [1, S]
tgt_ids = np.append(tokenizer.encode(target), EOS_ID)[None]  # [1, T]
src_labels = [*tokenizer.pieces(SENTENCE), "</s>"]  # S labels ("▁" starts a word)
out_labels = [*tokenizer.pieces(target), "</s>"]  # T labels: what each decoder row predicts
in_labels = ["<s>", *out_labels[:-1]]  # T labels: what each decoder position reads

logits, state = model.apply(
    {"params": translator.params}, src_ids, tgt_ids, mutable=["intermediates"]
)  # logits [1, T, V]
weights = state["intermediates"]


def stacked(stack: str, block: str) -> np.ndarray:
    """One kind of attention of every layer, [L, N, T, S] (batch row 0)."""
    layers = range(len(weights[stack]))  # layer_0, layer_1, ...
    # sow() keeps a tuple of values; there is one call per layer here.
    return np.stack(
        [weights[stack][f"layer_{i}"][block]["attention_weights"][0][0] for i in layers]
    )


encoder_self = stacked("encoder", "self_attention")  # [L, N, S, S]
decoder_self = stacked("decoder", "self_attention")  # [L, N, T, T]
cross = stacked("decoder", "cross_attention")  # [L, N, T, S]
argmax = np.asarray(logits[0]).argmax(-1)  # [T]: the model's guess at each target position
print("shapes:", encoder_self.shape, decoder_self.shape, cross.shape)
print("reference:       ", target)
print("argmax per token:", " ".join(tokenizer.decode([int(i)]) or "</s>" for i in argmax))
if TINY:
    print("TINY mode: 10 training steps. The pictures below are noise, not alignments.")

# %% [markdown]
# ## Cross-attention: the alignment
#
# Row t shows where the decoder looks in the English sentence while it produces target
# token t (one panel per layer and head; every row sums to 1). What to look for in the
# trained model (full mode; the picture is `docs/images/cross_attention.png`):
#
# * **It is not a diagonal.** The bright cells follow the words, not the positions:
#   `grask` looks at *farmer*, and the adjective `staro` after it looks back at *old*,
#   which came *before* *farmer*: the alignment crosses.
# * **The place phrase moves ahead of the object.** `te vrtal vu` looks at *the garden in*
#   (the postposition `vu` at *in*, to the left of *the garden*), and only then `na kljun`
#   looks at *a key*, which came earlier in the English sentence.
# * **The verb comes last.** The stem `najd` looks at *found*, from the middle of the
#   source: the long-distance reordering that a left-to-right RNN must carry in its state
#   is here one lookup.
# * **Agreement.** An article's vowel is its noun's gender (`ta grask`, `na kljun`), so in
#   the last layer some heads look from `ta` at *farmer* and from `na` at *key* rather than
#   at *the* and *a*.
# * **Layers.** The first layer's heads are blurred and partly one word off; in the last
#   layer all four heads agree on an almost one-hot alignment.
#
# In TINY mode the model has trained for a handful of steps: the pictures are noise.

# %%
fig = visualize.attention_grid(
    cross, out_labels, src_labels, title=f"cross-attention: {SENTENCE!r} -> {target!r}"
)
if not TINY:  # the picture in the repository comes from the full run
    visualize.save_figure(fig, ROOT / "docs" / "images" / "cross_attention.png")
plt.show()

# %% [markdown]
# Averaged over the heads of the last layer, the alignment reads like a permutation matrix
# in the target language's word order. The verb ending `ava` (past tense, agreeing with the
# subject) is the exception: its heads look at *found*, at the subject's *the*, and at `.`
# and `</s>`.

# %%
ax = visualize.attention_heatmap(
    cross[-1].mean(axis=0),
    out_labels,
    src_labels,
    title="cross-attention, last layer, mean of heads",
)
if not TINY:
    visualize.save_figure(ax, ROOT / "docs" / "images" / "cross_attention_mean.png")
plt.show()

# %% [markdown]
# ## Encoder self-attention
#
# Every English piece attends to every other (no mask here: the sentence has no padding).
# In the trained model, layer 1 head 0 sends each article to its noun (*the* → *farmer*,
# *a* → *key*, *the* → *garden*) and the other words mostly to the next word, so the
# article's vector learns the noun it belongs to: what the decoder's `ta`/`na` need.
# Other heads gather the place phrase at *in*, or rest on `.` and `</s>` (a common
# "nothing to do here" pattern).

# %%
visualize.attention_grid(encoder_self, src_labels, src_labels, title="encoder self-attention")
plt.show()

# %% [markdown]
# ## Decoder self-attention
#
# The causal mask leaves everything above the diagonal at exactly 0: row t reads only
# `<s>` and the target tokens before t (the key on the diagonal is the previous token).
# Look for a head that reads the previous token (layer 0, head 3: the diagonal), rows
# resting on `<s>` when nothing earlier matters, and agreement: the verb ending `ava`
# looks back at the subject `grask` (layer 1, head 0), whose gender and number it takes.

# %%
visualize.attention_grid(decoder_self, out_labels, in_labels, title="decoder self-attention")
plt.show()

# %% [markdown]
# ## Try it yourself
#
# * Change `SENTENCE` (any sentence the grammar can parse: the words of
#   `attention_jax.data.toy_translation`) and re-run from "Collect the attention weights".
# * Train a 1-layer model (`config.model.num_layers = 1`, a new `WORKDIR`) or one with
#   `config.model.positional = "none"`: without positions, which pictures change?
# * The same workdir works with the command-line tools:
#   `python experiments/translate.py --workdir=WORKDIR --input=-`.

# %%
# TINY mode (how the tests run this notebook) removes its temporary workdir; a full run keeps
# WORKDIR for the command-line tools and for running the notebook again.
if TINY:
    shutil.rmtree(WORKDIR)
