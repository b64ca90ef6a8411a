"""Checkpoint formats at the boundary: Hugging Face safetensors (`hf`, `vision_keys`) and Meta's
params.json + consolidated.*.pth (`meta`); `io` holds `load` and `save`."""
