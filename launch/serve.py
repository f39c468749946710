"""An OpenAI-compatible HTTP server on the serving engine (continuous batching, exact
speculative sampling, streaming).

    python -m launch.serve                                   # the embedded pair, 127.0.0.1:8000
    python -m launch.serve --config=configs/default.py --host=0.0.0.0 --port=8080 \
        --config.engine.num_slots=32 --config.engine.max_len=2048

Endpoints: POST /v1/completions and /v1/chat/completions (`stream: true` for server-sent
events; chat image_url parts for a model with a vision encoder: data: URLs, local files
under --image_dirs, http(s) URLs with serve.fetch_image_urls; Pan & Scan with run.pan_and_scan
or a request's mm_processor_kwargs), GET /v1/models, /health, /metrics (Prometheus). The
model name served is serve.model_name, else the target's (`stdlib_target` for the embedded
pair):

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "stdlib_target", "prompt": "def add(a, b):\n    ", "max_tokens": 32}'

Before serving, the engine compiles and times every K its policy may pick (0, engine.k and
powers of two up to engine.k_max) with every slot busy on the config's prompts
(engine.calibrate) and then runs the K its policy favours, K = 0 when speculation does not pay
(it logs the choice). Settings: configs/common.py, `engine.*` and `serve.*` (the name, an API
key, the queue bound, body and time limits). Compiled programs go to the persistent
compilation cache (run.compile_cache), so a restart loads them.

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
_API_KEY = flags.DEFINE_string("api_key", None, "Clients must send `Authorization: Bearer "
                               "<key>` (default: serve.api_key, else $SPEC_TPU_API_KEY; none: "
                               "no key needed).")


def main(argv):
  del argv  # cli.run refuses positional arguments
  config = _CONFIG.value
  multihost = config.mesh.multihost if _MULTIHOST.value is None else _MULTIHOST.value
  from spec_tpu import compile_cache
  from spec_tpu.serving import server
  cache_dir = compile_cache.use(config.run.compile_cache)  # start-up compiles every K, bucket
  # SetupError, CheckpointError, ...: one line each (cli.run).
  engine, setup = server.ready_engine(config, multihost, _COORDINATOR.value,
                                      _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info("%s", compile_cache.summary(cache_dir))
  import jax
  if jax.process_index() != 0:
    engine.follow()
    return
  import uvicorn
  from spec_tpu.serving import chat, openai_api
  name = server.model_name(config, setup)
  template = chat.load(setup.target.checkpoint)
  limits = server.limits(config, _API_KEY.value)
  engine.start()
  server_app = openai_api.build_app(engine, name, template, limits,
                                    image_dirs=_IMAGE_DIRS.value, **server.images(config))
  print(f"serving {name} on http://{_HOST.value}:{_PORT.value} (K = {engine.k}, "
        f"{engine.num_slots} slots, context {engine.max_len}; chat template: "
        f"{'plain fallback' if template.is_fallback else 'from the checkpoint'}; API key "
        f"{'required' if limits.api_key else 'not required'})", flush=True)
  try:
    uvicorn.run(server_app, host=_HOST.value, port=_PORT.value, log_level="warning")
  finally:
    engine.shutdown()


if __name__ == "__main__":
  cli.run(main)
