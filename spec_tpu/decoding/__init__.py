"""Sampling, the rejection step, the on-device loop and the user-facing sampler."""
