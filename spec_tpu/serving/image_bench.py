"""What images cost a request: the vision encoder's time per image and the time to first token
with 0, 1, 4, ... images in the prompt, through the serving engine.

    rows = measure(engine, prompt, counts=(0, 1, 4), repeats=3)
    print(format_table(rows))

Per image count n (one request at a time, the engine otherwise idle): the encoder alone (its
compiled program over the request's encoded images in one call, as the engine's insert runs
it), and the time to first token of a request whose prompt holds the n images' blocks: from
submit (the images already decoded and resized) to its first token, i.e. encoding, the prefill
of the laid-out prompt and the first sample. Each figure is the fastest of `repeats` timed runs
after an untimed one that compiles; wall time and this process's CPU time (on a shared CPU,
what other processes do not inflate).

The images are random: square, of the encoder's size; with Pan & Scan (pan_and_scan: its words
as ids) wide instead, 16:9 and at least 512 pixels high, which Pan & Scan reads as the original
and 2 crops, so each costs 3 encoded images and 3 blocks.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spec_tpu.models import model
from spec_tpu.models.vision import image as image_lib, prompt as image_prompt
from spec_tpu.serving.request import GenerationParams


def _timed(fn, repeats: int) -> tuple[float, float]:
  """(wall, CPU) seconds of the fastest of `repeats` calls after one untimed call."""
  fn()
  best = (float("inf"), float("inf"))
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
  return best


def _images(n: int, size: int, seed: int, wide: bool = False) -> list[np.ndarray]:
  """n random RGB images (uint8, as decoded files are): of the encoder's size, or wide ones
  Pan & Scan crops (16:9, at least 512 high)."""
  rng = np.random.default_rng(seed)
  h = max(size, 512) if wide else size
  return [rng.integers(0, 256, (h, h * 16 // 9 if wide else h, 3), dtype=np.uint8)
          for _ in range(n)]


def bench_request(prompt: Sequence[int], n: int, vision, seed: int = 0, pan_and_scan=None):
  """(token ids, images, laid-out ids, encoded images) of the benchmark's request with n
  images after `prompt`."""
  tokens = list(prompt) + [vision.start_id] * n
  images = _images(n, vision.image_size, seed + n, wide=pan_and_scan is not None)
  ids, views = image_prompt.lay_out(tokens, images, vision, crop_text=pan_and_scan)
  return tokens, images, ids, views


def measure(engine, prompt: Sequence[int], counts: Sequence[int] = (0, 1, 4),
            repeats: int = 3, seed: int = 0, pan_and_scan=None) -> list[dict]:
  """One row per image count: the n images' start_of_image tokens follow `prompt` (token ids,
  none of them an image-block id); the engine must be idle and not running its own thread.
  pan_and_scan: None, or Pan & Scan's words as ids (Engine.submit's)."""
  vision = engine.pair.vision()
  block_ids = {vision.start_id, vision.end_id, vision.newline_id, vision.image_id}
  if block_ids & set(prompt):
    raise ValueError("the prompt holds an image-block token id: image places are added here")
  cfg, params = engine.pair.target_cfg, engine.pair.target_params
  encode = jax.jit(lambda p, x: model.encode_images(p, cfg, x))
  rows = []
  for n in counts:
    tokens, images, ids, views = bench_request(prompt, n, vision, seed, pan_and_scan)
    row = dict(images=n, encoded_images=len(views), prompt_tokens=len(ids))
    if n:
      pixels = jnp.asarray(np.stack([image_lib.prepare(v, vision.image_size) for v in views]))
      wall, cpu = _timed(lambda: jax.block_until_ready(encode(params, pixels)), repeats)
      row.update(encode_s=wall, encode_cpu_s=cpu, encode_s_per_image=wall / len(views))
    else:
      row.update(encode_s=0.0, encode_cpu_s=0.0, encode_s_per_image=float("nan"))
    firsts = []

    def first_token():
      request = engine.submit(tokens, GenerationParams(max_new_tokens=1, seed=seed),
                              images=images or None, pan_and_scan=pan_and_scan)
      while engine.step():
        pass
      firsts.append(request.result().stats.time_to_first_token_s)

    _, cpu = _timed(first_token, repeats)
    row.update(ttft_s=min(firsts[1:]), ttft_cpu_s=cpu)
    rows.append(row)
  return rows


def format_table(rows: Sequence[dict]) -> str:
  ms = lambda s: "n/a" if s != s else f"{s * 1e3:.2f}"  # noqa: E731 - NaN: no image
  head = ("images", "encoded", "prompt tokens", "encode ms", "encode ms/image",
          "encode CPU ms", "TTFT ms", "TTFT CPU ms")
  lines = [head] + [(str(r["images"]), str(r["encoded_images"]), str(r["prompt_tokens"]),
                     ms(r["encode_s"]), ms(r["encode_s_per_image"]), ms(r["encode_cpu_s"]),
                     ms(r["ttft_s"]), ms(r["ttft_cpu_s"])) for r in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
