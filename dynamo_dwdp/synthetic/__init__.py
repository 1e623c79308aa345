"""Synthetic DeepSeek-V3 checkpoints: presets, random weights, an offline tokenizer (`make-model`)."""
