"""A catalogue of malformed inputs outside the pure attention core (that one is
tests/test_bad_inputs_core.py): positional encodings, masks and the params pytree; the
model's config and token arrays; data files (local corpora, SentencePiece vocabularies);
and the four CLIs (flags, config files and overrides, workdirs, input files).

Every case asserts the error type, a message that names the problem (a regex), that
nothing hangs (a deadline per test; subprocesses run with a timeout) and that nothing is
left half-written (the workdir, data_dir or output file is absent or unchanged afterwards).

The CLIs run in-process where they can: the script is imported as a module, its absl flags
are parsed, and its ``main`` is called under ``errors.guarded`` (as the command runs it);
the ``PROG: error: ...`` line it prints is the message. A few real subprocess runs check the
exit code and that stderr holds one line and no traceback.
"""

import contextlib
import importlib.util
import io
import os
import pathlib
import re
import signal
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
from absl import app, flags
from sentencepiece import sentencepiece_model_pb2

import attention_jax as aj
from attention_jax.cli import errors
from attention_jax.data import tasks, toy_translation
from attention_jax.data.tokenizer import Tokenizer
from attention_jax.decode import decoding
from attention_jax.workdir import save_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
FLAGS = flags.FLAGS
DEADLINE_S = 60  # per test: a hang fails the test instead of stalling the suite
# config_flags loads the config file with importlib's deprecated load_module().
LOAD_MODULE_WARNING = "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning"


@pytest.fixture(autouse=True)
def _deadline():
    def expire(signum, frame):
        raise TimeoutError(f"test ran past its {DEADLINE_S} s deadline: something hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _snapshot(path):
    """Every file and folder under `path` with its size and mtime (None: path is absent)."""
    path = pathlib.Path(path)
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


# ---- 1. Pure functions beyond the attention core ----------------------------------------
# (id, fn, args, exception, message regex). Run eagerly and under jax.jit (args traced):
# the checks read only shapes, dtypes and Python values, so both raise the same.

D = 16
PARAMS = aj.init_multi_head_attention(jax.random.key(1), D, 4)  # N = 4, H = 4
X = np.ones((2, 5, D), np.float32)  # [B, T, D]
Q4 = np.ones((2, 3, 2, 4), np.float32)  # [B, T, N, H]
IDS = np.array([[5, 6, 0], [7, 0, 0]], np.int32)  # [B, T]
pe = aj.sinusoidal_positional_encoding
rope = aj.apply_rotary_embedding

PURE_CASES = [
    ("pe-float-positions", lambda p: pe(p, 8), (np.arange(4.0),), TypeError,
     r"length_or_positions must be an int or an integer array.*dtype float"),
    ("pe-odd-d-model", lambda: pe(4, 7), (), ValueError,
     r"d_model must be even \(sine and cosine come in pairs\), got d_model=7"),
    ("pe-negative-length", lambda: pe(-1, 8), (), ValueError, "length must be >= 0, got -1"),
    ("rope-odd-head-dim", lambda x, p: rope(x, p), (Q4[..., :3], np.arange(3)), ValueError,
     r"x must be \[\.\.\., T, N, H\] with H even, got \(2, 3, 2, 3\)"),
    ("rope-float-positions", lambda x, p: rope(x, p), (Q4, np.arange(3.0)),
     TypeError, "positions must be integers, got dtype float"),
    ("rope-positions-length", lambda x, p: rope(x, p), (Q4, np.arange(4)),
     ValueError, r"positions \[\.\.\., T\] must match x \[\.\.\., T, N, H\]"),
    ("causal-zero-length", lambda: aj.causal_mask(0), (), ValueError,
     "length must be a positive Python int, got 0"),
    ("causal-float-kv-length", lambda: aj.causal_mask(3, 4.0), (), ValueError,
     "kv_length must be a positive Python int, got 4.0"),
    ("padding-float-tokens", lambda t: aj.padding_mask(t), (IDS.astype(np.float32),),
     TypeError, "padding_mask: tokens must hold integer ids, got dtype float32"),
    ("padding-kv-batch-mismatch", lambda t, k: aj.padding_mask(t, k), (IDS, IDS[:1]),
     ValueError, r"need the same leading dims, got \(2, 3\) and \(1, 3\)"),
    ("segment-scalar", lambda s: aj.segment_mask(s), (np.int32(1),), ValueError,
     r"segment_ids must be \[\.\.\., length\], got a scalar"),
    ("combine-int-mask", lambda a, b: aj.combine_masks(a, b),
     (np.ones((3, 3), bool), np.ones((3, 3), np.int32)), TypeError,
     "masks must be bool .* mask 1 has dtype int32"),
    ("combine-shapes", lambda a, b: aj.combine_masks(a, b),
     (np.ones((3, 3), bool), np.ones((4, 4), bool)), ValueError,
     r"mask shapes do not broadcast together: \(3, 3\), \(4, 4\)"),
    ("mha-params-none", lambda x: aj.multi_head_attention(None, x, num_heads=4), (X,),
     ValueError, "params must hold 'query'"),
    ("mha-value-kernel-heads",
     lambda p, x: aj.multi_head_attention(p, x, num_heads=4),
     ({**PARAMS, "value": {"kernel": np.ones((D, 2, 8), np.float32)}}, X), ValueError,
     "same number of heads N"),
    ("mha-key-kernel-head-dim",
     lambda p, x: aj.multi_head_attention(p, x, num_heads=4),
     ({**PARAMS, "key": {"kernel": np.ones((D, 4, 2), np.float32)}}, X), ValueError,
     "query and key need the same head dim H"),
]  # fmt: skip


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(("fn", "args", "exc", "match"), [c[1:] for c in PURE_CASES],
                         ids=[c[0] for c in PURE_CASES])  # fmt: skip
def test_pure_function_refuses(fn, args, exc, match, jit):
    with pytest.raises(exc, match=match):
        (jax.jit(fn) if jit else fn)(*args)


def test_causal_mask_refuses_a_traced_length():
    with pytest.raises(ValueError, match=r"length must be a positive Python int, got .*Tracer"):
        jax.jit(aj.causal_mask)(3)


# ---- 2. The model: TransformerConfig fields, token arrays -------------------------------

CONFIG_CASES = [
    ("vocab-zero", dict(vocab_size=0), "vocab_size must be a positive int, got 0"),
    ("vocab-str", dict(vocab_size="100"), "vocab_size must be a positive int, got '100'"),
    ("heads-not-dividing", dict(num_heads=3), "num_heads=3 must divide d_model=32"),
    ("rotary-odd-head-dim", dict(d_model=12, positional="rotary"),
     "rotary positions need an even head dim, got 3"),
    ("dropout-str", dict(dropout_rate="0.1"), r"dropout_rate must be in \[0, 1\), got '0.1'"),
    ("dropout-one", dict(attention_dropout_rate=1.0), r"attention_dropout_rate must be in \[0"),
    ("dtype-unknown", dict(dtype="bogus"), "dtype must be a float dtype .*got 'bogus'"),
    ("dtype-int", dict(param_dtype="int32"), "param_dtype must be a float dtype"),
    ("share-embeddings-str", dict(share_embeddings="False"),
     "share_embeddings must be True or False, got 'False'"),
    ("pre-ln-str", dict(pre_ln="yes"), "pre_ln must be True or False, got 'yes'"),
    ("layer-norm-epsilon-negative", dict(layer_norm_epsilon=-1e-6),
     "layer_norm_epsilon must be > 0, got -1e-06"),
    ("pad-id-float", dict(pad_id=1.5), r"pad_id=1.5 is outside \[0, 64\) \(it must be an int"),
    ("positional-unknown", dict(positional="abs"), "positional must be one of .*got 'abs'"),
    ("activation-unknown", dict(activation="tanh"), "activation must be one of .*got 'tanh'"),
    ("implementation-unknown", dict(attention_implementation="flash"),
     "attention_implementation must be None or one of"),
    ("target-vocab-shared", dict(target_vocab_size=50),
     "share_embeddings=True needs one vocabulary, got vocab_size=64, target_vocab_size=50"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "match"), [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])  # fmt: skip
def test_transformer_config_refuses(overrides, match):
    with pytest.raises(ValueError, match=f"TransformerConfig.*{match}"):
        aj.TransformerConfig.tiny(**overrides)


def test_transformer_config_unknown_field():
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_head'"):
        aj.TransformerConfig.tiny(num_head=4)


CFG = aj.TransformerConfig.tiny(vocab_size=40, max_len=16)
MODEL = aj.Transformer(CFG)
SRC = np.array([[5, 6, 7, 0], [3, 4, 0, 0]], np.int32)  # [B=2, S=4]
TGT = np.array([[8, 9, 2, 0, 0], [4, 5, 6, 1, 0]], np.int32)  # [B=2, T=5]


@pytest.fixture(scope="module")
def variables():
    """Zeros of the right shapes: every case is refused before any computation, and
    eval_shape costs no compilation."""
    shapes = jax.eval_shape(MODEL.init, jax.random.key(0), SRC, TGT)
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# (id, src, tgt, keyword arrays, exception, regex, also under jit)
APPLY_CASES = [
    ("float-inputs", SRC.astype(np.float32), TGT, {}, TypeError,
     r"inputs must be integer token ids \[B, T\], got dtype float32", True),
    ("bool-targets", SRC, TGT > 0, {}, TypeError,
     "targets must be integer token ids .*got dtype bool", True),
    ("inputs-rank-1", SRC[0], TGT, {}, ValueError,
     r"inputs must be \[B, T\] token ids, got shape \(4,\)", True),
    ("targets-rank-3", SRC, TGT[None], {}, ValueError,
     r"targets must be \[B, T\] token ids, got shape \(1, 2, 5\)", True),
    ("targets-longer-than-max-len", SRC, np.ones((2, 17), np.int32), {}, ValueError,
     "targets has length 17 > config.max_len=16", True),
    ("batch-mismatch", SRC, TGT[:1], {}, ValueError,
     r"inputs \(2, 4\) and targets \(1, 5\) need the same batch size", True),
    ("empty-length", np.zeros((2, 0), np.int32), TGT, {}, ValueError,
     r"inputs must be \[B, T\] with B, T >= 1, got shape \(2, 0\)", True),
    ("id-out-of-vocab", SRC, np.where(TGT == 9, 40, TGT), {}, ValueError,
     r"targets holds ids outside \[0, 40\): min 0, max 40", False),
    ("negative-id", np.where(SRC == 5, -1, SRC), TGT, {}, ValueError,
     r"inputs holds ids outside \[0, 40\): min -1", False),
    ("positions-shape", SRC, TGT, {"inputs_positions": np.zeros((2, 3), np.int32)},
     ValueError, r"inputs positions must have the tokens' shape \(2, 4\), got \(2, 3\)", True),
    ("segmentation-without-positions", SRC, TGT,
     {"inputs_segmentation": np.ones((2, 4), np.int32)}, ValueError,
     "segmentation needs positions", True),
]  # fmt: skip


@pytest.mark.parametrize(("src", "tgt", "kwargs", "exc", "match", "under_jit"),
                         [c[1:] for c in APPLY_CASES], ids=[c[0] for c in APPLY_CASES])  # fmt: skip
def test_transformer_apply_refuses(variables, src, tgt, kwargs, exc, match, under_jit):
    with pytest.raises(exc, match=match):
        MODEL.apply(variables, src, tgt, **kwargs)
    if under_jit:  # refused at trace time: no XLA error from deep inside
        with pytest.raises(exc, match=match):
            jax.jit(lambda v, s, t, kw: MODEL.apply(v, s, t, **kw))(variables, src, tgt, kwargs)


def test_transformer_apply_with_params_of_another_config(variables):
    wider = aj.Transformer(CFG.replace(d_model=64))
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"\(40, 64\).*\(40, 32\)"):
        wider.apply(variables, SRC, TGT)


def test_lm_and_decoding_refuse_float_tokens(variables):
    with pytest.raises(TypeError, match="tokens must be integer token ids"):
        aj.TransformerLM(CFG).init(jax.random.key(0), TGT.astype(np.float32))
    with pytest.raises(TypeError, match="inputs must be integer token ids"):
        decoding.translate(MODEL, variables["params"], SRC.astype(np.float32), max_length=8)


# ---- 3. Data files: vocabularies --------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train((f"w{i} v{i % 7} x{i % 13} ." for i in range(400)), 60)


def _truncations(model: bytes) -> dict:
    """Two ways a copy can stop short: mid-field (does not parse), and exactly after the
    last piece (parses, as a smaller vocabulary without its trainer/normalizer specs)."""
    parsed = sentencepiece_model_pb2.ModelProto.FromString(model)
    pieces_only = sentencepiece_model_pb2.ModelProto(pieces=parsed.pieces).SerializeToString()
    assert model.startswith(pieces_only)  # the pieces come first in the file
    return {"mid-field": model[: len(pieces_only) - 3], "after-pieces": pieces_only}


@pytest.mark.parametrize(
    "content, match",
    [
        ("mid-field", r"not a serialized SentencePiece model \(\d+ bytes; .*truncated"),
        ("after-pieces", r"incomplete SentencePiece model .*60 pieces.*the file is truncated"),
        (b"<html>not found</html>\n", r"not a serialized SentencePiece model \(23 bytes"),
        (b"", "expected the bytes of a serialized SentencePiece model, got bytes b''"),
    ],
    ids=["truncated-mid-field", "truncated-after-pieces", "html-page", "empty"],
)
def test_corrupt_vocabulary_file(tmp_path, tokenizer, content, match):
    path = tmp_path / "vocab.model"
    path.write_bytes(_truncations(tokenizer.model_proto).get(content, content))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: {match}"):
        Tokenizer.load(path)


def test_missing_vocabulary_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model does not exist; expected a Sentence"):
        Tokenizer.load(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="is a directory, not a SentencePiece model"):
        Tokenizer.load(tmp_path)


def _default_config(**model):
    spec = importlib.util.spec_from_file_location("default_config", CONFIGS / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.update(model)
    return config


def test_vocabulary_size_differs_from_config_when_training(tmp_path, tokenizer):
    """config.data.vocab_path of 60 pieces with model.vocab_size=80: refused before the
    file becomes the workdir's copy (which every later run would reuse)."""
    config = _default_config(vocab_size=80)
    config.data.vocab_path = str(tokenizer.save(tmp_path / "given.model"))
    workdir = tmp_path / "run"
    workdir.mkdir()
    with pytest.raises(ValueError, match=r"given.model has 60 pieces but config.model.vocab_size"
                       r" is 80; set vocab_size=60 or another config.data.vocab_path"):  # fmt: skip
        tasks.load_or_train_vocabulary(config, str(workdir), train_source=[])
    assert _snapshot(workdir) == {}


# ---- 4. Data files: local corpora, through prepare_data.py ------------------------------


@contextlib.contextmanager
def _script(name):
    """experiments/<name>.py imported as a module with its flags defined on absl's FLAGS,
    removed again afterwards (the scripts define flags of the same names)."""
    before, path = set(FLAGS), list(sys.path)
    module_name = f"cli_{name.removesuffix('.py')}"
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "experiments" / name)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        # The wrappers run attention_jax.cli.<command>: its main and parse_flags.
        yield sys.modules.get(f"attention_jax.cli.{name.removesuffix('.py')}", module)
    finally:
        FLAGS.unparse_flags()
        for flag in set(FLAGS) - before:  # also the --config.* flags config_flags adds
            delattr(FLAGS, flag)
        sys.path[:] = path
        # The scripts import attention_jax.cli.<command>, which defines the flags: imported
        # afresh next time, so that it defines them again.
        for loaded in [m for m in sys.modules if m.startswith("attention_jax.cli.")]:
            if loaded != "attention_jax.cli.errors":
                del sys.modules[loaded]


def _run_main(name, *args, monkeypatch):
    """Parses `args` as the script's flags and runs its main as the command does
    (errors.guarded); returns the message it exits with: the ``PROG: error: ...`` line it
    printed, or a SystemExit's message ("None" if it returned). Usage errors are raised."""
    argv = [name, *map(str, args)]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    stderr, code = io.StringIO(), None  # None: main returned (the run succeeded)
    with _script(name) as module:
        parse = getattr(module, "parse_flags", FLAGS)
        try:
            with contextlib.redirect_stderr(stderr):
                errors.guarded(module.main, name)(parse(argv))
        except SystemExit as e:
            code = e.code
    if code == 1 and stderr.getvalue():
        return stderr.getvalue().strip()
    return str(code)


@pytest.fixture
def corpus(tmp_path):
    pairs = toy_translation.load_split("train", sizes=(20, 0, 0))
    (tmp_path / "a.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (tmp_path / "a.de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    (tmp_path / "short.de").write_text("".join(t + "\n" for _, t in pairs[:19]))
    (tmp_path / "empty.en").write_bytes(b"")
    (tmp_path / "latin1.de").write_bytes(b"".join(t.encode() + b"\n" for _, t in pairs[:19]))
    with open(tmp_path / "latin1.de", "ab") as f:
        f.write("Gr\u00fc\u00dfe\n".encode("latin-1"))  # line 20: not UTF-8
    (tmp_path / "three.tsv").write_text("a\tA\nb\tB\textra\n", encoding="utf-8")
    (tmp_path / "good.tsv").write_text("a\tA\nb\tB\n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    return tmp_path


CORPUS_CASES = [
    ("missing-file", "a.en,nope.de", r"target file \S*nope.de does not exist"),
    ("line-counts-differ", "a.en,short.de",
     r"source file \S*a.en has 20 lines but target file \S*short.de has 19"),
    ("empty-file", "empty.en,a.de", r"split 'test': \S*empty.en is empty"),
    ("not-utf8", "a.en,latin1.de",
     r"latin1.de, line 20: not valid UTF-8 \(invalid"),
    ("tsv-columns", "three.tsv",
     r"three.tsv, line 2: expected 2 tab-separated columns \(source, target\), found 3"),
    ("folder-not-file", "folder", r"TSV file \S*folder is a directory, not a file"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "match"), [c[1:] for c in CORPUS_CASES],
                         ids=[c[0] for c in CORPUS_CASES])  # fmt: skip
def test_prepare_data_refuses_bad_corpus(corpus, files, match, monkeypatch):
    monkeypatch.chdir(corpus)
    args = ["--dataset=local", "--name=my_corpus", "--data_dir=data", "--vocab_size=50"]
    # A good train split first: the bad split must stop it from being written too.
    message = _run_main("prepare_data.py", *args, "--train=good.tsv", f"--test={files}",
                        monkeypatch=monkeypatch)  # fmt: skip
    assert re.match(f"prepare_data.py: error: .*{match}", message), message
    assert not (corpus / "data").exists()


# ---- 5. The CLIs, in-process ------------------------------------------------------------


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, tokenizer):
    """Workdirs that translate.py / evaluate.py refuse: no checkpoint, no vocabulary, a
    vocabulary of another size, a config.json that is not JSON."""
    root = tmp_path_factory.mktemp("workdirs")
    for name, vocab_size, vocab in [("no_ckpt", 60, True), ("no_vocab", 60, False),
                                    ("other_size", 80, True)]:  # fmt: skip
        (root / name).mkdir()
        save_config(_default_config(vocab_size=vocab_size), str(root / name))
        if vocab:
            tokenizer.save(root / name / "vocab.model")
    (root / "bad_json").mkdir()
    (root / "bad_json" / "config.json").write_text("{'model': {}}\n")
    (root / "in.txt").write_text("the small dog sees a red car .\n")
    (root / "latin1.txt").write_bytes("the dog .\nd\u00e9j\u00e0 vu\n".encode("latin-1"))
    return root


TRAIN = ["--config", CONFIGS / "reversal.py"]


@pytest.mark.filterwarnings(LOAD_MODULE_WARNING)
@pytest.mark.parametrize(
    "args, match",
    [
        (["--bogus=1"], "Unknown command line flag 'bogus'"),
        (["--num_processes=two"], "flag --num_processes=two: invalid literal for int"),
        (["--noworkdir"], r"--workdir is required \(or --dry_run, --list_configs\)"),
        (["--config=nope/default.py"], "--config=nope/default.py: no such file"),
        (["--config.model.num_head=4"],
         r"--config.model.num_head=4: config.model has no field 'num_head' .*its fields: "
         r".*d_ff, d_model, .*num_heads"),
        (["--config.modle.d_model=4"], "config has no field 'modle'"),
        (["--config.num_train_steps=1.5"],
         r"flag --config.num_train_steps=1.5: invalid literal for int\(\)"),
    ],
    ids=["unknown-flag", "bad-flag-value", "missing-workdir", "config-file-missing",
         "override-unknown-field", "override-unknown-section", "override-wrong-type"],
)  # fmt: skip
def test_train_cli_flags(tmp_path, monkeypatch, args, match):
    workdir = tmp_path / "run"
    workdir_flag = [] if "--noworkdir" in args else [f"--workdir={workdir}"]
    args = [a for a in args if a != "--noworkdir"]
    message = _run_main("train.py", *TRAIN, *workdir_flag, *args, monkeypatch=monkeypatch)
    assert message.startswith("FATAL Flags parsing error: ") and re.search(match, message)
    assert not workdir.exists()


@pytest.mark.filterwarnings(LOAD_MODULE_WARNING)
def test_train_cli_config_with_syntax_error(tmp_path, monkeypatch):
    config = tmp_path / "broken.py"
    config.write_text("import ml_collections\n\ndef get_config(:\n    pass\n")
    args = ["--config", config, f"--workdir={tmp_path / 'run'}", "--config.seed=1"]
    message = _run_main("train.py", *args, monkeypatch=monkeypatch)
    assert re.search(r"--config=\S*broken.py, line 3: syntax error", message), message
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings(LOAD_MODULE_WARNING)
@pytest.mark.parametrize(
    "override, match",
    [
        ("--config.model.num_heads=3",
         r"TransformerConfig: num_heads=3 must divide d_model=64 \(head dim"),
        ("--config.model.dtype=float64",
         "config.model.dtype must be one of .*got 'float64'"),
        ("--config.log_every=0", "config.log_every must be a positive int, got 0"),
        ("--config.checkpoint_every=-5", "config.checkpoint_every must be a positive int"),
        ("--config.data.max_len=40",
         r"config.data.max_len must be <= config.model.max_len - 1 = 31 .*got 40"),
        ("--config.mesh.data=3", "config.mesh: mesh .* needs 3 devices, but 8 are available"),
    ],
    ids=["num-heads-not-dividing", "dtype", "log-every-zero", "checkpoint-every-negative",
         "data-longer-than-model", "mesh"],
)  # fmt: skip
def test_train_cli_bad_config_value(tmp_path, monkeypatch, override, match):
    """Refused before the workdir is created (train_and_evaluate would make it first, and
    meet `log_every=0` as a ZeroDivisionError after a training step)."""
    workdir = tmp_path / "run"
    message = _run_main("train.py", *TRAIN, f"--workdir={workdir}", override,
                        monkeypatch=monkeypatch)  # fmt: skip
    assert re.match(f"train.py: error: {match}", message), message
    assert not workdir.exists()


# Operational stops of a training run (issue 14: each printed a traceback; disk full was
# line 1,086 of 1,918): one line "train.py: error: ...", status 1, the workdir as it was.
TINY = ["--config.model.d_model=32", "--config.model.d_ff=64", "--config.batch_size=8",
        "--config.log_every=1", "--config.eval_batches=1",
        "--config.checkpoint_every=1"]  # fmt: skip


def _train(workdir, *args, monkeypatch):
    return _run_main("train.py", *TRAIN, f"--workdir={workdir}", *TINY, *args,
                     monkeypatch=monkeypatch)  # fmt: skip


@pytest.mark.filterwarnings(LOAD_MODULE_WARNING)
def test_train_cli_operational_errors_are_one_line(tmp_path, monkeypatch):
    work = tmp_path / "run"
    assert _train(work, "--config.num_train_steps=2", monkeypatch=monkeypatch) == "None"

    def data(path):  # the lock file only says which run held the workdir last
        return {k: v for k, v in _snapshot(path).items() if k != "train.lock"}

    before = data(work)

    # A workdir of another model: the differing fields, on the one line.
    message = _train(work, "--config.num_train_steps=3", "--config.model.d_ff=32",
                     monkeypatch=monkeypatch)  # fmt: skip
    assert re.fullmatch(r"train.py: error: workdir \S+ holds a checkpoint of a different model "
                        r"\(step 2\): d_ff: checkpoint 64, config 32; use a new --workdir.*",
                        message), message  # fmt: skip
    assert data(work) == before

    # The model diverges: NaN stop, naming the step and the newest checkpoint.
    message = _train(tmp_path / "nan", "--config.num_train_steps=4", "--config.lr_factor=1e33",
                     monkeypatch=monkeypatch)  # fmt: skip
    assert re.fullmatch(r"train.py: error: step \d: the loss or a gradient is NaN/Inf; training "
                        r"stopped .*the newest checkpoint is step \d.*",
                        message), message  # fmt: skip

    # Every checkpoint damaged: moved aside, and the run says so.
    for path in (work / "checkpoints").rglob("*"):
        if path.is_file() and "meta" not in path.parts:
            path.write_bytes(b"garbage")
    message = _train(work, "--config.num_train_steps=3", monkeypatch=monkeypatch)
    assert re.fullmatch(r"train.py: error: no checkpoint in \S+ reads back whole.*", message), (
        message
    )

    # A dataset that is not prepared: the command that prepares a local corpus.
    message = _run_main("train.py", "--config", CONFIGS / "default.py", f"--workdir={work}x",
                        "--config.data.dataset=my_corpus",
                        f"--config.data.data_dir={tmp_path / 'data'}",
                        monkeypatch=monkeypatch)  # fmt: skip
    assert re.fullmatch(
        r"train.py: error: dataset 'my_corpus' is not prepared in \S+data .*"
        r"prepare it with: python -m attention_jax prepare --dataset=local "
        r"--name=my_corpus --train=SOURCE_FILE,TARGET_FILE .*",
        message,
    ), message
    assert not (tmp_path / "runx").exists()

    # A workdir that cannot be created (under a file).
    (tmp_path / "file").write_text("")
    message = _train(tmp_path / "file" / "run", "--config.num_train_steps=1",
                     monkeypatch=monkeypatch)  # fmt: skip
    assert re.fullmatch(r"train.py: error: workdir \S+ cannot be created .*", message), message


@pytest.mark.filterwarnings(LOAD_MODULE_WARNING)
def test_train_cli_disk_full_is_one_line(tmp_path, monkeypatch):
    """A full disk met deep inside a library (here: wrapped, as Orbax's save thread does)."""
    import errno

    from attention_jax.train import loop as train_loop

    def full(config, workdir):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", f"{workdir}/metrics.jsonl")
        except OSError as e:
            raise RuntimeError("a library's own wrapper") from e

    monkeypatch.setattr(train_loop, "train_and_evaluate", full)
    message = _train(tmp_path / "run", monkeypatch=monkeypatch)
    assert re.fullmatch(
        r"train.py: error: disk full writing \S+/run/metrics.jsonl: free some "
        r"space \(nothing half-written was kept\)",
        message,
    ), message


@pytest.mark.filterwarnings(LOAD_MODULE_WARNING)
def test_train_cli_dry_run_and_list(tmp_path, monkeypatch, capsys):
    with _script("train.py") as module:
        argv = ["train.py", "--config=reversal", "--dry_run", "--config.model.pre_ln=True"]
        monkeypatch.setattr(sys, "argv", argv)
        module.main(module.parse_flags(argv))
        out = capsys.readouterr().out
        assert '"lr_factor": 0.5' in out and "  pre_ln: True" in out and "  d_model: 64" in out
    with _script("train.py") as module:
        argv = ["train.py", "--list_configs"]
        monkeypatch.setattr(sys, "argv", argv)
        module.main(module.parse_flags(argv))
        out = capsys.readouterr().out
        assert re.search(r"^wmt14_base +The paper's base model", out, re.M), out


def _translate(workdirs, name, *args, monkeypatch):
    workdir = workdirs / name
    before = _snapshot(workdir)
    message = _run_main("translate.py", f"--workdir={workdir}", *args, monkeypatch=monkeypatch)
    assert _snapshot(workdir) == before  # translate.py never writes to the workdir
    return message


@pytest.mark.parametrize(
    "workdir, args, match",
    [
        ("no_ckpt", [], r"\S*no_ckpt/checkpoints holds no checkpoint: train first"),
        ("no_vocab", [], r"\S*no_vocab/vocab.model does not exist: this workdir has no vocab"),
        ("other_size", [],
         r"\S*vocab.model has 60 pieces but the model in \S*config.json has vocab_size=80"),
        ("bad_json", [], r"\S*bad_json/config.json is not a valid config JSON file \(Expecting"),
        ("missing", [], r"\S*missing/config.json does not exist: is .* the --workdir of a"),
        ("no_ckpt", ["--input={root}/latin1.txt"],
         r"--input \S*latin1.txt, line 2: not valid UTF-8"),
        ("no_ckpt", ["--input={root}/nope.txt"], r"--input \S*nope.txt does not exist"),
        ("no_ckpt", ["--output={root}/no/such/folder/out.txt"],
         r"--output \S*out.txt: the folder \S*/no/such/folder does not exist"),
    ],
    ids=["no-checkpoint", "no-vocabulary", "vocab-size-differs", "config-not-json",
         "no-workdir", "input-not-utf8", "input-missing", "output-folder-missing"],
)  # fmt: skip
def test_translate_cli_refuses(workdirs, monkeypatch, workdir, args, match):
    out = workdirs / "out.txt"
    args = [a.format(root=workdirs) for a in args]
    if not any(a.startswith("--input") for a in args):
        args.append(f"--input={workdirs / 'in.txt'}")
    if not any(a.startswith("--output") for a in args):
        args.append(f"--output={out}")
    message = _translate(workdirs, workdir, *args, monkeypatch=monkeypatch)
    # (errors.describe names the type of an OSError: "FileNotFoundError: ...")
    assert re.fullmatch(f"translate.py: error: (?:\\w+Error: )?{match}.*", message), message
    assert not out.exists() and not (workdirs / "out.txt.tmp").exists()


def test_evaluate_cli_refuses(workdirs, monkeypatch):
    workdir, before = workdirs / "no_ckpt", _snapshot(workdirs / "no_ckpt")
    source = workdirs / "in.txt"
    message = _run_main("evaluate.py", f"--workdir={workdir}", f"--source={source}",
                        f"--reference={workdirs / 'ref.txt'}", monkeypatch=monkeypatch)  # fmt: skip
    assert re.fullmatch(
        r"evaluate.py: error: (?:\w+Error: )?--reference \S*ref.txt does not exist", message
    ), message
    with pytest.raises(app.UsageError, match="give both --source and --reference, or neither"):
        _run_main("evaluate.py", f"--workdir={workdir}", f"--source={source}",
                  monkeypatch=monkeypatch)  # fmt: skip
    (workdirs / "two.txt").write_text("a .\nb .\n")
    message = _run_main("evaluate.py", f"--workdir={workdir}", f"--source={source}",
                        f"--reference={workdirs / 'two.txt'}", monkeypatch=monkeypatch)  # fmt: skip
    assert re.match(r"evaluate.py: error: --source .*has 1 lines but --reference .*has 2", message)
    assert _snapshot(workdir) == before


# ---- 6. The CLIs as real processes: exit code, one line on stderr, no traceback ---------


def _cli(script, *args, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def _one_line_failure(result, pattern):
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, result.stderr), result.stderr


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--bogus"], r"FATAL Flags parsing error: Unknown command line flag 'bogus'"),
        (["--config.model.foo=3"], r"FATAL Flags parsing error: --config.model.foo=3: "
                                   r"config.model has no field 'foo'"),
        (["--config.model.num_heads=3"], r"^train.py: error: TransformerConfig: num_heads=3 "
                                         r"must divide d_model=64 .*\n$"),
    ],
    ids=["unknown-flag", "override-unknown-field", "num-heads-not-dividing"],
)  # fmt: skip
def test_train_cli_process(tmp_path, args, pattern):
    _one_line_failure(_cli("train.py", *TRAIN, f"--workdir={tmp_path / 'run'}", *args), pattern)
    assert not (tmp_path / "run").exists()


def test_translate_and_evaluate_cli_processes(workdirs, tmp_path):
    workdir, before = workdirs / "no_ckpt", _snapshot(workdirs / "no_ckpt")
    result = _cli("translate.py", f"--workdir={workdir}", f"--input={workdirs / 'in.txt'}",
                  f"--output={tmp_path / 'out.txt'}")  # fmt: skip
    _one_line_failure(
        result, r"^translate.py: error: (?:\w+Error: )?\S*checkpoints holds no checkpoint"
    )
    result = _cli("evaluate.py", f"--workdir={workdir}", f"--source={workdirs / 'in.txt'}",
                  f"--reference={tmp_path / 'nope.de'}")  # fmt: skip
    _one_line_failure(
        result, r"^evaluate.py: error: (?:\w+Error: )?--reference \S*nope.de does not exist\n$"
    )
    assert _snapshot(workdir) == before and not (tmp_path / "out.txt").exists()


# ---- 7. Gaps this catalogue found and that were then closed --------------------------

GAPS: list = [
    ("pe-max-timescale-zero", lambda: pe(4, 8, max_timescale=0.0), ValueError,
     r"max_timescale must be > 1, got 0.0"),
    ("rope-int-x", lambda: rope(np.ones((2, 3, 2, 4), np.int32), np.arange(3)), TypeError,
     r"x must be a floating-point array, got dtype int32"),
    ("mha-bias-shape", lambda: aj.multi_head_attention(
        {**PARAMS, "query": {**PARAMS["query"], "bias": np.zeros(3, np.float32)}}, X,
        num_heads=4), ValueError, r"params\['query'\]\['bias'\] must have shape \(4, 4\)"),
    ("causal-float-offset", lambda: aj.causal_mask(3, offset=0.5), TypeError,
     r"offset must be an int, got 0.5"),
]  # fmt: skip


@pytest.mark.parametrize("fn,exc,match", [pytest.param(*c[1:], id=c[0]) for c in GAPS])
def test_closed_gap_raises_a_clear_error(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_case_ids_are_unique():
    for cases in (PURE_CASES, CONFIG_CASES, APPLY_CASES, CORPUS_CASES, GAPS):
        ids = [c[0] for c in cases]
        assert len(ids) == len(set(ids))
