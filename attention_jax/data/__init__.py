"""Data: sources, tokenizers and pipelines. `synthetic` is the built-in sequence task."""
