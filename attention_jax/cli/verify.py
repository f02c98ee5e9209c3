"""Check every checkpoint of a workdir against its digests, without restoring anything.

    attention-jax verify --workdir=W        (or: python experiments/verify.py --workdir=W)

One line per checkpoint, oldest first, on stdout:

    step 8: ok
    step 12: damaged: its file state/ocdbt.process_0/d/... does not match its sha256 digest
    step 4: no digests          (written before checkpoints recorded digests)

Exit status 0 if every checkpoint is ok, 1 otherwise (damaged, no digests, or no
checkpoint at all); a workdir that is not there is one error line, status 1. Nothing is
written or moved: a training run moves a damaged checkpoint aside itself when it resumes.
Reads files only (hashlib): no arrays are restored, nothing runs on an accelerator.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from attention_jax.cli import errors

flags.DEFINE_string("workdir", None, "The workdir whose checkpoints to check.", required=True)

FLAGS = flags.FLAGS
PROG = errors.Program("verify")  # named from argv[0] by run()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = os.path.abspath(FLAGS.workdir)
    if not os.path.isdir(workdir):
        raise errors.CommandError(f"--workdir {FLAGS.workdir}: no such directory")
    # Imported only now: --help, flag errors and a wrong path answer without Orbax.
    from attention_jax.workdir import checkpoints_dir
    from attention_jax.workdir.checkpoint import verify_digests

    directory = checkpoints_dir(workdir)
    steps = (
        sorted(int(n) for n in os.listdir(directory) if n.isdigit())
        if os.path.isdir(directory)
        else []
    )
    if not steps:
        raise errors.CommandError(f"{directory} holds no checkpoint")
    all_ok = True
    for step in steps:
        ok, problem = verify_digests(os.path.join(directory, str(step)))
        print(f"step {step}: " + {True: "ok", None: "no digests"}.get(ok, f"damaged: {problem}"))
        all_ok = all_ok and ok is True
    sys.stdout.flush()
    sys.exit(0 if all_ok else 1)


def run(argv: list[str] | None = None) -> None:
    PROG.run(main, __name__, argv)


if __name__ == "__main__":
    run()
