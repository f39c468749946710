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


@pytest.mark.parametrize("row", [0, 1], ids=["one_image", "two_images"])
def test_logits_match_transformers(converted, row):
  """Whole-sequence logits, and the cached forward in chunks that cut image blocks."""
  m, params, cfg = converted
  text, n = PROMPTS[row]
  ids = prompt_lib.expand(text, n, cfg.vision)
  assert len(ids) == len(text) + n * 7
  images = _images(n, 10 + row)
  want = _want_logits(m, ids, images)
  soft = model.encode_images(params, cfg, jnp.asarray(images)).reshape(1, n * 4, cfg.d_model)
  tokens = jnp.asarray([ids], jnp.int32)
  got = np.asarray(model.forward_full(params, cfg, tokens, soft=soft))[0]
  assert _rel_err(got, want) < 1e-5
  for chunk in (3, 8):  # a chunk of 3 cuts every block; a cache of 32 slots
    c = cache_lib.init_cache(cfg, 1, 32, 1)
    got_c, _ = model.forward(params, cfg, tokens, c, chunk=chunk, soft=soft)
    assert _rel_err(np.asarray(got_c)[0], want) < 1e-5, chunk


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
  soft = np.asarray(model.encode_images(params, cfg, jnp.asarray(np.concatenate(images))))
  soft_rows = prompt_lib.soft_rows(soft, [n for _, n in PROMPTS])
  t = max(map(len, rows))
  tokens = np.zeros((2, t), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
  lengths = jnp.asarray([len(r) for r in rows], jnp.int32)
  c = cache_lib.init_cache(cfg, 2, 32, 1)
  got, c = model.prefill(params, cfg, jnp.asarray(tokens), c, lengths, 4,
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
