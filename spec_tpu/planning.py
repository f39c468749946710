"""launch.plan's work: will a setup fit, and how fast might it run? AOT-compiles the whole decode
program on a (simulated) mesh with abstract parameters, nothing allocated, and reports memory per
device; on a TPU topology, also a roofline estimate of step times (spec_tpu/roofline.py).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from spec_tpu import pair as pair_lib, profiling, roofline, setup as common, sharding
from spec_tpu.decoding import decode
from spec_tpu.models import cache as cache_lib, config as config_lib, model, recurrent


GIB = roofline.GIB
# HBM per chip, by the chip's name (a CPU plan answers for every chip; --tpu checks the device it
# compiled for, its share of its chip).
HBM = {f"TPU {chip.name}": chip.hbm_bytes for chip in roofline.CHIPS.values()}


_CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                     "xla_llvm_disable_expensive_passes": True}


class DoesNotFit(ValueError):
  """The device's compiler found the program larger than the device memory."""


def ensure_cpu_devices(n: int) -> None:
  """Simulated CPU devices for the mesh; must run before any JAX op creates the CPU backend."""
  if n <= jax.config.jax_num_cpu_devices:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # a backend exists already (e.g. in-process use); devices are checked later
    pass


def _devices(n: int, tpu_topology: str | None):
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


def _step_cost(cfg, rules, mesh, batch: int, context: int, t: int, spec_tokens: int):
  """What one forward of t tokens per row costs one device, with a cache of `context` slots.

  Flops and collectives: XLA's cost analysis and HLO of unrolled programs of one and of two layer
  groups, extrapolated to the depth (while-loop bodies count once in XLA's cost analysis, so the
  scanned program would not do). HBM bytes: every param and cache array's per-device bytes (the
  attention reads every cache slot), except an untied embedding table (t rows are gathered).
  """

  def abstract(c):
    shapes = jax.eval_shape(lambda: model.init_params(c, jax.random.key(0)))
    p_sh = sharding.param_shardings(c, mesh, rules, shapes)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, p_sh)
    cache = cache_lib.abstract_cache(c, batch, context, spec_tokens)
    c_sh = sharding.cache_shardings(cache, mesh, rules)
    cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         cache, c_sh)
    return params, p_sh, cache, c_sh

  def cost(groups: int):
    c = cfg.replace(num_layers=groups * len(cfg.layer_pattern) + cfg.num_remainder)
    params, _, cache, _ = abstract(c)
    tokens = jax.ShapeDtypeStruct((batch, t), np.int32,
                                  sharding=sharding.batch_sharding(mesh, (batch, t), rules))
    step = jax.jit(lambda p, x, kv: model.forward(p, c, x, kv, unrolled=True), donate_argnums=2)
    return roofline.program_cost(step.lower(params, tokens, cache).compile())

  total = (cost(cfg.num_groups) if cfg.num_groups <= 1
           else roofline.extrapolate(cost(1), cost(2), cfg.num_groups))
  params, p_sh, cache, c_sh = abstract(cfg)
  if not cfg.tie_embeddings:
    params, p_sh = (dict(x, embed=None) for x in (params, p_sh))
  hbm = profiling.per_device_bytes(params, p_sh) + profiling.per_device_bytes(cache, c_sh)
  return dataclasses.replace(total, hbm_bytes=float(hbm))


def _assistant_step_cost(acfg, target_cfg, rules, mesh, batch: int, context: int,
                         spec_tokens: int):
  """What one assistant draft step costs one device: its layers (unrolled: no loop to
  extrapolate) over the target's last local and global caches. HBM bytes: its params (the
  tied vocabulary head read whole) and those two cache layers, per device."""
  from spec_tpu.models import assistant
  from spec_tpu.models.config import GLOBAL, LOCAL

  def abstract_cache(c):
    cache = cache_lib.abstract_cache(c, batch, context, spec_tokens)
    shards = sharding.cache_shardings(cache, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        cache, shards), shards

  ap, a_sh = _abstract_params(acfg, mesh, rules)
  tp, _ = _abstract_params(target_cfg, mesh, rules)
  cache, _ = abstract_cache(target_cfg)
  rows = lambda *shape, dtype=np.int32: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=sharding.batch_sharding(mesh, shape, rules))
  step = jax.jit(lambda a, t, kv, x, h: assistant.step(a, acfg, t, target_cfg, kv, x, h))
  cost = roofline.program_cost(step.lower(
      ap, tp, cache, rows(batch), rows(batch, target_cfg.d_model, dtype=target_cfg.dtype)
  ).compile())
  # The two cache layers it reads: a target of one layer of each kind it reads has exactly
  # their shapes and shardings.
  kinds = tuple(k for k in (LOCAL, GLOBAL) if k in assistant.target_sources(target_cfg))
  read = target_cfg.replace(num_layers=len(kinds), layer_pattern=kinds, kv_shared_layers=0,
                            kv_shared_ffw_dim=None, ple_dim=0, ple_vocab_size=None,
                            sliding_window=target_cfg.sliding_window if LOCAL in kinds
                            else None)
  read_cache, read_sh = abstract_cache(read)
  hbm = profiling.per_device_bytes(ap, a_sh) + profiling.per_device_bytes(read_cache, read_sh)
  return dataclasses.replace(cost, hbm_bytes=float(hbm))


def _abstract_params(cfg, mesh, rules):
  """(abstract params carrying their shardings, the shardings) of a model."""
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  shards = sharding.param_shardings(cfg, mesh, rules, shapes)
  structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         shapes, shards)
  return structs, shards


def _encoder_cost(cfg, rules, mesh, scanned=None):
  """What encoding one image (the vision encoder and projector) costs one device. XLA's cost
  analysis counts the body of the encoder's layer scan once: the compiled encoder (`scanned`,
  one image; compiled here if not given) counts what is outside the layers and one layer, an
  unrolled two-layer encoder the outside and two layers, so one layer is their difference.
  HBM bytes: the encoder's weights and the image."""
  v = cfg.vision
  params, shards = _abstract_params(cfg, mesh, rules)
  if scanned is None:
    scanned = _encoder_program(cfg, mesh, rules, params, 1)
  once = roofline.program_cost(scanned)
  c2 = cfg.replace(vision=v.replace(num_layers=2))
  two = roofline.program_cost(_encoder_program(
      c2, mesh, rules, _abstract_params(c2, mesh, rules)[0], 1, unrolled=True))
  total = once + (two - once).scaled(v.num_layers - 1)
  hbm = profiling.per_device_bytes(params["vision"], shards["vision"]) + v.image_size ** 2 * 3 * 4
  return dataclasses.replace(total, xla_bytes=once.xla_bytes, hbm_bytes=float(hbm))


def _encoder_program(cfg, mesh, rules, params, images: int, options=None,
                     unrolled: bool = False):
  """The compiled encoder (soft tokens of `images` images, as the Sampler and the engine's
  insert run it: its own program, before the prefill)."""
  size = cfg.vision.image_size
  pixels = jax.ShapeDtypeStruct((images, size, size, 3), np.float32,
                                sharding=sharding.batch_sharding(mesh, (images, size, size, 3),
                                                                 rules))
  lowered = jax.jit(lambda p, x: model.encode_images(p, cfg, x, unrolled=unrolled)).lower(
      params, pixels)
  return lowered.compile(options)


def speed_estimate(setup, mesh, device, batch: int, context: int, k: int,
                   acceptances, images: int = 0, encoder=None, draft_encoder=None) -> dict:
  """Roofline estimate (spec_tpu/roofline.py) of a target step, a verification of K+1 tokens and
  a draft step on this TPU, per device, and of speculative rounds at the given acceptances; with
  images, also of encoding one image (`encoder`: its compiled program for one image, if made),
  and of the draft's own encoding where it reads images (a multimodal draft; `draft_encoder`
  likewise)."""
  chip, share = roofline.CHIPS[device.device_kind], roofline.device_share(device)
  start = time.perf_counter()
  programs = {"target_step": (setup.target, 1), "verify": (setup.target, k + 1)}
  if k > 0 and setup.draft is not None and not _is_assistant(setup.draft):
    programs["draft_step"] = (setup.draft, 1)  # n-gram drafts: no draft step
  costs = {name: _step_cost(m.cfg, m.rules, mesh, batch, context, t, k + 1)
           for name, (m, t) in programs.items()}
  if k > 0 and setup.draft is not None and _is_assistant(setup.draft):
    costs["draft_step"] = _assistant_step_cost(setup.draft.cfg, setup.target.cfg,
                                               setup.draft.rules, mesh, batch, context, k + 1)
  if images:
    costs["encode_image"] = _encoder_cost(setup.target.cfg, setup.target.rules, mesh, encoder)
    if k > 0 and _reads_images(setup.draft):
      costs["draft_encode_image"] = _encoder_cost(setup.draft.cfg, setup.draft.rules, mesh,
                                                  draft_encoder)
  times = {name: roofline.seconds(c, chip, share) for name, c in costs.items()}
  out = dict(chip=chip.name, device_share_of_chip=share,
             hbm_bytes_per_s=chip.hbm_bytes_per_s * share,
             bf16_flops_per_s=chip.bf16_flops_per_s * share,
             collective_latency_s=roofline.COLLECTIVE_LATENCY_S,
             compile_seconds=time.perf_counter() - start,
             programs={name: dict(cost=dataclasses.asdict(costs[name]), seconds=times[name])
                       for name in costs})
  if k > 0:
    out["speculative"] = {
        str(a): roofline.speculative(times["target_step"]["total"], times["verify"]["total"],
                                     times["draft_step"]["total"] if setup.draft else 0.0,
                                     k, float(a))
        for a in acceptances}
  return out


def _is_assistant(m) -> bool:
  return isinstance(m.cfg, config_lib.AssistantConfig)


def _reads_images(m) -> bool:
  """A multimodal draft: it encodes the prompt's images with its own encoder."""
  return m is not None and not _is_assistant(m) and m.cfg.vision is not None


def _encoder_memory(m, mesh, params, shards, images: int, options, device_kind: str):
  """(what a model's encoder program over `images` images holds per device, the program)."""
  try:
    program = _encoder_program(m.cfg, mesh, m.rules, params, images, options)
    e = program.memory_analysis()
  except Exception as err:  # noqa: BLE001 - the TPU compiler refuses what cannot fit
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    raise DoesNotFit(f"{device_kind}: the compiler refuses the {m.cfg.name} vision encoder: "
                     f"{str(err).splitlines()[0]}") from None
  return dict(images=images, arguments=e.argument_size_in_bytes,
              outputs=e.output_size_in_bytes, temporaries=e.temp_size_in_bytes,
              total=(e.argument_size_in_bytes + e.output_size_in_bytes
                     + e.temp_size_in_bytes - e.alias_size_in_bytes),
              weights=profiling.per_device_bytes(params["vision"], shards["vision"])), program


def plan(config, topology: tuple[int, int], batch: int, context: int, k: int | None,
         max_new: int | None, tpu_topology: str | None = None,
         acceptances=(0.6, 0.7, 0.8, 0.9), images: int = 0) -> dict:
  """images: per row, image blocks in the prompt (a target with a vision encoder): the
  encoder's program is compiled beside the decode program, whose prefill takes their soft
  tokens. Programs are traced in the accelerators' forms (a CPU plan stands in for them)."""
  with model.accelerator_forms():
    return _plan(config, topology, batch, context, k, max_new, tpu_topology, acceptances,
                 images)


def _plan(config, topology, batch, context, k, max_new, tpu_topology, acceptances, images):
  setup = common.resolve(config, need_weights=False, k=k)
  k = setup.k
  max_new = int(config.sampling.max_new_tokens if max_new is None else max_new)
  prompt_len = context - max_new - k - 1
  if batch <= 0 or prompt_len <= 0:
    raise ValueError(f"--context={context} must exceed max_new_tokens ({max_new}) + K + 1 "
                     f"({k + 1}), and --batch ({batch}) must be positive")
  vision = setup.target.cfg.vision
  if images < 0:
    raise ValueError(f"--images must be >= 0, got {images}")
  if images and vision is None:
    raise ValueError(f"--images={images}: target {setup.target.cfg.name!r} has no vision "
                     "encoder (e.g. --config.model.preset=gemma3_27b_vision)")
  if images and images * vision.block_len > prompt_len:
    raise ValueError(f"--images={images}: {images} image blocks of {vision.block_len} tokens "
                     f"do not fit the {prompt_len}-token prompt; raise --context")
  data, model_axis = topology
  devices = _devices(data * model_axis, tpu_topology)
  mesh = sharding.make_mesh((data, model_axis), devices=devices)
  if batch % data:
    raise ValueError(f"--batch={batch} must divide over the data axis ({data})")

  def abstract_params(m):
    return _abstract_params(m.cfg, mesh, m.rules)

  def cache_bytes(m):
    if _is_assistant(m):  # it reads the target's cache, holds none
      return 0
    abstract = cache_lib.abstract_cache(m.cfg, batch, context, k + 1)
    return profiling.per_device_bytes(abstract, sharding.cache_shardings(abstract, mesh, m.rules))

  def recurrent_bytes(m, positions):
    """(state, trace) bytes per device of the recurrent layers: the states in the cache, and
    those after each of `positions` tokens of one call (sharded like the states)."""
    if _is_assistant(m):
      return 0, 0
    abstract = cache_lib.abstract_cache(m.cfg, batch, context, k + 1)
    shards = sharding.cache_shardings(abstract, mesh, m.rules)
    entries = cache_lib.recurrent_entries(abstract)
    pairs = [(e, s) for e, s in zip(entries.groups + entries.remainder,
                                    shards.groups + shards.remainder) if e is not None]
    state = sum(profiling.per_device_bytes(e, s) for e, s in pairs)
    full = sum(profiling.per_device_bytes(e, jax.tree.map(lambda _: sharding.replicated(mesh), e))
               for e, _ in pairs)
    trace = recurrent.verification_trace_bytes(m.cfg, batch, positions)
    return state, (trace * state // full if full else 0)

  draft = setup.draft if k > 0 else None
  tp, t_sh = abstract_params(setup.target)
  dp, d_sh = abstract_params(draft) if draft else (None, None)
  assistant = draft is not None and _is_assistant(draft)
  spec = decode.LoopSpec(target=setup.target.cfg, k=k, k_max=k,
                         draft=draft.cfg if draft and not assistant else None,
                         assistant=draft.cfg if assistant else None,
                         max_top_k=setup.sampling.effective_top_k(setup.target.cfg.num_tokens),
                         max_len=context, out_len=max_new + k, eos_ids=(),
                         source=setup.draft_source if k else decode.DraftSource())
  rules = setup.target.rules
  rows = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding.batch_sharding(
      mesh, shape, rules))
  rep = sharding.replicated(mesh)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)
  # tokens, lengths, temperature, top_p, top_k, seed, soft tokens of the images (the target's,
  # and a multimodal draft's from its own encoder)
  draft_reads = bool(images) and _reads_images(draft)

  def soft_tokens(cfg):
    shape = (batch, images * vision.num_soft_tokens, cfg.d_model)
    return jax.ShapeDtypeStruct(shape, cfg.dtype,
                                sharding=sharding.batch_sharding(mesh, shape, rules))

  args = (tp, dp, rows(batch, prompt_len), rows(batch), scalar(np.float32), scalar(np.float32),
          scalar(np.int32), scalar(np.uint32), soft_tokens(setup.target.cfg) if images else None,
          soft_tokens(draft.cfg) if draft_reads else None)

  start = time.perf_counter()
  lowered = jax.jit(functools.partial(decode.generate, spec)).lower(*args)
  lower_s = time.perf_counter() - start
  start, start_cpu = time.perf_counter(), time.process_time()
  # On CPU the program is only measured, never run: skip LLVM's optimisations (code quality
  # does not change buffer assignment, which is what memory_analysis reports).
  quantized = bool(setup.target.cfg.quantize or (draft and draft.cfg.quantize))
  options = dict(pair_lib.compiler_options(devices[0].platform, quantized) or {})  # the Sampler's
  if devices[0].platform == "cpu":
    # Standing in for an accelerator's program: no CPU-only weight copies hoisted out of the
    # decode loop (what the CPU's own decode programs trade memory for speed with).
    options.update(pair_lib.CPU_QUANTIZED_COMPILER_OPTIONS, **_CPU_FAST_COMPILE)
  try:
    compiled = lowered.compile(options)
  except Exception as e:  # noqa: BLE001 - the TPU compiler refuses what cannot fit
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    raise DoesNotFit(f"{devices[0].device_kind}: the compiler refuses the program: "
                     f"{str(e).splitlines()[0]}") from None
  # CPU time too: on a shared machine the wall time depends on everyone else's load.
  compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
  mem = compiled.memory_analysis()
  # Each encoder is its own program, run before the prefill: the device holds one of them or
  # the decode program at a time.
  encoders, programs = {}, {}
  if images:
    kind = devices[0].device_kind
    encoders["target"], programs["target"] = _encoder_memory(
        setup.target, mesh, tp, t_sh, batch * images, options, kind)
    if draft_reads:
      encoders["draft"], programs["draft"] = _encoder_memory(
          draft, mesh, dp, d_sh, batch * images, options, kind)

  weights = {"target": profiling.per_device_bytes(tp, t_sh),
             "draft": profiling.per_device_bytes(dp, d_sh) if draft else 0}
  caches = {"target": cache_bytes(setup.target), "draft": cache_bytes(draft) if draft else 0}
  # Recurrent layers: the target traces K + 1 positions, the draft stacks its K - 1 steps.
  t_state, t_trace = recurrent_bytes(setup.target, k + 1)
  d_state, d_trace = recurrent_bytes(draft, max(k - 1, 0)) if draft else (0, 0)
  states = {"target": t_state, "draft": d_state}
  traces = {"target": t_trace, "draft": d_trace}
  compiled_total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  platform = devices[0].platform
  # jit leaves out arguments a program never reads: the decode program's do not hold the
  # encoders' weights, an encoder's not the rest, yet all stay on the device.
  need = compiled_total + sum(e["weights"] for e in encoders.values())
  for e in encoders.values():
    e["need"] = e["total"] + sum(weights.values()) - e["weights"]
    need = max(need, e["need"])
  report = dict(
      target=setup.target.cfg.name, draft=draft.cfg.name if draft else None,
      quantize=setup.target.cfg.quantize or "none",
      target_params=setup.target.cfg.num_params(),
      draft_params=draft.cfg.num_params() if draft else 0,
      mesh=dict(mesh.shape), platform=platform, device_kind=devices[0].device_kind,
      batch=batch, context=context, prompt_len=prompt_len, max_new_tokens=max_new, k=k,
      images_per_row=images, encoder=encoders.get("target"),
      draft_encoder=encoders.get("draft"),
      lower_seconds=lower_s, compile_seconds=compile_s, compile_cpu_seconds=compile_cpu_s,
      compiled=dict(arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
                    temporaries=mem.temp_size_in_bytes, aliased=mem.alias_size_in_bytes,
                    generated_code=mem.generated_code_size_in_bytes, total=compiled_total),
      analytic=dict(weights=weights, kv_caches=caches, recurrent_states=states,
                    verification_traces=traces,
                    total=sum(weights.values()) + sum(caches.values()) + sum(traces.values())),
      estimated_need=need,
      estimate_basis=("compiled total on CPU (XLA:CPU's float32 copy of one layer's weights "
                      "included; confirm with --tpu)" if platform == "cpu" else "compiled total"),
      fits={chip: need <= hbm for chip, hbm in HBM.items()})
  if platform == "tpu":
    device = devices[0]
    hbm = roofline.CHIPS[device.device_kind].hbm_bytes * roofline.device_share(device)
    report["device_hbm"] = hbm
    report["fits"] = {device.device_kind: need <= hbm}
    one = batch * images == 1  # then the programs compiled above are the one-image ones
    report["speed"] = speed_estimate(setup, mesh, device, batch, context, k, acceptances,
                                     images, programs.get("target") if one else None,
                                     programs.get("draft") if one else None)
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
      f"weights: {r.get('quantize', 'none')}; lower {r['lower_seconds']:.1f} s, compile "
      f"{r['compile_seconds']:.1f} s ({r['compile_cpu_seconds']:.1f} s of CPU time)"
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
  for role, key in (("", "encoder"), ("the draft's ", "draft_encoder")):
    e = r.get(key)
    if e:
      lines += [f"{role}vision encoder, its own program before the prefill ({e['images']} "
                f"images; the prompt holds {r['images_per_row']} image blocks a row):",
                f"  encoder weights             {g(e['weights'])} (part of the "
                f"{'draft' if role else 'target'} weights)",
                f"  temporaries                 {g(e['temporaries'])}",
                f"  total                       {g(e['total'])}",
                f"  with the other weights      {g(e['need'])} (resident, not its arguments)"]
  estimated = r["platform"] == "cpu"
  lines += ["", f"need per device: {g(r['estimated_need'])}  [{r['estimate_basis']}]"]
  chips = ({r["device_kind"]: r["device_hbm"]} if "device_hbm" in r else HBM)
  for chip, hbm in chips.items():
    spare = hbm - r["estimated_need"]
    if spare < 0:
      verdict = f"DOES NOT FIT (short by {-spare / GIB:.1f} GiB)"
    else:
      verdict = f"fits ({spare / GIB:.1f} GiB spare)"
      if estimated and spare < 0.25 * hbm:
        # Compiling for a real TPU (--tpu) measured ~3 GiB more than this estimate for 70B.
        verdict += ", borderline for an estimate: confirm with --tpu"
    lines.append(f"  {chip:8s} {hbm / GIB:4.0f} GiB HBM: {verdict}")
  if "speed" in r:
    lines += ["", *format_speed(r["speed"], r["k"])]
  return "\n".join(lines)


def format_speed(sp: dict, k: int) -> list[str]:
  ms = lambda s: f"{s * 1e3:8.3f}"  # noqa: E731
  lines = [
      f"speed per device: an ESTIMATE from the TPU compiler's cost analysis (roofline: bytes / "
      f"HBM bandwidth vs flops / peak, plus {sp['collective_latency_s'] * 1e6:.0f} us assumed "
      "per collective; spec_tpu/roofline.py says what it leaves out)",
      f"  {sp['chip']} x {sp['device_share_of_chip']:g} per device: "
      f"{sp['hbm_bytes_per_s'] / 1e9:.0f} GB/s HBM, {sp['bf16_flops_per_s'] / 1e12:.1f} "
      f"TFLOP/s bf16; step programs compiled in {sp['compile_seconds']:.1f} s",
      "  program        HBM GiB  XLA's GiB*   GFLOP  collectives  memory ms compute ms   coll. ms"
      "  estimate ms"]
  names = {"target_step": "target step", "verify": f"verify {k + 1}", "draft_step": "draft step",
           "encode_image": "encode image", "draft_encode_image": "draft encode"}
  for name, p in sp["programs"].items():
    c, t = p["cost"], p["seconds"]
    lines.append(f"  {names[name]:13s} {c['hbm_bytes'] / GIB:8.3f} {c['xla_bytes'] / GIB:10.3f} "
                 f"{c['flops'] / 1e9:8.1f} {c['collectives']:12.0f} {ms(t['memory'])}  "
                 f"{ms(t['compute'])} {ms(t['collectives'])}     {ms(t['total'])}")
  if "speculative" in sp:
    first = next(iter(sp["speculative"].values()))
    lines.append("  * XLA:TPU's bytes accessed of a one-layer-group program, for reference (it counts "
                 "fused temporaries and on-chip copies; not HBM traffic)")
    lines.append(f"  K = {k}: c = draft / target step = {first['c']:.3f}; a round (K draft steps + "
                 f"verify) = {first['round_s'] * 1e3:.2f} ms")
    lines.append("  acceptance a  tokens/round  ms/token  speedup  (formula with c)")
    for a, e in sp["speculative"].items():
      lines.append(f"  {float(a):12.2f} {e['tokens_per_round']:13.2f} {e['s_per_token'] * 1e3:9.2f}"
                   f" {e['speedup']:7.2f}x  ({e['formula_speedup']:.2f}x)")
  return lines


def format_comparison(reports: list[dict]) -> str:
  """One line per weight form: what each device holds and whether it fits."""
  big = max(r.get("estimated_need", GIB) for r in reports) >= GIB
  unit, scale = ("GiB", GIB) if big else ("MiB", 1 << 20)
  g = lambda b: f"{b / scale:.2f}"  # noqa: E731
  # A --tpu plan answers for the described chip only; a CPU plan for every chip in HBM.
  chips = list(dict.fromkeys(chip for r in reports for chip in r.get("fits", {})))
  head = (f"{'weights':8} {'target w':>9} {'draft w':>8} {'KV':>6} {'compiled':>9} {'need':>6}  "
          + "  ".join(f"{chip:>{max(8, len(chip))}}" for chip in chips) + f"   ({unit} per device)")
  lines = [head]
  for r in reports:
    if "does_not_fit" in r:
      lines.append(f"{r['quantize']:8} DOES NOT FIT: {r['does_not_fit']}")
      continue
    a = r["analytic"]
    fits = "  ".join(f"{'fits' if r['fits'][chip] else 'NO':>{max(8, len(chip))}}"
                     for chip in chips)
    lines.append(f"{r['quantize']:8} {g(a['weights']['target']):>9} {g(a['weights']['draft']):>8} "
                 f"{g(sum(a['kv_caches'].values())):>6} {g(r['compiled']['total']):>9} "
                 f"{g(r['estimated_need']):>6}  {fits}")
  return "\n".join(lines)
