"""The Flax model."""
