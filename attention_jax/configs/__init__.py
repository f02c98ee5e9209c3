"""The shipped experiment configs: ml_collections files with a ``get_config()``.

``--config=NAME`` (``default``, ``reversal``, ``wmt14_base``, ``wmt14_big``; the language
models ``lm`` and ``lm1b``) names one of these, wherever the package is installed;
``--config=PATH.py`` is any file. They are package data, so a wheel has them;
experiments/configs/*.py in a clone re-export them.
"""

from __future__ import annotations

import ast
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The shipped configs, e.g. ``['default', 'lm', 'lm1b', 'reversal', 'wmt14_base',
    'wmt14_big']``."""
    return sorted(
        f.removesuffix(".py")
        for f in os.listdir(HERE)
        if f.endswith(".py") and not f.startswith("_")
    )


def path(name: str) -> str:
    """The file of the shipped config `name` (raises ValueError naming the ones there are)."""
    if name not in names():
        raise ValueError(f"no shipped config {name!r}; the shipped ones: {', '.join(names())}")
    return os.path.join(HERE, f"{name}.py")


def summary(name: str) -> str:
    """The first sentence of config `name`'s docstring (read without running the file)."""
    with open(path(name), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph


def resolve(value: str) -> str:
    """``--config``'s value as config_flags wants it: a shipped config's NAME[:ARG] becomes
    its file; a path (anything with a slash or ``.py``, or an existing file) is kept."""
    name, sep, argument = value.partition(":")
    if "/" in name or os.sep in name or name.endswith(".py") or os.path.exists(name):
        return value
    return path(name) + sep + argument
