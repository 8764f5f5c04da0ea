"""sae-diff: what changed inside a language model across fine-tuning iterations, with SAEs."""

__version__ = "0.1.0"
