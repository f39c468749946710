"""Weight-only int8: symmetric per-output-channel scales, dequantised inside the matmul.

A quantized weight is a plain dict, so it passes through jax.tree operations, jit, sharding
rules, orbax and the stacking of layer groups like any other part of the params pytree:

  {"w": int8, same shape and logical axes as the float weight it replaces,
   "scale": float32, the weight's shape with its contracting axes removed (one per output channel)}

  weight ~= w * scale (broadcast over the contracting axes); w = round(weight / scale) in
  [-127, 127], scale = max |weight| over the contracting axes / 127 (1 for an all-zero channel).

Why float32 scales: they cost 4 bytes per output channel (0.01-0.1% of the weight bytes for the
served shapes), and the product of a float32 dot output with a float32 scale adds no rounding of
its own, so the only error left is the int8 rounding itself; a bfloat16 scale (8-bit mantissa)
would add up to 0.2% per channel, half the int8 step.

Where the dequantisation happens (`einsum`): the int8 operand is converted to the activation
dtype as the operand of the dot and the scales multiply the dot's float32 output channels, so
no float copy of a weight is ever written: XLA:TPU fuses the convert into the dot (the MXU is
fed int8 from HBM) and the scale into the dot's output fusion. (XLA:CPU cannot: it converts
each layer's int8 weights to bfloat16 for its matmuls, at every step; docs/int8.md.)

Which weights: the matmul weights q, k, v, o, gate, up, down and unembed; with tied embeddings
the table is the unembedding too, so it is quantized per vocabulary row and the lookup
dequantises the rows it gathers. An untied embedding table is only gathered (a few rows per
step, never read whole), so it stays in the model dtype; norms and biases always do.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spec_tpu.kernels import amx

F32 = jnp.float32
INT8 = "int8"
MODES = (INT8,)
QMAX = 127  # symmetric: -128 is never used, so negating a weight negates its int8 values

# Contracting logical axes (spec_tpu.models.model.param_logical_axes) of each quantizable weight,
# by leaf name: the axes the matmul sums over. Every other axis of the weight (its output
# channels, and a leading stacked-layers axis) gets its own scale.
CONTRACTING = {
    "q": ("embed",), "k": ("embed",), "v": ("embed",), "o": ("heads", "head_dim"),
    "gate": ("embed",), "up": ("embed",), "down": ("ffw",),
    "unembed": ("embed",), "embed": ("embed",),
}
MATMUL_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down", "unembed")


def is_quantized(x) -> bool:
  """True for a quantized weight (the {"w", "scale"} dict), abstract or concrete."""
  return isinstance(x, dict) and set(x) == {"w", "scale"}


def quantize(x, contracting_axes, xp=jnp) -> dict:
  """{"w": int8, "scale": float32} of array x, one scale per index of its non-contracting axes.

  xp: jax.numpy (on device, traceable) or numpy (host-side conversion): the same float32
  arithmetic, so both give the same int8 values on CPU.
  """
  axes = tuple(sorted(a % x.ndim for a in contracting_axes))
  x32 = xp.asarray(x).astype(np.float32)
  absmax = xp.max(xp.abs(x32), axis=axes, keepdims=True)
  # Times the float32 reciprocal, not divided by 127: XLA rewrites a division by a constant
  # into that product, and numpy must compute the same float32 bits.
  scale = xp.where(absmax > 0, absmax * np.float32(1 / QMAX), np.float32(1.0)).astype(np.float32)
  w = xp.clip(xp.round(x32 / scale), -QMAX, QMAX).astype(np.int8)
  return {"w": w, "scale": xp.squeeze(scale, axis=axes)}


def dequantize(q: dict, contracting_axes, dtype=F32):
  """The float weight a quantized one stands for (tests and quality measurements only: the
  decoder never materialises it)."""
  axes = tuple(sorted(a % q["w"].ndim for a in contracting_axes))
  scale = jnp.expand_dims(q["scale"], axes)
  return (q["w"].astype(F32) * scale).astype(dtype)


def einsum(spec: str, x, w, *, preferred_element_type=None):
  """jnp.einsum(spec, x, w) for an activation x and a weight w, float or quantized.

  Quantized: one dot_general of x with the int8 values converted to x's dtype (accumulated in
  float32), the output channels multiplied by their scales, cast to the result dtype, then
  permuted into the spec's output order. The dot's natural output order is (x's free axes,
  w's free axes), and w's free axes in w's order are exactly the scale's axes, so the scale
  broadcasts without moving; permuting last keeps the float32 dot unpermuted (XLA:CPU cannot
  run a bf16 x bf16 -> f32 dot that also permutes its output).

  bfloat16 x bfloat16 on CPU: the same dot, asked for float32 and rounded after. Asked for a
  bfloat16 result, XLA:CPU converts both operands to float32 first: a float32 copy of every
  weight written and read again at every step, which cost more than the products themselves
  at batch 8 (docs/cpu.md). Given bf16 operands and a float32 result it multiplies them as they
  lie (the same float32 sums, rounded once). On CPUs with AMX it is the AMX kernel's product
  on a weight packed once per program instead (`_cpu_dot`). Other platforms keep the plain
  einsum.
  """
  if not is_quantized(w):
    plain = lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)  # noqa: E731
    if (preferred_element_type not in (None, F32) or not x.dtype == w.dtype == jnp.bfloat16
        or not _is_product(spec)):
      return plain(x, w)
    out_dtype = preferred_element_type or x.dtype
    return jax.lax.platform_dependent(
        x, w, cpu=lambda x, w: _cpu_dot(spec, x, w, out_dtype), default=plain)
  return _natural_dot(spec, x, w["w"].astype(x.dtype), w["scale"],
                      preferred_element_type or x.dtype)


def _cpu_dot(spec: str, x, w, out_dtype):
  """A bfloat16 product on CPU, returned as out_dtype (bfloat16, or float32 for logits): through
  the AMX kernel (kernels/amx.py) on a weight packed for it where the CPU has AMX and the
  product is a decode step's (amx.fits), else XLA's dot asked for float32. Both sum the float32 products of the
  same operands (rounded once to bfloat16 for a bfloat16 result)."""
  inputs, out = spec.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  contract = [c for c in ws if c in xs]
  x_free, w_free = [c for c in xs if c in out], [c for c in ws if c in out]
  size = lambda axes, names, a: math.prod(a.shape[names.index(c)] for c in axes)  # noqa: E731
  m, k, n = size(x_free, xs, x), size(contract, xs, x), size(w_free, ws, w)
  if not (amx.fits(m, k, n) and amx.available()):
    return _natural_dot(spec, x, w, None, out_dtype)
  x_mk = jnp.transpose(x, [xs.index(c) for c in x_free + contract]).reshape(m, k)
  w_kn = jnp.transpose(w, [ws.index(c) for c in contract + w_free]).reshape(k, n)
  y = amx.matmul(x_mk, amx.pack(w_kn), n).astype(out_dtype)
  natural = "".join(x_free + w_free)
  y = y.reshape([x.shape[xs.index(c)] for c in x_free] + [w.shape[ws.index(c)] for c in w_free])
  return y if natural == out else jnp.transpose(y, [natural.index(c) for c in out])


def _is_product(spec: str) -> bool:
  """Whether spec is a plain product: each output axis a free axis of exactly one operand."""
  inputs, out = spec.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  free = [c for c in xs if c not in ws] + [c for c in ws if c not in xs]
  return sorted(free) == sorted(out)


def _natural_dot(spec: str, x, w, scale, out_dtype):
  """x times w accumulated and returned in float32 in the dot's natural order (x's free axes,
  then w's), times `scale` (over w's free axes; None: none), cast to out_dtype, then permuted
  into the spec's output order."""
  inputs, out = spec.replace(" ", "").split("->")
  xs, ws = inputs.split(",")
  if any(c in xs and c in out for c in ws):
    raise ValueError(f"quant.einsum needs a weight with no batch axes shared with x: {spec!r}")
  contract = [c for c in ws if c in xs]
  w_free = [c for c in ws if c in out]
  x_free = [c for c in xs if c in out]
  if scale is not None and (sorted(x_free + w_free) != sorted(out)
                            or len(w_free) != scale.ndim):
    raise ValueError(f"quant.einsum {spec!r}: a scale of shape {scale.shape} does not fit "
                     f"the weight's output axes {w_free}")
  dims = (([xs.index(c) for c in contract], [ws.index(c) for c in contract]), ([], []))
  y = jax.lax.dot_general(x, w, dims, preferred_element_type=F32)
  if scale is not None:
    y = y * scale
  y = y.astype(out_dtype)
  natural = "".join(x_free + w_free)
  return y if natural == out else jnp.transpose(y, [natural.index(c) for c in out])


def embed_lookup(table, tokens):
  """Rows of an embedding table (float, or quantized per row) for integer tokens, in the
  table's float dtype (float32 for a quantized table: the caller casts)."""
  if not is_quantized(table):
    if table.dtype != jnp.bfloat16:
      return jnp.take(table, tokens, axis=0)
    # XLA:CPU gathers bfloat16 through a float32 copy of the whole table (hoisted out of the
    # decode loop: once per program, 4 bytes per entry); the table's bit patterns as uint16
    # gather as they lie. Same values (an id past the table reads NaN either way).
    def bits(t, i):
      return jax.lax.bitcast_convert_type(
          jnp.take(jax.lax.bitcast_convert_type(t, jnp.uint16), i, axis=0, mode="fill",
                   fill_value=0x7FC0), jnp.bfloat16)

    return jax.lax.platform_dependent(
        table, tokens, cpu=bits, default=lambda t, i: jnp.take(t, i, axis=0))
  rows = jnp.take(table["w"], tokens, axis=0).astype(F32)
  return rows * jnp.take(table["scale"], tokens, axis=0)[..., None]


# ---------------------------------------------------------------- params trees

def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def _leaf_name(path) -> str | None:
  key = path[-1] if path else None
  return getattr(key, "key", None) if isinstance(getattr(key, "key", None), str) else None


def quantized_names(embed: bool) -> tuple[str, ...]:
  return MATMUL_WEIGHTS + (("embed",) if embed else ())


def contracting_axes(axes: tuple, name: str) -> list[int]:
  """Positions in a weight's logical axes that its matmul contracts."""
  found = [i for i, a in enumerate(axes) if a in CONTRACTING[name]]
  if len(found) != len(CONTRACTING[name]):
    raise ValueError(f"weight {name!r} with logical axes {axes} lacks its contracting axes "
                     f"{CONTRACTING[name]}")
  return found


def quantize_params(params, logical_axes, *, embed: bool, out_shardings=None,
                    delete_source: bool = False):
  """Params with every quantizable weight (quantized_names(embed)) replaced by its quantized
  form; anything else is returned as it is.

  logical_axes: the float params' logical axes (spec_tpu.models.model.param_logical_axes of the
    unquantized config), in either layout (a list of layers, or stacked groups whose leading
    'layers' axis is simply one more output axis).
  out_shardings: a pytree of Shardings for the quantized params (sharding.param_shardings of the
    quantized config); each weight is then quantized by its own jitted call straight into them.
  delete_source: free each float weight once quantized (arrays the caller will not use again),
    so memory peaks at the float params plus one quantized weight, not two copies of the model.
  """
  fn = leaf_quantizer(logical_axes, embed=embed, out_shardings=out_shardings,
                      delete_source=delete_source)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  return jax.tree_util.tree_unflatten(treedef, [fn(path, x) for path, x in flat])


def leaf_quantizer(logical_axes, *, embed: bool, out_shardings=None, delete_source=False):
  """fn(keypath, leaf) -> the leaf, quantized if it is a quantizable weight: quantize_params one
  leaf at a time (checkpoint.restore_transformed quantizes leaves as they are read)."""
  names = quantized_names(embed)
  path_axes = dict(jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=_is_axes)[0])
  out_sh = (None if out_shardings is None
            else dict(jax.tree_util.tree_flatten_with_path(out_shardings)[0]))

  def fn(path, x):
    name = _leaf_name(path)
    if name not in names:
      return x
    if path not in path_axes:
      raise ValueError(f"no logical axes for param {jax.tree_util.keystr(path)}")
    axes = tuple(contracting_axes(path_axes[path], name))
    if out_sh is not None:
      sh = {k: out_sh[path + (jax.tree_util.DictKey(k),)] for k in ("w", "scale")}
      q = _quantize_into(axes, sh["w"], sh["scale"])(x)
    else:
      q = quantize(x, axes)
    if delete_source and isinstance(x, jax.Array):
      x.delete()
    return q

  return fn


@functools.lru_cache(maxsize=None)
def _quantize_into(axes, w_sharding, scale_sharding):
  # One compiled program per (axes, shardings), reused by every leaf of that shape (jit caches
  # by shape): layers of one model share a handful.
  return jax.jit(lambda a: quantize(a, axes),
                 out_shardings={"w": w_sharding, "scale": scale_sharding})


def quantized_logical_axes(logical_axes, *, embed: bool):
  """The logical axes of quantize_params' output: a quantized weight's int8 values keep the
  weight's axes, its scale the output axes (so it shards like the weight's output)."""
  names = quantized_names(embed)

  def leaf(path, axes):
    name = _leaf_name(path)
    if name not in names:
      return axes
    drop = set(contracting_axes(axes, name))
    return {"w": axes, "scale": tuple(a for i, a in enumerate(axes) if i not in drop)}

  return jax.tree_util.tree_map_with_path(leaf, logical_axes, is_leaf=_is_axes)


def is_scale_path(path) -> bool:
  """True for the path of a quantized weight's scale (a float leaf that must keep float32
  whatever dtype the float params are cast to)."""
  keys = [getattr(k, "key", None) for k in path]
  return len(keys) >= 2 and keys[-1] == "scale" and keys[-2] in CONTRACTING


def check_mode(mode: Any) -> str | None:
  """None (float weights) or a known mode; anything else is a ValueError naming the modes."""
  if mode in (None, "", "none"):
    return None
  if mode not in MODES:
    raise ValueError(f"quantize must be one of {MODES} (or empty for float weights), got {mode!r}")
  return mode
