"""An LSTM encoder-decoder without attention vs the Transformer, at matched parameter count.

Section 1 of the article this project starts from says recurrent models compute "timestep by
timestep" and "fail when inputs are too long". This script measures both claims on the two
models the paper compares, side by side in one process:

  LSTM      `LSTMSeq2Seq` below: a shared embedding, L `nn.OptimizedLSTMCell` layers scanned
            over time (`nn.scan`) as the encoder, L more as the decoder, a Dense to the
            vocabulary. The decoder starts from the encoder's final (c, h) of each layer and
            that state is the only thing it sees of the source (Sutskever et al., 2014, the
            sequence model without attention). Its width H is chosen so that its parameter
            count is the closest to the Transformer's (printed; must be within
            --param_tolerance).
  Transformer  `attention_jax.Transformer` (encoder-decoder, post-LN, sinusoids, shared
            embeddings), `TransformerConfig.tiny` with --d_model, --num_heads, --num_layers,
            --d_ff; no dropout.

Both train with the same step: teacher forcing, cross-entropy (no label smoothing), gradient
clipping at 1, Adam with linear warm-up then cosine decay; the step is `jax.jit`-compiled
(loss + grad + optax update).

(a) Train-step time vs length T (--time_lengths): one batch of --time_batch random sequences,
    source and target both T tokens; each step function is compiled ahead
    (``.lower().compile()``) and run once, then the two models are timed round-robin
    (--time_repeats calls each, median; every call blocks until ready). Reported: ms/step,
    target tokens/s, and the LSTM / Transformer time ratio.

(b) Accuracy on a long-range task as T grows (--task_lengths): copy. The source is T tokens
    drawn uniformly from 1..V-1 (0 is padding and the decoder's start token); the target is
    the same T tokens. The answer at target position t is the source token t, T positions back
    in the stream, and as the tokens are independent the earlier target tokens (teacher
    forcing) say nothing about it: everything has to come through the encoder (for the LSTM,
    through its final state: T·log2(V-1) bits in 2·L·H floats). Each model trains for
    --train_steps steps of --batch_size fresh random examples (the same batches for both),
    and is scored on --eval_examples held-out examples (another seeded stream): token
    accuracy (argmax under teacher forcing, which is the generous measure: no errors
    compound) and sequence accuracy (all T tokens right). Chance is 1/(V-1).

Outputs under --out_dir: results.json (every number, the settings and the machine; rewritten
after each section) and rnn_vs_transformer.png (time vs T and accuracy vs T). --tiny runs
tiny models at T in {8, 16} for a few steps (mostly compiling; the test uses it); flags
given explicitly override it.

--from_json redraws the PNG and reprints the tables from a results.json without measuring.

The committed results (BUILD_NOTES.md, which records the machine and the run time;
docs/rnn_vs_transformer.json, docs/images/rnn_vs_transformer.png) come from:

  python experiments/rnn_vs_transformer.py --out_dir=/tmp/rnn_vs_transformer
  cp /tmp/rnn_vs_transformer/results.json docs/rnn_vs_transformer.json
  python experiments/rnn_vs_transformer.py --from_json=docs/rnn_vs_transformer.json \\
      --out_dir=docs/images
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import attention_jax as aj
from attention_jax.data.tokenizer import PAD_ID  # padding and the decoder's start, both models
from attention_jax.train.losses import smoothed_cross_entropy

# --------------------------------------------------------------------------------------
# Settings.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run depends on (the flags of the same names)."""

    seed: int = 0  # model init and data keys derive from it
    vocab_size: int = 16  # V: ids 1..V-1 are symbols, 0 is padding / start
    d_model: int = 64  # Transformer D (the LSTM's width H is matched to its parameter count)
    num_heads: int = 4  # Transformer N
    num_layers: int = 2  # Transformer L (encoder and decoder)
    d_ff: int = 128  # Transformer F
    lstm_layers: int = 2  # stacked LSTM layers in the encoder and in the decoder
    param_tolerance: float = 0.1  # |LSTM - Transformer| / Transformer parameters at most this
    time_lengths: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)  # (a) T
    time_batch: int = 16  # (a) sequences per step
    time_repeats: int = 5  # (a) timed calls per model and T (median)
    task_lengths: tuple[int, ...] = (8, 16, 32, 64, 128)  # (b) T
    train_steps: int = 1000  # (b) steps per model and T
    batch_size: int = 16  # (b) examples per step (= time_batch: (a) and (b) share compiles)
    learning_rate: float = 3e-3  # peak Adam rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 10% of the peak
    eval_examples: int = 512  # (b) held-out examples per T

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values = value if isinstance(value, tuple) else (value,)
            may_be_zero = field.name in ("seed", "warmup_steps", "param_tolerance")
            if not values or any(v < 0 or (v == 0 and not may_be_zero) for v in values):
                wanted = ">= 0" if may_be_zero else "> 0"
                wanted += " (a non-empty list)" if isinstance(value, tuple) else ""
                raise ValueError(f"--{field.name} must be {wanted}, got {value}")
        if self.vocab_size < 3:
            raise ValueError(
                f"--vocab_size must be >= 3 (padding + 2 symbols), got {self.vocab_size}"
            )
        if self.param_tolerance >= 1:
            raise ValueError(f"--param_tolerance is a fraction < 1, got {self.param_tolerance}")

    @classmethod
    def tiny(cls, **overrides) -> Settings:
        """Tiny models, T in {8, 16}, a few steps: seconds on a CPU."""
        preset = dict(
            d_model=16, num_heads=2, num_layers=1, d_ff=32, lstm_layers=1,
            time_lengths=(8, 16), time_batch=8, time_repeats=2,
            task_lengths=(8, 16), train_steps=20, batch_size=8, warmup_steps=5,
            eval_examples=64,
        )  # fmt: skip
        return cls(**{**preset, **overrides})

    def transformer_config(self) -> aj.TransformerConfig:
        return aj.TransformerConfig.tiny(
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            num_heads=self.num_heads,
            num_layers=self.num_layers,
            d_ff=self.d_ff,
            dropout_rate=0.0,
            max_len=max(*self.time_lengths, *self.task_lengths),
        )


# --------------------------------------------------------------------------------------
# The LSTM encoder-decoder without attention.
# --------------------------------------------------------------------------------------


class LSTMLayer(nn.Module):
    """One LSTM layer run over time with `nn.scan`: the recurrence is sequential by
    construction, step t needs the state of step t - 1."""

    hidden: int  # H

    @nn.compact
    def __call__(self, carry, x):
        """carry (c, h) each [B, H], x [B, T, E] -> (final carry, outputs [B, T, H])."""
        scan = nn.scan(
            nn.OptimizedLSTMCell,
            variable_broadcast="params",  # one set of weights for every step
            split_rngs={"params": False},
            in_axes=1,  # time is axis 1 of x
            out_axes=1,
        )
        return scan(self.hidden, name="cell")(carry, x)


class LSTMSeq2Seq(nn.Module):
    """Encoder-decoder LSTM without attention (Sutskever et al., 2014).

    ``apply(vars, inputs [B, S], targets [B, T])`` -> logits ``[B, T, V]``, teacher forcing
    like `attention_jax.Transformer` (the decoder reads ``shift_right(targets)``). ``encode``
    returns only the final (c, h) of each layer, ``[B, H]`` each, and ``decode`` starts from
    it: that state is the decoder's whole view of the source.
    """

    vocab_size: int  # V
    hidden: int  # H: embedding width and LSTM state width
    num_layers: int = 1  # L encoder layers and L decoder layers

    def setup(self):
        self.embed = nn.Embed(self.vocab_size, self.hidden)  # shared by source and target
        self.encoder = [LSTMLayer(self.hidden) for _ in range(self.num_layers)]
        self.decoder = [LSTMLayer(self.hidden) for _ in range(self.num_layers)]
        self.logits = nn.Dense(self.vocab_size)

    def encode(self, inputs):
        """inputs [B, S] -> a tuple of L final carries (c, h), each [B, H]."""
        x = self.embed(inputs)  # [B, S, H]
        zeros = jnp.zeros((inputs.shape[0], self.hidden), x.dtype)  # [B, H]
        state = []
        for layer in self.encoder:
            carry, x = layer((zeros, zeros), x)  # x: [B, S, H], the next layer's input
            state.append(carry)
        return tuple(state)

    def decode(self, state, decoder_inputs):
        """state (from `encode`), decoder_inputs [B, T] (already shifted) -> logits [B, T, V]."""
        y = self.embed(decoder_inputs)  # [B, T, H]
        for layer, carry in zip(self.decoder, state, strict=True):
            _, y = layer(carry, y)  # [B, T, H]
        return self.logits(y)  # [B, T, V]

    def __call__(self, inputs, targets):
        return self.decode(self.encode(inputs), aj.shift_right(targets, PAD_ID))


def count_params(model: nn.Module, length: int = 4) -> int:
    """Parameters of an encoder-decoder `model` (abstract init: nothing is allocated)."""
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens, tokens)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def match_lstm(target: int, vocab_size: int, num_layers: int) -> LSTMSeq2Seq:
    """The `LSTMSeq2Seq` whose parameter count is the closest to `target` (bisection on H;
    the count grows with H)."""
    count = functools.lru_cache(
        lambda h: count_params(LSTMSeq2Seq(vocab_size, h, num_layers))
    )  # fmt: skip
    low, high = 1, 2
    while count(high) < target:
        low, high = high, 2 * high
    while high - low > 1:  # invariant: count(low) < target <= count(high)
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < target else (low, mid)
    best = min((low, high), key=lambda h: abs(count(h) - target))
    return LSTMSeq2Seq(vocab_size, best, num_layers)


def make_models(settings: Settings) -> dict[str, nn.Module]:
    """{'lstm': ..., 'transformer': ...} at matched parameter count (raises if not within
    the tolerance)."""
    transformer = aj.Transformer(settings.transformer_config())
    target = count_params(transformer)
    lstm = match_lstm(target, settings.vocab_size, settings.lstm_layers)
    gap = abs(count_params(lstm) - target) / target
    if gap > settings.param_tolerance:
        raise ValueError(
            f"LSTM parameters differ from the Transformer's by {gap:.1%} > "
            f"{settings.param_tolerance:.0%}: change --lstm_layers or the Transformer's size"
        )
    return {"lstm": lstm, "transformer": transformer}


# --------------------------------------------------------------------------------------
# The shared training step.
# --------------------------------------------------------------------------------------


def make_optimizer(settings: Settings) -> optax.GradientTransformation:
    """Clip at global norm 1, Adam; linear warm-up, cosine decay to 10% over train_steps."""
    warmup = min(settings.warmup_steps, settings.train_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        settings.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(settings.train_steps, warmup + 1),
        end_value=0.1 * settings.learning_rate,
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def train_step(model, optimizer, params, opt_state, inputs, targets):
    """One step of teacher-forced cross-entropy: (params, opt_state, loss)."""

    def loss_fn(p):
        logits = model.apply({"params": p}, inputs, targets)  # [B, T, V]
        return smoothed_cross_entropy(logits, targets, label_smoothing=0.0, pad_id=PAD_ID)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


class Stepper:
    """One model's jitted `train_step`, compiled ahead (``.lower().compile()``) once per
    batch shape, so no timed or training call compiles; (a) and (b) share the executables
    where their shapes agree."""

    def __init__(self, model: nn.Module, optimizer: optax.GradientTransformation):
        self.model = model
        self.optimizer = optimizer
        self.apply = jax.jit(model.apply)  # for evaluation

        def init(key, tokens):  # jitted: one compile instead of many eager ops
            params = nn.unbox(model.init(key, tokens, tokens)["params"])
            return params, optimizer.init(params)

        self.init = jax.jit(init)
        self._jitted = jax.jit(functools.partial(train_step, model, optimizer))
        self._compiled = {}

    def compiled(self, params, opt_state, inputs, targets):
        shape = (inputs.shape, targets.shape)
        if shape not in self._compiled:
            self._compiled[shape] = self._jitted.lower(params, opt_state, inputs, targets).compile()
        return self._compiled[shape]

    def __call__(self, params, opt_state, inputs, targets):
        return self.compiled(params, opt_state, inputs, targets)(params, opt_state, inputs, targets)


def make_steppers(settings: Settings, models: dict) -> dict[str, Stepper]:
    optimizer = make_optimizer(settings)  # one schedule for (a) and (b)
    return {name: Stepper(model, optimizer) for name, model in models.items()}


def init_state(stepper: Stepper, key, length: int = 4):
    """(params, Adam state) of a fresh model."""
    return stepper.init(key, jnp.ones((1, length), jnp.int32))


def random_tokens(rng: np.random.Generator, batch: int, length: int, vocab_size: int):
    """[B, T] ids uniform in 1..V-1 (never the padding id)."""
    return jnp.asarray(rng.integers(1, vocab_size, size=(batch, length), dtype=np.int32))


# --------------------------------------------------------------------------------------
# (a) Step time vs T.
# --------------------------------------------------------------------------------------


def time_train_steps(settings: Settings, steppers: dict, log=print) -> list[dict]:
    """ms/step of both models at each T, timed round-robin; one row per T."""
    states = {
        name: init_state(stepper, jax.random.key(settings.seed))
        for name, stepper in steppers.items()
    }
    rows = []
    for T in settings.time_lengths:
        rng = np.random.default_rng([settings.seed, T, 2])
        tokens = random_tokens(rng, settings.time_batch, T, settings.vocab_size)
        calls = {}
        for name, stepper in steppers.items():
            args = (*states[name], tokens, tokens)
            calls[name] = functools.partial(stepper.compiled(*args), *args)
            jax.block_until_ready(calls[name]())  # the first call allocates; not timed
        times = {name: [] for name in steppers}
        for _ in range(settings.time_repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                jax.block_until_ready(call())
                times[name].append(time.perf_counter() - start)
        row = {"T": T, "batch": settings.time_batch}
        for name in steppers:
            seconds = statistics.median(times[name])
            row[f"{name}_ms"] = 1e3 * seconds
            row[f"{name}_tokens_per_s"] = settings.time_batch * T / seconds
        row["lstm_over_transformer"] = row["lstm_ms"] / row["transformer_ms"]
        rows.append(row)
        log(
            f"  (a) T={T:5d}: LSTM {row['lstm_ms']:9.1f} ms, Transformer "
            f"{row['transformer_ms']:9.1f} ms, ratio {row['lstm_over_transformer']:.2f}"
        )
    return rows


# --------------------------------------------------------------------------------------
# (b) Copy accuracy vs T.
# --------------------------------------------------------------------------------------


def copy_accuracy(stepper: Stepper, params, tokens) -> dict:
    """Teacher-forced token and sequence accuracy of copying `tokens` [B, T]."""
    logits = stepper.apply({"params": params}, tokens, tokens)  # [B, T, V]
    right = np.asarray(jnp.argmax(logits, axis=-1) == tokens)  # [B, T]
    return {"token_accuracy": float(right.mean()), "sequence_accuracy": float(right.all(-1).mean())}


def train_copy(settings: Settings, stepper: Stepper, length: int, log=print) -> dict:
    """Trains a fresh model on copy at `length` for settings.train_steps steps; held-out
    scores. Every model sees the same batches (the generator is seeded by seed and T)."""
    params, opt_state = init_state(stepper, jax.random.key(settings.seed + 1))
    train_rng = np.random.default_rng([settings.seed, length, 0])
    start = time.perf_counter()
    losses = []
    every = max(settings.train_steps // 4, 1)
    for i in range(settings.train_steps):
        tokens = random_tokens(train_rng, settings.batch_size, length, settings.vocab_size)
        params, opt_state, loss = stepper(params, opt_state, tokens, tokens)
        if (i + 1) % every == 0 or i + 1 == settings.train_steps:
            losses.append(float(loss))
            log(f"      step {i + 1:5d}  loss {losses[-1]:.3f}")
    eval_rng = np.random.default_rng([settings.seed, length, 1])  # held out: another stream
    held_out = random_tokens(eval_rng, settings.eval_examples, length, settings.vocab_size)
    return {
        **copy_accuracy(stepper, params, held_out),
        "final_loss": losses[-1],
        "train_seconds": time.perf_counter() - start,
    }


def copy_task(settings: Settings, steppers: dict, log=print) -> list[dict]:
    """Both models trained and scored at each T of settings.task_lengths; one row per T."""
    rows = []
    for T in settings.task_lengths:
        row = {"T": T, "chance": 1.0 / (settings.vocab_size - 1)}
        for name, stepper in steppers.items():
            log(f"  (b) T={T}: {name}")
            for key, value in train_copy(settings, stepper, T, log).items():
                row[f"{name}_{key}"] = value
        rows.append(row)
        log(
            f"  (b) T={T:4d}: token accuracy LSTM {row['lstm_token_accuracy']:.3f}, "
            f"Transformer {row['transformer_token_accuracy']:.3f}"
        )
    return rows


# --------------------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------------------


def machine() -> dict:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine slows every time
    }


def timing_table(rows: list[dict]) -> str:
    lines = [
        "| T | LSTM ms/step | Transformer ms/step | LSTM tokens/s | Transformer tokens/s "
        "| LSTM / Transformer time |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['lstm_ms']:.1f} | {r['transformer_ms']:.1f} "
            f"| {r['lstm_tokens_per_s']:,.0f} | {r['transformer_tokens_per_s']:,.0f} "
            f"| {r['lstm_over_transformer']:.2f} |"
        )
    return "\n".join(lines)


def accuracy_table(rows: list[dict]) -> str:
    lines = [
        "| T | LSTM token acc. | Transformer token acc. | LSTM seq. acc. "
        "| Transformer seq. acc. | LSTM loss | Transformer loss |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['lstm_token_accuracy']:.3f} | {r['transformer_token_accuracy']:.3f} "
            f"| {r['lstm_sequence_accuracy']:.3f} | {r['transformer_sequence_accuracy']:.3f} "
            f"| {r['lstm_final_loss']:.3f} | {r['transformer_final_loss']:.3f} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Two panels: train-step time vs T (log-log) and copy accuracy vs T."""
    import matplotlib  # only the plot needs it (slow to import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"lstm": "LSTM enc-dec (no attention)", "transformer": "Transformer"}
    styles = {
        "lstm": dict(color="tab:orange", marker="o"),
        "transformer": dict(color="tab:blue", marker="s"),
    }
    params = results["params"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    timing = results["timing"]
    for name in labels:
        left.plot(
            [r["T"] for r in timing], [r[f"{name}_ms"] for r in timing],
            label=f"{labels[name]}, {params[name]:,} params", **styles[name],
        )  # fmt: skip
    left.set(
        xscale="log", yscale="log", xlabel="sequence length T (source = target)",
        ylabel="ms per train step (median)",
        title=f"(a) train step, batch {results['settings']['time_batch']}, "
        f"{results['machine']['cpu_count']}-core {results['machine']['platform'].upper()}",
    )  # fmt: skip
    left.set_xticks([r["T"] for r in timing], [str(r["T"]) for r in timing])
    left.legend(fontsize=8)
    copy = results["accuracy"]
    Ts = [r["T"] for r in copy]
    for name in labels:
        right.plot(
            Ts, [r[f"{name}_token_accuracy"] for r in copy], label=f"{labels[name]}: tokens",
            **styles[name],
        )  # fmt: skip
        right.plot(
            Ts, [r[f"{name}_sequence_accuracy"] for r in copy], linestyle="--",
            label=f"{labels[name]}: whole sequence", alpha=0.6, **styles[name],
        )  # fmt: skip
    right.axhline(copy[0]["chance"], color="gray", linestyle=":", label="chance (tokens)")
    right.set(
        xscale="log", ylim=(-0.03, 1.03), xlabel="copy length T",
        ylabel="held-out accuracy (teacher forcing)",
        title=f"(b) copy task, {results['settings']['train_steps']} steps each",
    )  # fmt: skip
    right.set_xticks(Ts, [str(t) for t in Ts])
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_json(results: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)  # never a half-written file


def run(settings: Settings, out_dir: str, log=print) -> dict:
    """Both measurements; writes results.json and rnn_vs_transformer.png under `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "results.json")
    models = make_models(settings)
    params = {name: count_params(model) for name, model in models.items()}
    results = {
        "settings": dataclasses.asdict(settings),
        "machine": machine(),
        "params": params,
        "lstm_hidden": models["lstm"].hidden,
    }
    log(
        f"parameters: LSTM {params['lstm']:,} (H={models['lstm'].hidden}, "
        f"{settings.lstm_layers}+{settings.lstm_layers} layers), Transformer "
        f"{params['transformer']:,} (D={settings.d_model}, L={settings.num_layers}); "
        f"gap {abs(params['lstm'] - params['transformer']) / params['transformer']:.1%}"
    )
    log(f"machine: {results['machine']}")
    start = time.perf_counter()
    steppers = make_steppers(settings, models)
    results["timing"] = time_train_steps(settings, steppers, log)
    results["timing_seconds"] = time.perf_counter() - start
    results["load_average_1min_after_timing"] = os.getloadavg()[0]
    write_json(results, json_path)
    start = time.perf_counter()
    results["accuracy"] = copy_task(settings, steppers, log)
    results["accuracy_seconds"] = time.perf_counter() - start
    results["load_average_1min_after_accuracy"] = os.getloadavg()[0]
    write_json(results, json_path)
    report(results, out_dir, log)
    return results


def report(results: dict, out_dir: str, log=print) -> None:
    """The PNG under `out_dir` and the two tables, from `results` (as results.json holds)."""
    os.makedirs(out_dir, exist_ok=True)
    plot(results, os.path.join(out_dir, "rnn_vs_transformer.png"))
    log("\n(a) train-step time\n" + timing_table(results["timing"]))
    log("\n(b) copy accuracy (held out)\n" + accuracy_table(results["accuracy"]))


# --------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "/tmp/rnn_vs_transformer", "results.json and the PNG go here.")
flags.DEFINE_bool("tiny", False, "Tiny models, T in {8, 16}, a few steps (explicit flags win).")
flags.DEFINE_string(
    "from_json",
    None,
    "Measure nothing: redraw the PNG (into --out_dir) and reprint the tables "
    "from this results.json.",
)
_DEFAULTS = Settings()
for _field in dataclasses.fields(Settings):
    _default = getattr(_DEFAULTS, _field.name)
    _help = f"See Settings.{_field.name}."
    if isinstance(_default, tuple):
        flags.DEFINE_list(_field.name, [str(x) for x in _default], _help)
    elif isinstance(_default, float):
        flags.DEFINE_float(_field.name, _default, _help)
    else:
        flags.DEFINE_integer(_field.name, _default, _help)


def settings_from_flags() -> Settings:
    """Settings() or Settings.tiny() with the flags given on the command line."""
    given = {}
    for field in dataclasses.fields(Settings):
        if FLAGS[field.name].present:
            value = FLAGS[field.name].value
            given[field.name] = tuple(int(x) for x in value) if isinstance(value, list) else value
    return Settings.tiny(**given) if FLAGS.tiny else Settings(**given)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.from_json:
        with open(FLAGS.from_json) as f:
            report(json.load(f), FLAGS.out_dir)
        return
    try:
        settings = settings_from_flags()
    except ValueError as error:  # a bad flag value: say which, without a traceback
        raise app.UsageError(str(error)) from None
    run(settings, FLAGS.out_dir)


if __name__ == "__main__":
    app.run(main)
