"""Will a setup fit? AOT-compiles the whole decode program on a (simulated) mesh with abstract
parameters, nothing allocated, and reports memory per device against TPU v4 / v5e / v5p HBM.

    python -m launch.plan --config=configs/chinchilla_70b.py --topology=1x16 --batch=1 --context=2048
    python -m launch.plan --config=configs/chinchilla_70b.py --topology=2x8 --batch=2 --context=2048
    python -m launch.plan --config=configs/gemma2_27b.py --topology=1x16 --context=8192
    python -m launch.plan --config=configs/gemma3_27b.py --topology=1x16 --context=32768
    python -m launch.plan --config=configs/chinchilla_70b.py --tpu=v5e:4x4   # needs libtpu

The program is `jax.jit(decode.generate).lower(...).compile()` (Sampler.generate's program) with
jax.ShapeDtypeStruct params carrying their NamedShardings (the same rule tables the Sampler
uses). `--context` is the cache length: prompt + max_new_tokens + K + 1 tokens. Reported per device:
  compiled   XLA's memory_analysis(): arguments (params + inputs), outputs, temporaries
  analytic   weights and caches from the shardings alone; for recurrent (Griffin) layers also
             their fixed-size states (part of the cache) and the per-position states a
             verification keeps until its rollback (recurrent.verification_trace_bytes)
On CPU the mesh is simulated: the launcher raises jax_num_cpu_devices itself before any JAX op.
XLA:CPU computes bfloat16 dots in float32 and hoists float32 copies of the weights out of the
decode loop, so its temporaries overstate an accelerator's by about 2 bytes per bf16 weight; the
verdict uses that corrected estimate on CPU (labelled as such) and the compiled total elsewhere.
The estimate is rough: for Chinchilla 70B + 4B on 1x16 (batch 1, context 2048) it says 9.2 GiB
where an exact v5e compile (--tpu=v5e:4x4) needs 12.4 GiB, so narrow margins are flagged.
`--tpu=TOPOLOGY` (e.g. v4:2x2x2, v5e:4x4, v5p:2x2x2) compiles for real TPU devices described by
libtpu, without TPU hardware, and gives exact numbers for that chip.
"""

from __future__ import annotations

import functools
import json
import sys
import time

from absl import flags

from launch import cli

_CONFIG = cli.define_config_file("config", "configs/chinchilla_70b.py", "Setup to plan.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Mesh DATAxMODEL, e.g. 1x16 or 2x8 "
                                "(default: the config's mesh.shape).")
_BATCH = flags.DEFINE_integer("batch", None, "Rows per batch (default: run.batch_size).")
_CONTEXT = flags.DEFINE_integer("context", 2048, "Cache length per row (prompt + new tokens).")
_K = flags.DEFINE_integer("k", None, "Draft tokens per round (default: sampling.k).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "New tokens (default: sampling's).")
_TPU = flags.DEFINE_string("tpu", None, "Compile for this TPU topology via libtpu "
                           "(e.g. v5e:4x4) instead of the local devices.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the report here.")

GIB = 1 << 30
HBM = {"TPU v4": 32 * GIB, "TPU v5e": 16 * GIB, "TPU v5p": 95 * GIB}


_CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                     "xla_llvm_disable_expensive_passes": True}


def parse_topology(text: str) -> tuple[int, int]:
  try:
    data, model = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--topology must look like 1x16 (data x model), got {text!r}") from None
  if data <= 0 or model <= 0:
    raise ValueError(f"--topology sizes must be positive, got {text!r}")
  return data, model


def ensure_cpu_devices(n: int) -> None:
  """Simulated CPU devices for the mesh; must run before any JAX op creates the CPU backend."""
  import jax
  if n <= jax.config.jax_num_cpu_devices:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # a backend exists already (e.g. in-process use); devices are checked later
    pass


def _devices(n: int, tpu_topology: str | None):
  import jax
  if tpu_topology:
    from jax.experimental import topologies
    try:
      devices = topologies.get_topology_desc(topology_name=tpu_topology, platform="tpu").devices
    except Exception as e:  # libtpu missing or a bad name: both are user errors here
      raise ValueError(f"--tpu={tpu_topology}: cannot describe this TPU topology ({e}); it needs "
                       "libtpu (pip install 'jax[tpu]') and a name such as v5e:4x4") from None
    if len(devices) != n:
      raise ValueError(f"--tpu={tpu_topology} has {len(devices)} devices, the mesh needs {n}")
    return list(devices)
  devices = jax.devices()
  if len(devices) < n or devices[0].platform != "cpu" and len(devices) != n:
    devices = jax.devices("cpu")
  if len(devices) < n:
    raise ValueError(f"the mesh needs {n} devices but there are {len(devices)} CPU devices; "
                     f"set XLA_FLAGS=--xla_force_host_platform_device_count={n}")
  return devices[:n]


def _per_device_bytes(structs, shardings) -> int:
  import jax
  import numpy as np
  return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x, s in zip(jax.tree.leaves(structs), jax.tree.leaves(shardings))))


def _low_precision_bytes(structs, shardings) -> int:
  import jax
  import numpy as np
  return int(sum(np.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x, s in zip(jax.tree.leaves(structs), jax.tree.leaves(shardings))
                 if np.dtype(x.dtype).itemsize == 2 and len(x.shape) >= 2))


def plan(config, topology: tuple[int, int], batch: int, context: int, k: int | None,
         max_new: int | None, tpu_topology: str | None = None) -> dict:
  import jax
  import numpy as np
  from launch import common
  from spec_tpu.models import cache as cache_lib, model, recurrent
  from spec_tpu.decoding import decode
  from spec_tpu import sharding

  setup = common.resolve(config, need_weights=False, k=k)
  k = setup.k
  max_new = int(max_new or config.sampling.max_new_tokens)
  prompt_len = context - max_new - k - 1
  if batch <= 0 or prompt_len <= 0:
    raise ValueError(f"--context={context} must exceed max_new_tokens ({max_new}) + K + 1 "
                     f"({k + 1}), and --batch ({batch}) must be positive")
  data, model_axis = topology
  devices = _devices(data * model_axis, tpu_topology)
  mesh = sharding.make_mesh((data, model_axis), devices=devices)
  if batch % data:
    raise ValueError(f"--batch={batch} must divide over the data axis ({data})")

  def abstract_params(m):
    shapes = jax.eval_shape(lambda: model.init_params(m.cfg, jax.random.key(0)))
    shards = sharding.param_shardings(m.cfg, mesh, m.rules, shapes)
    structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           shapes, shards)
    return structs, shards

  def cache_bytes(m):
    abstract = cache_lib.abstract_cache(m.cfg, batch, context, k + 1)
    return _per_device_bytes(abstract, sharding.cache_shardings(abstract, mesh, m.rules))

  def recurrent_bytes(m, positions):
    """(state, trace) bytes per device of the recurrent layers: the states in the cache, and
    those after each of `positions` tokens of one call (sharded like the states)."""
    abstract = cache_lib.abstract_cache(m.cfg, batch, context, k + 1)
    shards = sharding.cache_shardings(abstract, mesh, m.rules)
    entries = cache_lib.recurrent_entries(abstract)
    pairs = [(e, s) for e, s in zip(entries.groups + entries.remainder,
                                    shards.groups + shards.remainder) if e is not None]
    state = sum(_per_device_bytes(e, s) for e, s in pairs)
    full = sum(_per_device_bytes(e, jax.tree.map(lambda _: sharding.replicated(mesh), e))
               for e, _ in pairs)
    trace = recurrent.verification_trace_bytes(m.cfg, batch, positions)
    return state, (trace * state // full if full else 0)

  draft = setup.draft if k > 0 else None
  tp, t_sh = abstract_params(setup.target)
  dp, d_sh = abstract_params(draft) if draft else (None, None)
  spec = decode.LoopSpec(target=setup.target.cfg, draft=draft.cfg if draft else None, k=k,
                         k_max=k,
                         max_top_k=setup.sampling.effective_top_k(setup.target.cfg.num_tokens),
                         max_len=context, out_len=max_new + k, eos_id=None)
  rules = setup.target.rules
  rows = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding.batch_sharding(
      mesh, shape, rules))
  rep = sharding.replicated(mesh)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)
  # tokens, lengths, temperature, top_p, top_k, seed
  args = (tp, dp, rows(batch, prompt_len), rows(batch), scalar(np.float32), scalar(np.float32),
          scalar(np.int32), scalar(np.uint32))

  start = time.perf_counter()
  lowered = jax.jit(functools.partial(decode.generate, spec)).lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  # On CPU the program is only measured, never run: skip LLVM's optimisations (code quality
  # does not change buffer assignment, which is what memory_analysis reports).
  compiled = lowered.compile(_CPU_FAST_COMPILE if devices[0].platform == "cpu" else None)
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()

  weights = {"target": _per_device_bytes(tp, t_sh),
             "draft": _per_device_bytes(dp, d_sh) if draft else 0}
  caches = {"target": cache_bytes(setup.target), "draft": cache_bytes(draft) if draft else 0}
  # Recurrent layers: the target traces K + 1 positions, the draft stacks its K - 1 steps.
  t_state, t_trace = recurrent_bytes(setup.target, k + 1)
  d_state, d_trace = recurrent_bytes(draft, max(k - 1, 0)) if draft else (0, 0)
  states = {"target": t_state, "draft": d_state}
  traces = {"target": t_trace, "draft": d_trace}
  compiled_total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  platform = devices[0].platform
  upcast = 0
  if platform == "cpu":
    upcast = 2 * (_low_precision_bytes(tp, t_sh) + (_low_precision_bytes(dp, d_sh) if draft else 0))
    upcast = min(upcast, mem.temp_size_in_bytes)
  need = compiled_total - upcast
  report = dict(
      target=setup.target.cfg.name, draft=draft.cfg.name if draft else None,
      target_params=setup.target.cfg.num_params(),
      draft_params=draft.cfg.num_params() if draft else 0,
      mesh=dict(mesh.shape), platform=platform, device_kind=devices[0].device_kind,
      batch=batch, context=context, prompt_len=prompt_len, max_new_tokens=max_new, k=k,
      lower_seconds=lower_s, compile_seconds=compile_s,
      compiled=dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                    temporaries=mem.temp_size_in_bytes, aliased=mem.alias_size_in_bytes,
                    generated_code=mem.generated_code_size_in_bytes, total=compiled_total),
      analytic=dict(weights=weights, kv_caches=caches, recurrent_states=states,
                    verification_traces=traces,
                    total=sum(weights.values()) + sum(caches.values()) + sum(traces.values())),
      cpu_f32_weight_copies=upcast, estimated_need=need,
      estimate_basis=("compiled total minus XLA:CPU's float32 weight copies (estimate)"
                      if upcast else "compiled total"),
      fits={chip: need <= hbm for chip, hbm in HBM.items()})
  return report


def format_report(r: dict) -> str:
  g = lambda b: f"{b / GIB:8.2f} GiB" if b >= GIB / 10 else f"{b / (1 << 20):8.2f} MiB"
  c, a = r["compiled"], r["analytic"]
  lines = [
      f"plan: {r['target']} ({r['target_params'] / 1e9:.2f}B)"
      + (f" + draft {r['draft']} ({r['draft_params'] / 1e9:.2f}B), K={r['k']}" if r["draft"]
         else " (autoregressive)"),
      f"mesh {r['mesh']} on {r['platform']} ({r['device_kind']}); batch {r['batch']}, context "
      f"{r['context']} (prompt {r['prompt_len']} + {r['max_new_tokens']} new + {r['k'] + 1})",
      f"lower {r['lower_seconds']:.1f} s, compile {r['compile_seconds']:.1f} s"
      + (" (loaded from the persistent compilation cache: pass --config.run.compile_cache= to "
         "time a compile)" if r.get("compile_cache", {}).get("hits") else ""),
      "",
      "per device, compiled (XLA memory_analysis):",
      f"  arguments (params + inputs) {g(c['arguments'])}",
      f"  temporaries                 {g(c['temporaries'])}",
      f"  outputs                     {g(c['outputs'])}",
      f"  total                       {g(c['total'])}",
      "per device, analytic:",
      f"  target weights              {g(a['weights']['target'])}",
      f"  draft weights               {g(a['weights']['draft'])}",
      f"  target KV cache             {g(a['kv_caches']['target'])}",
      f"  draft KV cache              {g(a['kv_caches']['draft'])}",
  ]
  for role in ("target", "draft"):
    if a.get("recurrent_states", {}).get(role):
      lines += [f"  {role + ' recurrent state':28s}{g(a['recurrent_states'][role])}"
                " (part of its cache above)",
                f"  {role + ' verification trace':28s}{g(a['verification_traces'][role])}"
                " (a state per position, held until the rollback)"]
  lines += [
      f"  total                       {g(a['total'])}",
  ]
  if r["cpu_f32_weight_copies"]:
    lines.append(f"  XLA:CPU f32 weight copies   {g(r['cpu_f32_weight_copies'])} "
                 "(not needed on TPU: subtracted)")
  estimated = bool(r["cpu_f32_weight_copies"])
  lines += ["", f"need per device: {g(r['estimated_need'])}  [{r['estimate_basis']}]"]
  for chip, hbm in HBM.items():
    spare = hbm - r["estimated_need"]
    if spare < 0:
      verdict = f"DOES NOT FIT (short by {-spare / GIB:.1f} GiB)"
    else:
      verdict = f"fits ({spare / GIB:.1f} GiB spare)"
      if estimated and spare < 0.25 * hbm:
        # Compiling for a real TPU (--tpu) measured ~3 GiB more than this estimate for 70B.
        verdict += ", borderline for an estimate: confirm with --tpu"
    lines.append(f"  {chip:8s} {hbm / GIB:4.0f} GiB HBM: {verdict}")
  return "\n".join(lines)


def main(argv):
  del argv  # cli.run refuses positional arguments
  config = _CONFIG.value
  try:
    topology = (parse_topology(_TOPOLOGY.value) if _TOPOLOGY.value
                else tuple(int(x) for x in config.mesh.shape))
    if min(topology) <= 0:
      raise ValueError(f"mesh.shape {topology} needs explicit sizes here: pass --topology")
  except ValueError as e:
    sys.exit(f"error: {e}")
  if not _TPU.value:
    ensure_cpu_devices(topology[0] * topology[1])  # before any JAX op
  from launch import common
  from spec_tpu.checkpoints import checkpoint
  # A program compiled for a described TPU (no TPU attached) can be stored but not loaded back
  # (jax 0.10: "PjRtCompiler must be constructed with a Client"), so --tpu plans compile afresh.
  cache_dir = None if _TPU.value else common.use_compile_cache(config)
  try:
    report = plan(config, topology, _BATCH.value or int(config.run.batch_size), _CONTEXT.value,
                  _K.value, _MAX_NEW.value, _TPU.value)
  except (ValueError, common.SetupError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  report["compile_cache"] = dict(dir=cache_dir, **common.compile_cache_counts)
  print(format_report(report), flush=True)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
