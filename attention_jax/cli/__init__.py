"""Command-line tools, installed with the package.

    attention-jax train --config=default --workdir=W      (or: python -m attention_jax train ...)
    attention-jax translate --workdir=W --input=in.txt
    attention-jax generate --workdir=W --prompt="the small dog"
    attention-jax evaluate --workdir=W
    attention-jax prepare --dataset=...

Each subcommand is a module here with an absl ``main``; ``experiments/*.py`` are thin
examples that call the same modules. Only the chosen subcommand's module is imported, so
each keeps its own absl flags.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("attention_jax.cli.train", "train a model in a workdir (resumes)"),
    "translate": ("attention_jax.cli.translate", "translate text with a trained workdir"),
    "generate": ("attention_jax.cli.generate", "continue prompts with a language-model workdir"),
    "evaluate": (
        "attention_jax.cli.evaluate",
        "BLEU / chrF of a translation workdir; perplexity, bits per byte of an LM",
    ),
    "prepare": ("attention_jax.cli.prepare_data", "prepare a dataset and its vocabulary"),
}


def _usage() -> str:
    lines = ["usage: attention-jax COMMAND [--flags]   (COMMAND --help for its flags)", ""]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The ``attention-jax`` console script: dispatch to a subcommand's ``run``."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        sys.exit(f"attention-jax: unknown command {command!r}\n{_usage()}")
    module = importlib.import_module(COMMANDS[command][0])
    module.run([f"attention-jax {command}", *argv[2:]])
