"""Will a setup fit, and how fast might it run? AOT-compiles the whole decode program on a
(simulated) mesh with abstract parameters, nothing allocated, and reports memory per device; on
a TPU topology, also a roofline estimate of step times.

    python -m launch.plan --config=configs/chinchilla_70b.py --topology=1x16 --batch=1 --context=2048
    python -m launch.plan --config=configs/chinchilla_70b.py --topology=2x8 --batch=2 --context=2048
    python -m launch.plan --config=configs/gemma2_27b.py --topology=1x16 --context=8192
    python -m launch.plan --config=configs/gemma3_27b.py --topology=1x16 --context=32768
    python -m launch.plan --config=configs/chinchilla_70b.py --tpu=v4:2x2x2 --topology=1x16 \
        --batch=1 --context=2048                                             # needs libtpu
    python -m launch.plan --config=configs/chinchilla_70b.py --tpu=v5e:2x4 --topology=1x8 \
        --batch=1 --context=2048 --quantize=none,int8
    python -m launch.plan --config=configs/gemma3_27b.py --config.model.preset=gemma3_27b_vision \
        --tpu=v5e:4x4 --topology=1x16 --batch=1 --context=2048 --images=1    # needs libtpu

The work is spec_tpu/planning.py's. The program is `jax.jit(decode.run).lower(...).compile()`
with jax.ShapeDtypeStruct params carrying their NamedShardings (the same rule tables and XLA options the Sampler uses). `--context` is the
cache length: prompt + max_new_tokens + K + 1 tokens. Reported per device:
  compiled   XLA's memory_analysis(): arguments (params + inputs), outputs, temporaries (the
             caches live inside the program, so they count here)
  analytic   weights and caches from the shardings alone; for recurrent (Griffin) layers also
             their fixed-size states (part of the cache) and the per-position states a
             verification keeps until its rollback (recurrent.verification_trace_bytes)
On CPU the mesh is simulated: the launcher raises jax_num_cpu_devices itself before any JAX op,
and the verdict against TPU v4 / v5e / v5p HBM is an estimate (XLA:CPU's temporaries are not a
TPU's, e.g. its float32 copy of one layer's bf16 weights).
`--tpu=TOPOLOGY` (e.g. v4:2x2x2, v5e:4x4, v5p:2x2x2) compiles for TPU devices described by libtpu,
without TPU hardware: exact memory for that device, and a roofline estimate per device
(spec_tpu/roofline.py) of one target step, one verification of K+1 tokens and one draft step,
from the TPU compiler's cost analysis, with the speedup at the --acceptance rates.
`--quantize=none,int8` plans each weight form in turn (target and draft alike; default: as the
config says) and ends with a side-by-side table; a form the TPU compiler refuses for lack of
memory is reported as DOES NOT FIT.
`--images=N` (a target with a vision encoder, e.g. --config.model.preset=gemma3_27b_vision):
each row's prompt holds N image blocks whose soft tokens the prefill takes, and the vision
encoder's own program (run before the prefill, over batch x N images) is compiled too; the
need per device is the larger of the two programs; with --tpu the estimate adds the encoder's
cost per image. A multimodal draft (one with its own encoder) has its encoder planned and
estimated the same way.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from launch import cli

_CONFIG = cli.define_config_file("config", "configs/chinchilla_70b.py", "Setup to plan.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Mesh DATAxMODEL, e.g. 1x16 or 2x8 "
                                "(default: the config's mesh.shape).")
_BATCH = flags.DEFINE_integer("batch", None, "Rows per batch (default: engine.num_slots).")
_CONTEXT = flags.DEFINE_integer("context", 2048, "Cache length per row (prompt + new tokens).")
_K = flags.DEFINE_integer("k", None, "Draft tokens per round (default: engine.k).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "New tokens (default: sampling's).")
_TPU = flags.DEFINE_string("tpu", None, "Compile for this TPU topology via libtpu "
                           "(e.g. v5e:4x4) instead of the local devices.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the report here.")
_QUANTIZE = flags.DEFINE_list("quantize", None, "Weight forms to plan, each for target and draft "
                              "alike: none (float) and/or int8 (default: the config's).")
_IMAGES = flags.DEFINE_integer("images", 0, "Image blocks per row's prompt (a target with a "
                               "vision encoder): the encoder's program and an image prefill "
                               "are planned too.")
_ACCEPTANCE = flags.DEFINE_list("acceptance", ["0.6", "0.7", "0.8", "0.9"],
                                "Acceptance rates a for the --tpu speed estimate.")

def parse_topology(text: str) -> tuple[int, int]:
  try:
    data, model = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--topology must look like 1x16 (data x model), got {text!r}") from None
  if data <= 0 or model <= 0:
    raise ValueError(f"--topology sizes must be positive, got {text!r}")
  return data, model


def main(argv):
  del argv  # cli.run refuses positional arguments
  config = _CONFIG.value
  try:
    topology = (parse_topology(_TOPOLOGY.value) if _TOPOLOGY.value
                else tuple(int(x) for x in config.mesh.shape))
    if min(topology) <= 0:
      raise ValueError(f"mesh.shape {topology} needs explicit sizes here: pass --topology")
    for flag, least in ((_BATCH, 1), (_MAX_NEW, 1), (_K, 0)):
      if flag.value is not None and flag.value < least:
        raise ValueError(f"--{flag.name} must be >= {least}, got {flag.value}")
    if _OUTPUT_JSON.value:
      cli.check_output_file("output_json", _OUTPUT_JSON.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if not _TPU.value:
    from spec_tpu import planning  # imports jax: after the flags are checked
    planning.ensure_cpu_devices(topology[0] * topology[1])  # before any JAX op
  from spec_tpu import compile_cache, planning, setup as common
  from spec_tpu.checkpoints import checkpoint
  modes = [None] if _QUANTIZE.value is None else [m.strip() for m in _QUANTIZE.value]
  # A program compiled for a described TPU (no TPU attached) can be stored but not loaded back
  # (jax 0.10: "PjRtCompiler must be constructed with a Client"), so --tpu plans compile afresh.
  cache_dir = None if _TPU.value else compile_cache.use(config.run.compile_cache)
  reports = []
  for mode in modes:
    try:
      report = planning.plan(common.with_quantize(config, mode), topology,
                    _BATCH.value or int(config.engine.num_slots), _CONTEXT.value, _K.value,
                    _MAX_NEW.value, _TPU.value, tuple(float(a) for a in _ACCEPTANCE.value),
                    images=_IMAGES.value)
    except planning.DoesNotFit as e:
      # Not an input error: the answer to "will it fit?", and the other forms still get theirs.
      print(f"weights {mode or 'as configured'}: DOES NOT FIT on {e}\n", flush=True)
      reports.append(dict(quantize=mode or "as configured", does_not_fit=str(e)))
      continue
    except (ValueError, common.SetupError, checkpoint.CheckpointError) as e:
      sys.exit(f"error: {e}")
    report["compile_cache"] = dict(dir=cache_dir, **compile_cache.counts)
    print(planning.format_report(report) + "\n", flush=True)
    reports.append(report)
  if len(reports) > 1:
    print(planning.format_comparison(reports), flush=True)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(reports[0] if len(reports) == 1 else reports, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
