"""launch.serve's engine, ready to serve: built from a config, compiled, and calibrated."""

from __future__ import annotations

import os

from absl import logging

from spec_tpu import distributed, setup as setup_lib


def ready_engine(config, multihost: bool = False, coordinator=None, num_processes=None,
                 process_id=None):
  """(engine, setup) from a config: models loaded, every K the policy may pick compiled and
  timed on the config's prompts (engine.calibrate), else the first requests' programs compiled;
  not started. multihost: join the job (distributed.init) once the config is checked."""
  setup = setup_lib.resolve(config, need_weights=True)
  settings = setup_lib.engine_settings(config)
  limits(config)  # the serve section's mistakes fail before anything loads
  images(config)
  tok = setup_lib.load_tokenizer(config, setup)
  if multihost:
    distributed.init(coordinator, num_processes, process_id)
  import jax
  from spec_tpu.serving import multihost as multihost_lib
  pair = setup_lib.build_pair(setup, setup_lib.build_mesh(config), tokenizer=tok)
  channel = (multihost_lib.Channel(settings.num_slots) if jax.process_count() > 1 else None)
  engine = setup_lib.build_engine(pair, settings, add_bos=bool(config.run.add_bos),
                                  seed=int(config.sampling.seed), channel=channel,
                                  max_queue=int(config.serve.max_queue) or None)
  prompts = None
  if tok is not None and len(config.run.prompts):
    prompts = [tok.encode(p, add_bos=bool(config.run.add_bos)) for p in config.run.prompts]
  if settings.calibrate and (channel is None or channel.is_leader):
    report = engine.calibrate(prompts)
    times = {int(key[len("round_s_k"):]): v for key, v in report.items()
             if key.startswith("round_s_k")}
    speedups = report.get("expected_speedup") or {}
    logging.info("calibration: a round takes %s (%s); a = %s; expected speedup %s; K = %d",
                 ", ".join(f"K={k}: {v * 1e3:.2f} ms" for k, v in times.items()),
                 report["clock"], report["a"],
                 ", ".join(f"K={k}: {v:.2f}" for k, v in speedups.items()), report["chosen_k"])
  else:  # compile what the first requests need before accepting them
    engine.warm_up([engine.k], [len(p) for p in prompts or []])
  return engine, setup


def model_name(config, setup) -> str:
  return str(config.serve.model_name) or setup.target.cfg.name


def limits(config, api_key: str | None = None):
  """The HTTP front end's protections from config.serve (api_key: a --api_key flag's value;
  else serve.api_key, else $SPEC_TPU_API_KEY); raises SetupError on a negative bound."""
  from spec_tpu.serving import openai_api
  s = config.serve
  for name in ("max_queue", "max_body_bytes", "request_timeout_s"):
    if float(s[name]) < 0:
      raise setup_lib.SetupError(f"serve.{name} must be >= 0 (0 = no limit), got {s[name]}")
  return openai_api.Limits(
      api_key=api_key or str(s.api_key) or os.environ.get("SPEC_TPU_API_KEY") or None,
      max_body_bytes=int(s.max_body_bytes) or None,
      request_timeout_s=float(s.request_timeout_s) or None)


def images(config) -> dict:
  """build_app's image options from the config: fetch (serve.fetch_image_urls, its limits and
  whether private hosts are fetched from; else None) and pan_and_scan (run.pan_and_scan);
  raises SetupError on a bad limit."""
  from spec_tpu.serving import image_urls
  s = config.serve
  fetch = None
  if bool(s.fetch_image_urls):
    try:
      fetch = image_urls.Fetch(float(s.fetch_timeout_s), int(s.fetch_max_bytes),
                               bool(s.fetch_private_hosts))
    except ValueError as e:
      raise setup_lib.SetupError(f"serve.fetch_timeout_s and serve.fetch_max_bytes: {e}") \
          from None
  return dict(fetch=fetch, pan_and_scan=bool(config.run.pan_and_scan))
