"""``attention-jax generate`` (also ``experiments/generate.py``): continue prompts with a
trained language-model workdir.

    attention-jax generate --workdir=/tmp/aj_lm --prompt="the small dog" --max_new_tokens=30
    attention-jax generate --workdir=/tmp/aj_lm --input=prompts.txt --temperature=0
    echo "a red car" | attention-jax generate --workdir=/tmp/aj_lm --num_samples=3 --seed=1

Prints each prompt followed by its continuation, one line per sample (the samples of a
prompt together; line breaks in the generated text become spaces). --temperature=0 is
greedy; otherwise --top_k / --top_p restrict the sampling. Sample s of prompt n (numbered
from 1 in input order) uses its own key from --seed, so the output does not depend on
--batch_size or on how lines arrive.

Prompts: --prompt (repeatable), else one per line of --input or stdin, read as the
translate command reads lines (they end at "\\n" only; a CRLF's CR dropped, other line
breaks spaces, a leading BOM dropped; not UTF-8: an error naming the line). An empty line
is an empty prompt (the model starts from nothing). A prompt over the model's max_len
minus --max_new_tokens tokens stops the run with an error naming it. Output is streamed
and written as translate writes it (a regular --output file replaced atomically at the
end). Nothing in the workdir is written.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from attention_jax.cli import errors

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir", None, "The language model's training --workdir (config, vocabulary, checkpoints)."
)
flags.DEFINE_multi_string("prompt", None, "A prompt; repeat for several (else --input).")
flags.DEFINE_string("input", "-", "A UTF-8 text file, one prompt per line; '-' reads stdin.")
flags.DEFINE_string("output", "-", "Where the lines go, one per sample; '-' is stdout.")
flags.DEFINE_integer("max_new_tokens", 50, "Tokens to generate after each prompt (> 0).")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 = off.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this mass; 1 = off.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("num_samples", 1, "Samples (output lines) per prompt.")
flags.DEFINE_integer("batch_size", 32, "Rows (prompt samples) per decoding batch.")
flags.mark_flags_as_required(["workdir"])

PROG = errors.Program("generate")  # named from argv[0] by run()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    for name, ok, expected in [
        ("max_new_tokens", FLAGS.max_new_tokens > 0, "a positive int"),
        ("temperature", FLAGS.temperature >= 0, ">= 0 (0: greedy)"),
        ("top_k", FLAGS.top_k >= 0, "an int >= 0 (0: off)"),
        ("top_p", 0 < FLAGS.top_p <= 1, "in (0, 1] (1: off)"),
        ("num_samples", FLAGS.num_samples > 0, "a positive int"),
        ("batch_size", FLAGS.batch_size > 0, "a positive int"),
    ]:
        if not ok:
            raise errors.CommandError(f"--{name} must be {expected}, got {FLAGS[name].value}")
    if FLAGS.prompt and FLAGS["input"].present:
        raise errors.CommandError("give --prompt or --input, not both")
    # The library (JAX) is imported only now: --help and flag errors answer without it.
    from attention_jax.workdir.checkpoint import quiet_abandoned_reads

    quiet_abandoned_reads()  # a damaged checkpoint is said in one line, not in screens
    from attention_jax.decode.generator import Generator
    from attention_jax.decode.translator import LineReader, Output, check_text_file, one_line

    prompts = None
    if FLAGS.prompt:
        prompts = []
        for i, prompt in enumerate(FLAGS.prompt):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError:
                raise errors.CommandError(f"--prompt number {i + 1} is not valid UTF-8") from None
            prompts.append(one_line(prompt))
    output = Output(FLAGS.output, "--output")  # before the model is loaded
    if prompts is None and check_text_file(FLAGS.input, "--input") == 0:
        raise errors.CommandError(f"--input {FLAGS.input} holds no prompts")
    generator = Generator.from_workdir(FLAGS.workdir, log=PROG.log)
    options = dict(
        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_k=FLAGS.top_k,
        top_p=FLAGS.top_p, seed=FLAGS.seed, num_samples=FLAGS.num_samples,
        batch_size=FLAGS.batch_size,
    )  # fmt: skip
    per_batch = max(1, FLAGS.batch_size // FLAGS.num_samples)  # prompts per decoding batch
    stream = None
    if prompts is not None:
        where = "--prompt"
    elif FLAGS.input == "-":
        stream, where = sys.stdin.buffer, "--input (stdin)"
    else:
        stream, where = open(FLAGS.input, "rb"), f"--input {FLAGS.input}"
    try:
        if prompts is not None:
            batches = (prompts[i : i + per_batch] for i in range(0, len(prompts), per_batch))
        else:
            reader = LineReader(stream, where)
            batches = reader.batches(per_batch)
        done = 0
        with output.open() as write:
            for batch in batches:
                write(generator.generate(batch, first_line=done + 1, **options))
                done += len(batch)
            if done == 0:
                raise errors.CommandError(f"{where} holds no prompts")
    except BrokenPipeError:  # the reader of stdout went away (| head): stop quietly
        errors.silence_stdout()
        sys.exit(141)
    finally:
        if stream is not None and stream is not sys.stdin.buffer:
            stream.close()


def run(argv: list[str] | None = None) -> None:
    PROG.run(main, __name__, argv)


if __name__ == "__main__":
    run()
