# ---
# jupyter:
#   accelerator: TPU
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator
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
# # 04 · The base model on WMT 2014 English→German, on a Colab TPU
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/attention-jax/attention_jax/blob/main/notebooks/04_colab_tpu.ipynb)
#
# The paper's main experiment: the base Transformer (6 layers, d_model 512, 8 heads,
# 63M parameters) trained on WMT 2014 English→German with ~25,000 source and 25,000 target
# tokens per step, then scored with sacreBLEU on newstest2014 using beam search (beam 4,
# length penalty 0.6) over the average of the last 5 checkpoints. The paper reached
# 27.3 BLEU after 100,000 steps (12 hours on 8 P100 GPUs).
#
# **Set-up.** *Runtime → Change runtime type → TPU* (any TPU type: `jax.devices()` below
# lists its chips), then *Run all*. Checkpoints go to your Google Drive, so the run
# survives the end of a Colab session: when the runtime is reset, run the notebook again
# and training continues from the last checkpoint. 100,000 steps take several sessions.
#
# With `ATTENTION_JAX_TINY=1` (as the tests run it) the same cells run on a laptop CPU in
# under a minute: the built-in toy corpus instead of WMT14, a tiny model, a few steps, a
# temporary workdir, and the resume shown by training twice.

# %%
# On Colab: install the package, and fetch the repository for experiments/ (configs, scripts).
# The runtime's jax, jaxlib and libtpu are built for its accelerator and are kept as they are:
# a constraints file pins each to the version installed, so pip installs only what works with
# them and never upgrades them (if the runtime's JAX is older than the package needs, pip
# stops with a conflict naming both versions instead of breaking the TPU runtime).
# ruff: noqa: E402  (the imports below follow this install cell, as notebooks need)
import os
import subprocess
import sys
import tempfile
from importlib import metadata

REPO = "https://github.com/attention-jax/attention_jax"
RUNTIME_JAX = ("jax", "jaxlib", "libtpu", "libtpu-nightly")  # never upgraded here
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    pins = []
    for name in RUNTIME_JAX:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    keep = os.path.join(tempfile.mkdtemp(), "keep_runtime_jax.txt")
    with open(keep, "w") as f:
        f.write("\n".join(pins) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--constraint", keep,
         f"attention_jax[notebooks] @ git+{REPO}"],
        check=True,
    )  # fmt: skip
    if not os.path.isdir("/content/attention_jax"):
        subprocess.run(
            ["git", "clone", "-q", "--depth=1", REPO, "/content/attention_jax"], check=True
        )

# %%
import importlib.util
import pathlib
import shutil
import tempfile

import jax

import attention_jax
from attention_jax.data import toy_translation
from attention_jax.data.tasks import load_eval_pairs
from attention_jax.decode import metrics
from attention_jax.decode.translator import Translator
from attention_jax.nn import sharding
from attention_jax.train.loop import train_and_evaluate
from attention_jax.workdir.checkpoint import Checkpointer

# TINY: the toy corpus, a tiny model and a few steps on CPU, in a temporary workdir.
TINY = os.environ.get("ATTENTION_JAX_TINY", "0") == "1"


def find_repo_root() -> pathlib.Path:
    """The checkout holding experiments/ (here, above the notebook, or Colab's clone)."""
    here = pathlib.Path.cwd().resolve()
    package = pathlib.Path(attention_jax.__file__).resolve().parents[1]
    for root in (here, *here.parents, package, pathlib.Path("/content/attention_jax")):
        if (root / "experiments" / "configs" / "default.py").is_file():
            return root
    raise FileNotFoundError("experiments/ not found: run from a checkout of " + REPO)


def load_config(name: str):
    """`get_config()` of experiments/configs/<name>.py (an ml_collections ConfigDict)."""
    path = ROOT / "experiments" / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run(*args: str) -> None:
    """Runs a command, printing its output here as it comes (not in the kernel's log)."""
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        for line in process.stdout:
            print(line, end="")
    if process.returncode:
        raise RuntimeError(f"{args[1] if len(args) > 1 else args[0]} failed: see above")


ROOT = find_repo_root()

# %% [markdown]
# ## The devices
#
# On a Colab TPU runtime JAX sees one device per TPU core or chip (8 on a v2-8, 1 on a
# v5e-1). The training step is one `jax.jit`-compiled function over a device mesh: each
# batch is split along the `data` axis across all devices and the gradients are averaged
# by XLA, with no code for it here.

# %%
devices = jax.devices()
print(f"{len(devices)} × {devices[0].device_kind} ({devices[0].platform}); TINY={TINY}")
if not TINY and devices[0].platform != "tpu":
    print("No TPU: Runtime → Change runtime type → TPU (a GPU works too, only slower).")

# %% [markdown]
# ## Where the run lives
#
# The **workdir** holds the Orbax checkpoints, the vocabulary, `config.json` and
# `metrics.jsonl`. It must outlive the Colab VM, so by default it is on Google Drive
# (mounted at `/content/drive`; Colab asks for permission). Anything mounted as a
# directory works the same, e.g. a Cloud Storage bucket mounted with `gcsfuse` on a Cloud
# TPU VM. Five checkpoints of the base model (parameters and Adam state) take about 4 GB.
#
# The prepared dataset (~1.7 GB of downloads, then array_record files) is also kept on
# Drive, and copied to the VM's disk at the start of each session: training reads it by
# random access, which is slow through Drive.

# %%
if TINY:
    TMP = pathlib.Path(tempfile.mkdtemp(prefix="attention_jax_04_"))  # nothing goes to the repo
    os.environ["TMPDIR"] = str(TMP)  # the tools' temporary files too (removed at the end)
    WORKDIR, DATA_DIR, LOCAL_DATA_DIR = str(TMP / "run"), str(TMP / "tfds"), str(TMP / "tfds")
elif IN_COLAB:
    from google.colab import drive

    drive.mount("/content/drive")
    DRIVE = "/content/drive/MyDrive/attention_jax"
    WORKDIR = f"{DRIVE}/wmt14_base"
    DATA_DIR = f"{DRIVE}/tensorflow_datasets"  # prepared once, kept
    LOCAL_DATA_DIR = "/content/tensorflow_datasets"  # this session's fast copy
else:  # a TPU VM, a GPU box: local disks, TFDS's default data directory
    WORKDIR = os.path.expanduser("~/attention_jax/wmt14_base")
    DATA_DIR = LOCAL_DATA_DIR = os.environ.get(
        "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")
    )
print(f"workdir: {WORKDIR}\ndata:    {DATA_DIR}")

# %% [markdown]
# ## Prepare the data
#
# `experiments/prepare_data.py` downloads WMT14 en-de from statmt.org (train: Europarl,
# CommonCrawl and News Commentary, 4.5M pairs; validation: newstest2013; test:
# newstest2014), writes it as TFDS array_record files, and trains the shared
# 37,000-piece BPE vocabulary on the training split. The first time this takes a while
# (an hour or more on Colab's CPU); afterwards it finds the prepared dataset and returns.
# In TINY mode it prepares a small slice of the toy corpus from text files, the way you
# would prepare your own parallel corpus.

# %%
if TINY:
    DATASET = "toy_tiny"
    files = toy_translation.write_split_files(TMP / "text", sizes=(2000, 64, 64))
    run(
        sys.executable, str(ROOT / "experiments" / "prepare_data.py"), "--dataset=local",
        f"--name={DATASET}", f"--data_dir={DATA_DIR}", "--vocab_size=300",
        *(f"--{split}={src},{tgt}" for split, (src, tgt) in files.items()),
    )  # fmt: skip
else:
    DATASET = "wmt14_translate/de-en"
    run(
        sys.executable, str(ROOT / "experiments" / "prepare_data.py"), f"--dataset={DATASET}",
        f"--data_dir={DATA_DIR}",
    )  # fmt: skip
    if LOCAL_DATA_DIR != DATA_DIR and not os.path.isdir(f"{LOCAL_DATA_DIR}/{DATASET}"):
        print(f"copying the prepared {DATASET} to {LOCAL_DATA_DIR} ...", flush=True)
        partial = f"{LOCAL_DATA_DIR}/{DATASET}.partial"  # an interrupted copy is not used
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(f"{DATA_DIR}/{DATASET}", partial)
        os.replace(partial, f"{LOCAL_DATA_DIR}/{DATASET}")

# %% [markdown]
# ## The experiment
#
# `experiments/configs/wmt14_base.py` holds the paper's settings, each field commented:
# the base model computing in bfloat16, Adam (0.9, 0.98, 1e-9) with 4,000 warmup steps,
# dropout and label smoothing 0.1, 25,000 tokens per side per step, a checkpoint every
# 2,000 steps, the last 5 kept. Change fields here before training (e.g. a smaller
# `num_train_steps`, or `accum_steps` to reach 25,000 tokens per step on fewer devices).
# A resumed run must keep the model fields it started with.

# %%
config = load_config("wmt14_base")
config.data.data_dir = LOCAL_DATA_DIR
if TINY:
    config.model.update(
        vocab_size=300, d_model=32, num_heads=4, num_layers=1, d_ff=64, max_len=64, dtype="float32"
    )
    config.data.update(
        dataset=DATASET, tokens_per_batch=640, max_length=40, eval_examples=16,
        eval_batch_size=16, workers=0, prefetch=0,
    )  # fmt: skip
    config.update(
        num_train_steps=6, warmup_steps=10, log_every=3, eval_every=1000, checkpoint_every=3,
        beam_size=2,
    )  # fmt: skip
mesh = sharding.make_mesh(**config.mesh)
print(f"mesh {dict(mesh.shape)}; {config.num_train_steps} steps; workdir {WORKDIR}")

# %% [markdown]
# ## Train (and resume)
#
# `train_and_evaluate` is what `experiments/train.py` runs: parameters and optimizer state
# are created already sharded over the mesh, each step is the jitted, sharded train step,
# and every `checkpoint_every` steps Orbax writes the state **and the data iterator's
# position** to `WORKDIR/checkpoints`. At the end it scores newstest2014 with beam search.
#
# **When the Colab runtime is reset** (sessions end after some hours, or when idle), run
# the notebook again from the top: Drive is mounted, the data step finds the prepared
# dataset, and this cell finds the last checkpoint and continues from it ("resumed from
# step N" below), reading exactly the batches an uninterrupted run would have read. The
# progress bar shows the loss, tokens/s, MFU and the time left.


# %%
def latest_step(workdir: str):
    """The step of the newest complete checkpoint in `workdir`, or None."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        return None
    checkpointer = Checkpointer(workdir)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


print(f"latest checkpoint: {latest_step(WORKDIR)} (None: a new run)")
final = train_and_evaluate(config, WORKDIR)

# %% [markdown]
# In TINY mode we play the runtime reset: the run above stopped at its last step; asking
# for more steps with the same workdir starts from that checkpoint, not from step 0.

# %%
if TINY:
    config.num_train_steps *= 2
    print(f"latest checkpoint: {latest_step(WORKDIR)}")
    final = train_and_evaluate(config, WORKDIR)  # prints "resumed from step 6"
    assert latest_step(WORKDIR) == config.num_train_steps

# %% [markdown]
# ## Score: sacreBLEU with beam search
#
# As in the paper: the parameters averaged over the last 5 checkpoints, beam 4, length
# penalty α = 0.6, outputs at most input length + 50 tokens, and sacreBLEU on detokenized,
# case-sensitive text (the comparable number; its signature is printed). This is what
# `python experiments/evaluate.py --workdir=WORKDIR --average_last=5` does.

# %%
translator = Translator.from_workdir(WORKDIR, average_last=2 if TINY else 5)
sources, references = load_eval_pairs(config, "test")  # newstest2014: 3,003 sentences
if TINY:
    sources, references = sources[:16], references[:16]
hypotheses = translator.translate(
    sources, beam_size=config.beam_size, alpha=config.alpha, batch_size=16 if TINY else 64
)
bleu, bleu_signature = metrics.bleu(hypotheses, references)
chrf, chrf_signature = metrics.chrf(hypotheses, references)
print(f"checkpoints {translator.steps}, {len(sources)} sentences")
print(f"BLEU {bleu:.2f}  ({bleu_signature})\nchrF {chrf:.2f}  ({chrf_signature})")
for source, reference, output in list(zip(sources, references, hypotheses, strict=True))[:3]:
    print(f"\nEN   {source}\nREF  {reference}\nOUT  {output}")

# %% [markdown]
# The paper's base model reached 27.3 BLEU on newstest2014 after 100,000 steps; a run cut
# short scores lower, and the score climbs with every session you add. In TINY mode the
# numbers mean nothing: a tiny model trained for a dozen steps.
#
# Next: `experiments/configs/wmt14_big.py` is the big model (213M parameters, 300,000
# steps: 28.4 BLEU in the paper), and notebook 03 shows how to look at the attention of a
# trained workdir like this one.

# %%
# TINY mode (how the tests run this notebook) removes its temporary workdir and data; a real
# run keeps both for the next session.
if TINY:
    shutil.rmtree(TMP)
