"""Gemma 3 images: the SigLIP encoder and projector, the prompt layout and the attention of
image blocks, against transformers' Gemma3ForConditionalGeneration (a tiny random one,
converted by launch.convert's library function), with token_type_ids passed (without them
transformers silently makes images causal)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spec_tpu.checkpoints import checkpoint, hf
from spec_tpu.models import cache as cache_lib
from spec_tpu.models import model
from spec_tpu.models.vision import prompt as prompt_lib
from spec_tpu.models.vision import siglip

VOCAB = 128
START, END, IMAGE = 124, 125, 126  # boi, eoi, image soft token; "\n\n" is 108 (Gemma 3's id)
WINDOW = 3  # < an image's 4 soft tokens: local layers see only part of a block's past


def _torch():
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(transformers model, spec_tpu params, cfg): 28x28 images of 7x7 patches (16), pooled 2x2
  into 4 soft tokens; a text model with local and global layers."""
  torch, transformers = _torch()
  root = tmp_path_factory.mktemp("gemma3_mm")
  text = transformers.Gemma3TextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
      query_pre_attn_scalar=8, final_logit_softcapping=None)
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=24,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           image_size=28, patch_size=7, vision_use_head=False)
  config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                     mm_tokens_per_image=4, boi_token_index=START,
                                     eoi_token_index=END, image_token_index=IMAGE)
  m = transformers.Gemma3ForConditionalGeneration(config).eval()
  m.config._attn_implementation = "eager"
  m.config.text_config._attn_implementation = "eager"
  m.config.vision_config._attn_implementation = "eager"
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # weights large enough that every part matters
    for name, p in m.named_parameters():
      if p.ndim == 1:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen) + ("layer_norm" in name or
                                                            "layernorm" in name))
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
  m.save_pretrained(root / "hf", safe_serialization=True)
  cfg = hf.convert_directory(root / "hf", root / "ckpt")
  params, cfg = checkpoint.restore(root / "ckpt")
  return m, params, cfg


def _images(n, seed):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 28, 28, 3)).astype(np.float32)


def _rel_err(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_converted_config_names_the_image_block(converted):
  _, _, cfg = converted
  v = cfg.vision
  assert (v.image_size, v.patch_size, v.width, v.num_layers, v.num_heads, v.mlp_dim) == (
      28, 7, 16, 2, 2, 24)
  assert (v.num_soft_tokens, v.pool, v.start_id, v.end_id, v.image_id) == (4, 2, START, END,
                                                                          IMAGE)
  assert v.newline_id == 108  # no tokenizer in the source: Gemma 3's id
  # A tokenizer that splits "\n\n" cannot lay out an image block.
  from spec_tpu.checkpoints.hf_vision import with_newline_id
  from spec_tpu.tokenizer import ByteTokenizer
  with pytest.raises(hf.HFConversionError, match=r'encodes "\\n\\n" as 2 tokens \[14, 14\]'):
    with_newline_id(v, ByteTokenizer())


def test_encoder_matches_siglip_alone(converted):
  torch, _ = _torch()
  m, params, cfg = converted
  images = _images(3, 1)
  with torch.no_grad():
    pixels = torch.tensor(images).permute(0, 3, 1, 2)  # NCHW
    want = m.model.vision_tower(pixel_values=pixels).last_hidden_state.numpy()
    want_soft = m.model.get_image_features(pixels).pooler_output.numpy()
  got = np.asarray(siglip.encode(params["vision"], cfg.vision, jnp.asarray(images)))
  assert _rel_err(got, want) < 1e-5
  got_soft = np.asarray(model.encode_images(params, cfg, jnp.asarray(images)))
  assert got_soft.shape == (3, 4, cfg.d_model)
  assert _rel_err(got_soft, want_soft) < 1e-5
  # The unrolled encoder (what launch.plan's cost analysis compiles) computes the same.
  unrolled = np.asarray(model.encode_images(params, cfg, jnp.asarray(images), unrolled=True))
  assert _rel_err(unrolled, got_soft) < 1e-6


PROMPTS = [  # (prompt with start_of_image marks, number of images)
    ([2, 5, START, 7, 8, 9], 1),
    ([2, 11, START, 12, START, 13, 14], 2),
]


def _want_logits(m, ids, images):
  torch, _ = _torch()
  ids_t = torch.tensor([ids], dtype=torch.long)
  with torch.no_grad():
    out = m(input_ids=ids_t, pixel_values=torch.tensor(images).permute(0, 3, 1, 2),
            token_type_ids=(ids_t == IMAGE).long())
  return out.logits[0].float().numpy()


# One program per call shape instead of eager calls (hundreds of dispatched ops each).
_encode_images = jax.jit(model.encode_images, static_argnums=1)
_forward_full = jax.jit(model.forward_full, static_argnums=1)
_forward = jax.jit(model.forward, static_argnums=1, static_argnames="chunk")
_prefill = jax.jit(model.prefill, static_argnums=(1, 5))


def _encoded(params, cfg, images):
  """Soft tokens of up to PROMPTS' most images, through one encoder program (padded)."""
  pixels = np.zeros((max(c for _, c in PROMPTS),) + images.shape[1:], np.float32)
  pixels[:len(images)] = images
  return np.asarray(_encode_images(params, cfg, jnp.asarray(pixels)))[:len(images)]


@pytest.mark.parametrize("row", [0, 1], ids=["one_image", "two_images"])
def test_logits_match_transformers(converted, row):
  """Whole-sequence logits, and the cached forward in chunks that cut image blocks. Both rows
  in one shape (tokens right-padded to the longer prompt's, images to its count: the logits
  read are causal, before the pad), so each program compiles once for the two."""
  m, params, cfg = converted
  text, n = PROMPTS[row]
  ids = prompt_lib.expand(text, n, cfg.vision)
  assert len(ids) == len(text) + n * 7
  images = _images(n, 10 + row)
  want = _want_logits(m, ids, images)
  most = max(c for _, c in PROMPTS)
  soft = np.zeros((most, 4, cfg.d_model), np.float32)
  soft[:n] = _encoded(params, cfg, images)
  soft = jnp.asarray(soft.reshape(1, most * 4, cfg.d_model))
  tokens = np.zeros((1, max(len(t) + c * 7 for t, c in PROMPTS)), np.int32)
  tokens[0, :len(ids)] = ids
  got = np.asarray(_forward_full(params, cfg, jnp.asarray(tokens), soft=soft))[0, :len(ids)]
  assert _rel_err(got, want) < 1e-5
  for chunk in (3, 8):  # a chunk of 3 cuts every block; a cache of 32 slots
    c = cache_lib.init_cache(cfg, 1, 32, 1)
    got_c, _ = _forward(params, cfg, jnp.asarray(tokens), c, chunk=chunk, soft=soft)
    assert _rel_err(np.asarray(got_c)[0, :len(ids)], want) < 1e-5, chunk


def test_causal_images_would_differ(converted):
  """The check above can fail: without the block rule (transformers without token_type_ids)
  the logits differ."""
  torch, _ = _torch()
  m, params, cfg = converted
  text, n = PROMPTS[1]
  ids = prompt_lib.expand(text, n, cfg.vision)
  images = _images(n, 11)
  ids_t = torch.tensor([ids], dtype=torch.long)
  with torch.no_grad():
    causal = m(input_ids=ids_t, pixel_values=torch.tensor(images).permute(0, 3, 1, 2)
               ).logits[0].float().numpy()
  assert _rel_err(causal, _want_logits(m, ids, images)) > 1e-3


def test_ragged_batch_prefill_matches_rows_alone(converted):
  """Rows with one and two images, right-padded, through the chunked prefill: each row's last
  logits are its own sequence's."""
  m, params, cfg = converted
  rows = [prompt_lib.expand(t, n, cfg.vision) for t, n in PROMPTS]
  images = [_images(n, 10 + i) for i, (_, n) in enumerate(PROMPTS)]
  soft = np.concatenate([_encoded(params, cfg, x) for x in images])
  soft_rows = prompt_lib.soft_rows(soft, [n for _, n in PROMPTS])
  t = max(map(len, rows))
  tokens = np.zeros((2, t), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  lengths = jnp.asarray([len(r) for r in rows], jnp.int32)
  c = cache_lib.init_cache(cfg, 2, 32, 1)
  got, c = _prefill(params, cfg, jnp.asarray(tokens), c, lengths, 4,
                    soft=jnp.asarray(soft_rows))
  for i, r in enumerate(rows):
    want = _want_logits(m, r, images[i])[-1]
    assert _rel_err(np.asarray(got)[i, 0], want) < 1e-5
  assert list(np.asarray(c.length)) == [len(r) for r in rows]


def test_prompt_layout_checks_its_images():
  from spec_tpu.models.vision.config import GEMMA3
  ids = prompt_lib.expand([2, 9, GEMMA3.start_id, 10], 1, GEMMA3)
  assert ids[:3] == [2, 9, 108] and ids[3] == GEMMA3.start_id
  assert ids[4:260] == [GEMMA3.image_id] * 256 and ids[260:] == [GEMMA3.end_id, 108, 10]
  with pytest.raises(ValueError, match="1 start_of_image token.*2 image"):
    prompt_lib.expand([2, GEMMA3.start_id], 2, GEMMA3)
  with pytest.raises(ValueError, match="image placeholder id"):
    prompt_lib.expand([2, GEMMA3.image_id], 0, GEMMA3)


@pytest.mark.parametrize("names", ["hub", "in_memory"])
def test_both_name_layouts_convert_alike(converted, tmp_path, names):
  """The hub's vision_tower.vision_model.* / language_model.model.* names and transformers'
  in-memory model.vision_tower.* / model.language_model.* names give the same params."""
  from safetensors.numpy import load_file, save_file
  import shutil
  m, params, _ = converted
  src = tmp_path / "src"
  m.save_pretrained(src, safe_serialization=True)
  tensors = load_file(src / "model.safetensors")
  rename = {"hub": [("vision_tower.", "vision_tower.vision_model.")],
            "in_memory": [("vision_tower.", "model.vision_tower."),
                          ("multi_modal_projector.", "model.multi_modal_projector."),
                          ("language_model.model.", "model.language_model.")]}[names]

  def renamed(k):
    for old, new in rename:
      if k.startswith(old):
        return new + k[len(old):]
    return k

  os.remove(src / "model.safetensors")
  save_file({renamed(k): v for k, v in tensors.items()}, src / "model.safetensors")
  if names == "hub":  # with a tokenizer: the image block's "\n\n" id is read from it
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"<unk>": 0, "\n\n": 97}, unk_token="<unk>")).save(
        str(src / "tokenizer.json"))
  hf.convert_directory(src, tmp_path / "ckpt")
  got, cfg = checkpoint.restore(tmp_path / "ckpt")
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert cfg.vision.newline_id == (97 if names == "hub" else 108)
  shutil.rmtree(src)


# ---------------------------------------------------------------- the gemma library's tree

def _library_tree(m, cfg, scan=False) -> dict:
  """m's weights as the gemma library holds them (model.init()['params'], nested), named and
  laid out by its modules (transformers' convert_gemma3_weights.py mapping, run backwards;
  test_gemma_lib checks these layouts against the library's flax modules). scan: the ViT's
  scan option, encoder blocks stacked on a leading axis."""
  sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
  T, V, P = "model.language_model.", "model.vision_tower.", "model.multi_modal_projector."
  d, h, k, e = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def heads(w, n):  # (n * e, d) -> (n, d, e)
    return w.reshape(n, e, d).transpose(0, 2, 1)

  tree = {"embedder": {"input_embedding": sd[T + "embed_tokens.weight"],
                       "mm_input_projection": {"w": sd[P + "mm_input_projection_weight"]},
                       "mm_soft_embedding_norm": {"scale": sd[P + "mm_soft_emb_norm.weight"]}},
          "final_norm": {"scale": sd[T + "norm.weight"]}}
  for i in range(cfg.num_layers):
    p = f"{T}layers.{i}."
    scale = lambda name: {"scale": sd[p + name + ".weight"]}
    tree[f"layer_{i}"] = {
        "pre_attention_norm": scale("input_layernorm"),
        "post_attention_norm": scale("post_attention_layernorm"),
        "pre_ffw_norm": scale("pre_feedforward_layernorm"),
        "post_ffw_norm": scale("post_feedforward_layernorm"),
        "attn": {"q_einsum": {"w": heads(sd[p + "self_attn.q_proj.weight"], h)},
                 "kv_einsum": {"w": np.stack([heads(sd[p + "self_attn.k_proj.weight"], k),
                                              heads(sd[p + "self_attn.v_proj.weight"], k)])},
                 "attn_vec_einsum": {"w": sd[p + "self_attn.o_proj.weight"].reshape(
                     d, h, e).transpose(1, 2, 0)},
                 "_query_norm": scale("self_attn.q_norm"), "_key_norm": scale("self_attn.k_norm")},
        # Gemma 3's transpose_gating_einsum layout: (2, ffw, d_model), gate first.
        "mlp": {"gating_einsum": np.stack([sd[p + "mlp.gate_proj.weight"],
                                           sd[p + "mlp.up_proj.weight"]]),
                "linear": sd[p + "mlp.down_proj.weight"].T}}
  v = cfg.vision
  w, vh, ve = v.width, v.num_heads, v.head_dim

  def norm(name):
    return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}

  blocks = []
  for i in range(v.num_layers):
    p = f"{V}encoder.layers.{i}."
    attn = {ours: {"kernel": sd[p + f"self_attn.{hf_name}.weight"].T.reshape(w, vh, ve),
                   "bias": sd[p + f"self_attn.{hf_name}.bias"].reshape(vh, ve)}
            for ours, hf_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))}
    attn["out"] = {"kernel": sd[p + "self_attn.out_proj.weight"].T.reshape(vh, ve, w),
                   "bias": sd[p + "self_attn.out_proj.bias"]}
    blocks.append({"LayerNorm_0": norm(p + "layer_norm1"), "MultiHeadDotProductAttention_0": attn,
                   "LayerNorm_1": norm(p + "layer_norm2"),
                   "MlpBlock_0": {f"Dense_{j}": {"kernel": sd[p + f"mlp.fc{j + 1}.weight"].T,
                                                 "bias": sd[p + f"mlp.fc{j + 1}.bias"]}
                                  for j in (0, 1)}})
  encoder = ({"encoderblock": jax.tree.map(lambda *a: np.stack(a), *blocks)} if scan else
             {f"encoderblock_{i}": b for i, b in enumerate(blocks)})
  encoder["encoder_norm"] = norm(V + "post_layernorm")
  tree["vision_encoder"] = {"siglip_encoder": {
      "embedding": {"kernel": sd[V + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
                    "bias": sd[V + "embeddings.patch_embedding.bias"]},
      "pos_embedding": sd[V + "embeddings.position_embedding.weight"][None],
      "Transformer": encoder}}
  return tree


def _gemma_convert(tree, preset):
  from spec_tpu.checkpoints import gemma_lib
  names, vision = gemma_lib.canonical_names(tree)
  cfg = gemma_lib.config_from_tree(names, preset=preset, vision=vision)
  return gemma_lib.convert_params(names, cfg, vision=vision), cfg


@pytest.mark.parametrize("layout", ["flat_stacked", "nested_scanned"])
def test_gemma_library_tree_converts_to_the_hf_params(converted, layout):
  """The same weights from the gemma library's tree (its released flat layout with stacked
  text layers, or its nested one with the ViT's scanned blocks) convert to exactly the params
  of transformers' checkpoint, and the config's image half is the same."""
  import test_gemma_lib as gl
  m, params, cfg = converted
  tree = _library_tree(m, cfg, scan=layout == "nested_scanned")
  if layout == "flat_stacked":
    tree = gl.stacked_layout(gl.flat_layout(tree), period=3)
  else:
    tree = {"params": tree}
  # The tree gives the encoder's shape; the preset (here: the transformers checkpoint's config)
  # the soft-token count and the image block's ids.
  got, got_cfg = _gemma_convert(tree, cfg)
  assert got_cfg.vision == cfg.vision
  jax.tree.map(np.testing.assert_array_equal, got, params)
  if layout == "flat_stacked":  # and so the logits with an image are transformers'
    text, n = PROMPTS[0]
    ids = prompt_lib.expand(text, n, got_cfg.vision)
    images = _images(n, 12)
    soft = model.encode_images(got, got_cfg, jnp.asarray(images)).reshape(1, n * 4, -1)
    logits = model.forward_full(got, got_cfg, jnp.asarray([ids], jnp.int32), soft=soft)
    assert _rel_err(np.asarray(logits)[0], _want_logits(m, ids, images)) < 1e-5


def test_a_partial_gemma_library_vision_tree_is_named(converted):
  from spec_tpu.checkpoints import gemma_lib
  from spec_tpu.checkpoints.gemma_lib import GemmaConversionError
  m, _, cfg = converted
  E = "vision_encoder/siglip_encoder/"

  def without(*paths, add=None):
    flat = gemma_lib.flatten(_library_tree(m, cfg))
    for path in paths:
      flat = {n: x for n, x in flat.items() if not n.startswith(path)}
    return dict(flat, **(add or {}))

  def convert(flat, preset=cfg):
    from spec_tpu.checkpoints._convert import flatten
    nested = {}
    for name, x in flat.items():
      *keys, leaf = name.split("/")
      node = nested
      for key in keys:
        node = node.setdefault(key, {})
      node[leaf] = x
    assert flatten(nested).keys() == flat.keys()
    return _gemma_convert(nested, preset)

  with pytest.raises(GemmaConversionError, match=r"^partial vision tree: no 'embedder/"
                                                 r"mm_input_projection/w' \(\d+ vision tensors"):
    convert(without("embedder/mm_input_projection"))
  with pytest.raises(GemmaConversionError, match=r"^partial vision tree: no 'SigLiPFromPatches_0/"
                                                 r"siglip_encoder/embedding/kernel'"):
    convert(without(E))  # the projector alone
  with pytest.raises(GemmaConversionError, match="^vision encoder block encoderblock_0 is "
                                                 "missing"):
    convert(without(E + "Transformer/encoderblock_0/"))
  with pytest.raises(GemmaConversionError, match=r"^missing tensor 'SigLiPFromPatches_0/"
                                                 r"siglip_encoder/Transformer/encoderblock_1/"
                                                 r"MlpBlock_0/Dense_1/bias' \(1 missing"):
    convert(without(E + "Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias"))
  probe = {E + "MAPHead_0/probe": np.zeros((1, 1, 16), np.float32)}
  with pytest.raises(GemmaConversionError, match="^unexpected tensor 'SigLiPFromPatches_0/"
                                                 "siglip_encoder/MAPHead_0/probe'"):
    convert(without(add=probe))
  # The tree's encoder must be the preset's, and a preset's encoder must be in the tree.
  with pytest.raises(GemmaConversionError, match="^preset .* has vision.num_heads=4, the "
                                                 "checkpoint 2$"):
    convert(without(), cfg.replace(vision=cfg.vision.replace(num_heads=4)))
  with pytest.raises(GemmaConversionError, match="has a vision encoder, the checkpoint none"):
    convert(without(E, "embedder/mm_"))
  # Without a preset's vision config, Gemma 3's 256 soft tokens do not fit 4x4 patches.
  with pytest.raises(GemmaConversionError, match=r"invalid encoder .*num_soft_tokens \(256\).*"
                                                 r"--preset="):
    convert(without(), cfg.replace(vision=None))
  # Gemma 3's image-block ids do not fit a 128-row table: the tokenizer or a preset must say.
  from spec_tpu.models.vision.config import GEMMA3
  with pytest.raises(GemmaConversionError, match=r"^the image block's token ids \(start 255999, "
                                                 r"end 256000, \"\\n\\n\" 108\) are outside the "
                                                 r"checkpoint's 128-row table: give"):
    gemma_lib.with_vision(cfg.replace(vision=None), GEMMA3)
  # A tokenizer without the image pieces is not a Gemma 3 tokenizer.
  from spec_tpu.checkpoints import gemma_lib_vision
  chat_only = type("Pieces", (), {"piece_id": lambda self, p: {"<end_of_turn>": 9}.get(p)})()
  with pytest.raises(GemmaConversionError, match="^the tokenizer has no <start_of_image> piece"):
    gemma_lib_vision.with_token_ids(cfg.vision, chat_only)


# (width, height): landscape, portrait, under the ratio, square, crops too small, many crops,
# a crop count capped by the long side over min_crop_size.
PAN_AND_SCAN_SIZES = [(700, 300), (257, 900), (350, 300), (400, 400), (500, 120), (1700, 260),
                      (600, 290)]


@pytest.mark.parametrize("size", PAN_AND_SCAN_SIZES)
def test_pan_and_scan_crops_as_transformers(size):
  pytest.importorskip("transformers")
  from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
  from spec_tpu.models.vision import image as image_lib
  w, h = size
  pixels = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
  want = Gemma3ImageProcessorPil().pan_and_scan(
      pixels.transpose(2, 0, 1), pan_and_scan_min_crop_size=256,
      pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)
  got = image_lib.pan_and_scan(pixels)
  np.testing.assert_array_equal(np.asarray(got[0]), pixels)
  assert len(got) == 1 + len(want)
  for g, t in zip(got[1:], want):
    np.testing.assert_array_equal(np.asarray(g), t.transpose(1, 2, 0))
  if size in ((700, 300), (1700, 260)):
    assert len(want) >= 2  # the sizes above do exercise crops
  with pytest.raises(ValueError, match="Pan & Scan needs"):
    image_lib.pan_and_scan(pixels, max_num_crops=1)


def test_pan_and_scan_prompt_as_transformers():
  pytest.importorskip("transformers")
  from types import SimpleNamespace
  from transformers.models.gemma3.processing_gemma3 import Gemma3Processor
  from spec_tpu.models.vision.config import GEMMA3
  v = GEMMA3
  full = "\n\n<boi>" + "<img>" * v.num_soft_tokens + "<eoi>\n\n"
  proc = SimpleNamespace(full_image_sequence=full)
  encode = lambda s: [1000 + ord(c) for c in s]  # noqa: E731 - a character tokenizer
  names = {v.newline_id: "\n\n", v.start_id: "<boi>", v.image_id: "<img>", v.end_id: "<eoi>"}
  decode = lambda ids: "".join(names.get(t) or chr(t - 1000) for t in ids)  # noqa: E731
  crop_text = prompt_lib.crop_text_ids(encode)
  prompt = encode("a") + [v.start_id] + encode("b") + [v.start_id] + encode("c")
  for crops in ([3, 0], [0, 2], [1, 4]):
    ids = prompt_lib.expand(prompt, 2, v, crops=crops, crop_text=crop_text)
    want = "a{}b{}c".format(*(Gemma3Processor.replace_image_token(proc, {"num_crops": crops}, k)
                              for k in range(2)))
    assert decode(ids) == want
    assert ids.count(v.image_id) == v.num_soft_tokens * (2 + sum(crops))
  assert prompt_lib.expand(prompt, 2, v, crops=[0, 0]) == prompt_lib.expand(prompt, 2, v)
  with pytest.raises(ValueError, match="need crop_text"):
    prompt_lib.expand(prompt, 2, v, crops=[1, 0])
  with pytest.raises(ValueError, match="crops must give a count"):
    prompt_lib.expand(prompt, 2, v, crops=[1])
