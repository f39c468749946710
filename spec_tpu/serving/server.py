"""launch.serve's engine, ready to serve: built from a config, compiled, and calibrated."""

from __future__ import annotations

from absl import logging

from spec_tpu import distributed, setup as setup_lib


def ready_engine(config, multihost: bool = False, coordinator=None, num_processes=None,
                 process_id=None):
  """(engine, setup) from a config: models loaded, every K the policy may pick compiled and
  timed on the config's prompts (engine.calibrate), else the first requests' programs compiled;
  not started. multihost: join the job (distributed.init) once the config is checked."""
  setup = setup_lib.resolve(config, need_weights=True)
  settings = setup_lib.engine_settings(config)
  tok = setup_lib.load_tokenizer(config, setup)
  if multihost:
    distributed.init(coordinator, num_processes, process_id)
  import jax
  from spec_tpu.serving import multihost as multihost_lib
  pair = setup_lib.build_pair(setup, setup_lib.build_mesh(config), tokenizer=tok)
  channel = (multihost_lib.Channel(settings.num_slots) if jax.process_count() > 1 else None)
  engine = setup_lib.build_engine(pair, settings, add_bos=bool(config.run.add_bos),
                                  seed=int(config.sampling.seed), channel=channel)
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
