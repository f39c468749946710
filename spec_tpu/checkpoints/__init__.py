"""Orbax checkpoints with an integrity manifest; conversion from HF safetensors."""
