"""An OpenAI-compatible HTTP server on the serving engine (continuous batching, exact
speculative sampling, streaming).

    python -m launch.serve                                   # the embedded pair, 127.0.0.1:8000
    python -m launch.serve --config=configs/default.py --host=0.0.0.0 --port=8080 \
        --config.serve.num_slots=32 --config.serve.max_len=2048

Endpoints: POST /v1/completions and /v1/chat/completions (`stream: true` for server-sent
events), GET /v1/models, /health, /metrics (Prometheus). The model name served is
serve.model_name, else the target's (`stdlib_target` for the embedded pair):

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "stdlib_target", "prompt": "def add(a, b):\n    ", "max_tokens": 32}'

Before serving, the engine compiles and times every K its policy may pick (0, sampling.k and
powers of two up to sampling.k_max) with every slot busy on the config's prompts
(serve.calibrate) and then runs the K its policy favours, K = 0 when speculation does not pay
(it logs the choice). Settings: configs/common.py, `serve.*`. Compiled programs go to the
persistent compilation cache (run.compile_cache), so a restart loads them.

Multi-host (--multihost or mesh.multihost): every process loads the models and builds the
engine; process 0 runs the HTTP server and the scheduler and broadcasts each device call;
the other processes run the same calls (Engine.follow) until process 0 stops.
"""

from __future__ import annotations

from absl import flags
from absl import logging

from launch import cli

_CONFIG = cli.define_config_file("config", "configs/default.py", "Setup to serve.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_IMAGE_DIRS = flags.DEFINE_list("image_dirs", [], "Directories chat requests may name local "
                                "image files under (default none: data: URLs only).")
_MULTIHOST = flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize() "
                               "(default: the config's mesh.multihost).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def build_engine(config, multihost: bool = False, coordinator=None, num_processes=None,
                 process_id=None):
  """(engine, tokenizer, setup) from a config: models loaded, engine calibrated, not started."""
  from launch import common
  setup = common.resolve(config, need_weights=True)
  tok = common.load_tokenizer(config, setup)
  s = config.serve
  if int(s.num_slots) < 1 or int(s.max_len) < 2:
    raise common.SetupError(f"serve.num_slots must be >= 1 and serve.max_len >= 2, got "
                            f"{s.num_slots}, {s.max_len}")
  if multihost:
    common.init_distributed(coordinator, num_processes, process_id)
  import jax
  from spec_tpu.serving import Engine, multihost as multihost_lib
  mesh = common.build_mesh(config)
  sampler = common.build_sampler(setup, mesh, eos_id=tok.eos_id if tok else None,
                                 pad_id=tok.pad_id if tok else 0)
  adaptive = bool(s.adaptive_k) and setup.k > 0
  channel = (multihost_lib.Channel(int(s.num_slots)) if jax.process_count() > 1 else None)
  engine = Engine(sampler, num_slots=int(s.num_slots), max_len=int(s.max_len), k=setup.k,
                  k_max=max(setup.k, int(config.sampling.k_max)) if adaptive else setup.k,
                  adaptive_k=adaptive, max_top_k=int(s.max_top_k),
                  rounds_per_step=int(s.rounds_per_step) or None,
                  max_rounds_per_step=int(s.max_rounds_per_step),
                  prefill_rows=int(s.prefill_rows), tokenizer=tok, add_bos=bool(config.run.add_bos),
                  seed=int(config.sampling.seed), channel=channel)
  prompts = None
  if tok is not None and len(config.run.prompts):
    prompts = [tok.encode(p, add_bos=bool(config.run.add_bos)) for p in config.run.prompts]
  if bool(s.calibrate) and (channel is None or channel.is_leader):
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
  return engine, tok, setup


def model_name(config, setup) -> str:
  return str(config.serve.model_name) or setup.target.cfg.name


def main(argv):
  del argv  # cli.run refuses positional arguments
  config = _CONFIG.value
  multihost = config.mesh.multihost if _MULTIHOST.value is None else _MULTIHOST.value
  from launch import common
  cache_dir = common.use_compile_cache(config)  # start-up compiles every K and prompt bucket
  # SetupError, CheckpointError, ...: one line each (cli.run).
  engine, tok, setup = build_engine(config, multihost, _COORDINATOR.value,
                                    _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("%s", common.compile_cache_summary(cache_dir))
  import jax
  if jax.process_index() != 0:
    engine.follow()
    return
  import uvicorn
  from spec_tpu.serving import chat, openai_api
  name = model_name(config, setup)
  template = chat.load(setup.target.checkpoint)
  engine.start()
  server_app = openai_api.build_app(engine, name, template, image_dirs=_IMAGE_DIRS.value)
  print(f"serving {name} on http://{_HOST.value}:{_PORT.value} (K = {engine.k}, "
        f"{engine.num_slots} slots, context {engine.max_len}; chat template: "
        f"{'plain fallback' if template.is_fallback else 'from the checkpoint'})", flush=True)
  try:
    uvicorn.run(server_app, host=_HOST.value, port=_PORT.value, log_level="warning")
  finally:
    engine.shutdown()


if __name__ == "__main__":
  cli.run(main)
