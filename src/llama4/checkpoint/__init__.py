"""Checkpoint formats at the boundary: Hugging Face safetensors (and its key table)."""
