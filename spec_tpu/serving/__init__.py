"""Serving: the continuous-batching engine, its request streams, and the OpenAI-compatible
HTTP front end (openai_api.py, run by launch/serve.py)."""

from spec_tpu.serving.engine import Engine
from spec_tpu.serving.request import Chunk, Completion, GenerationParams, Request, RequestStats

__all__ = ["Engine", "Chunk", "Completion", "GenerationParams", "Request", "RequestStats"]
