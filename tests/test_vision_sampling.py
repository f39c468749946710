"""Sampling with images: the output follows the target's law given the image (the statistical
suite of tests/test_exactness.py, with its law enumerated from the target conditioned on an
image prompt) with a text-only draft and with a multimodal one (its own encoder), greedy
speculative equals greedy autoregressive, a multimodal draft reads its image, and bad image
input fails in one line before any work."""

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_exactness as ex
from spec_tpu.decoding.sampler import Sampler
from spec_tpu.decoding.sampling import SamplingParams
from spec_tpu.models import model
from spec_tpu.models.vision import image as image_lib
from spec_tpu.models.vision import prompt as prompt_lib
from spec_tpu.models.vision import siglip
from spec_tpu.models.vision.config import VisionConfig
from spec_tpu.sharding import REPLICATED, make_mesh

# 14x14 images of 7x7 patches, 4 soft tokens each. The block's ids are ordinary tokens of the
# toy vocabulary (so the draft can propose them), except the placeholder, which lies outside it
# as Gemma 3's does (262,144 of 262,144): the text-only draft reads it as padding.
VISION = VisionConfig(image_size=14, patch_size=7, width=8, num_layers=1, num_heads=2,
                      mlp_dim=16, num_soft_tokens=4, start_id=7, end_id=2, image_id=ex.V,
                      newline_id=6)
TARGET = ex.TARGET.replace(name="exact_vision_target", vision=VISION)
TEXT = (3, VISION.start_id)  # 9 tokens laid out: the law enumerates 9 + 5
IMAGE = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)  # not square


def _vision_params(cfg, key):
  # What model.init_params(cfg, key) adds for the encoder; the text weights come from
  # test_exactness's (already made) params rather than being drawn again.
  return siglip.init_params(cfg.vision, cfg.d_model, jax.random.fold_in(key, 1),
                            jnp.dtype(cfg.dtype))


@functools.lru_cache(maxsize=None)
def target_params():
  # Same text weights as test_exactness's target (same key), so its draft drafts for this one.
  return {**ex.target_params(), "vision": _vision_params(TARGET, jax.random.key(1))}


def _soft(image):
  pixels = image_lib.prepare(image, VISION.image_size)[None]
  return model.encode_images(target_params(), TARGET, pixels)


ex.LAW_MODELS["vision"] = (TARGET, target_params)
ex.LAW_PROMPTS["vision"] = (prompt_lib.expand(TEXT, 1, VISION), lambda: _soft(IMAGE))


# A multimodal draft: the exactness draft's text weights with its own (wider) encoder and
# projector, which lays image prompts out as the target does.
MM_DRAFT = ex.DRAFT.replace(name="exact_vision_draft", vision=VISION.replace(width=12, mlp_dim=24))


@functools.lru_cache(maxsize=None)
def mm_draft_params():
  return {**ex.draft_params(), "vision": _vision_params(MM_DRAFT, jax.random.key(5))}


@pytest.fixture(scope="module")
def single():
  return Sampler.from_params(target_params(), TARGET, draft_params=ex.draft_params(),
                             draft_cfg=ex.DRAFT)


@pytest.fixture(scope="module")
def multimodal():
  return Sampler.from_params(target_params(), TARGET, draft_params=mm_draft_params(),
                             draft_cfg=MM_DRAFT)


@pytest.mark.slow
@pytest.mark.parametrize("draft,seed", [("single", 503), ("multimodal", 523)])
def test_output_follows_target_law_given_the_image(request, draft, seed):
  """Speculative (K = 3) with a text-only draft (greedy equality below ties it to K = 0), and
  with a draft that encodes the image with its own encoder."""
  sampler = request.getfixturevalue(draft)
  result = sampler.generate([TEXT] * ex.BATCH, images=[[IMAGE]] * ex.BATCH,
                            max_new_tokens=ex.MAX_NEW, k=3, seed=seed)
  p, each = ex.exactness_pvalue(ex._full_rows(result), target="vision")
  assert p > ex.ALPHA, f"output departs from the target law given the image (p = {p:.2e}; {each})"
  assert 0.2 < ex.judged_acceptance(result) < 0.95, ex.judged_acceptance(result)


# A draft that is the target itself, image encoder included, proposes from the target's own
# law given the image: every proposal is accepted, unless it ignored its image.
ORACLE_IMAGES = [[np.random.default_rng(4).integers(0, 256, (14, 14, 3), dtype=np.uint8)]
                 for _ in range(16)]


@functools.lru_cache(maxsize=None)
def oracle():
  return Sampler.from_params(target_params(), TARGET, draft_params=target_params(),
                             draft_cfg=TARGET)


def test_a_multimodal_draft_reads_the_image():
  """Through Sampler.generate."""
  seen = oracle().generate([TEXT] * len(ORACLE_IMAGES), images=ORACLE_IMAGES,
                           max_new_tokens=12, k=3, seed=7)
  assert ex.judged_acceptance(seen) == 1.0


@pytest.mark.slow
def test_the_oracle_draft_blind_to_the_image_is_rejected_now_and_then():
  """The check above can fail: the same draft text-only (it reads the placeholders as
  padding) has proposals rejected."""
  prompts = [TEXT] * len(ORACLE_IMAGES)
  text = {k: v for k, v in target_params().items() if k != "vision"}
  blind = Sampler.from_params(target_params(), TARGET, draft_params=text,
                              draft_cfg=TARGET.replace(name="blind", vision=None))
  unseen = blind.generate(prompts, images=ORACLE_IMAGES, max_new_tokens=12, k=3, seed=7)
  assert ex.judged_acceptance(unseen) < 0.97, ex.judged_acceptance(unseen)


def test_the_engine_prefills_a_multimodal_draft_with_the_images():
  """Through Engine.submit, the requests admitted while K = 0: the draft, which catches up
  from ids alone, is prefilled with the images all the same."""
  from spec_tpu.serving.engine import Engine
  from spec_tpu.serving.request import GenerationParams
  engine = Engine(oracle().pair, num_slots=4, max_len=32, k=0, k_max=3, adaptive_k=False,
                  prefill_rows=2)
  requests = [engine.submit(TEXT, GenerationParams(max_new_tokens=12, seed=i), im)
              for i, im in enumerate(ORACLE_IMAGES[:4])]
  engine.step()
  while engine.step(k=3):
    pass
  stats = [r.result().stats for r in requests]
  assert sum(s.judged for s in stats) > 0 and all(s.accepted == s.judged for s in stats)


@pytest.mark.slow
def test_output_follows_target_law_given_the_image_on_a_2x4_mesh():
  """The target tensor-parallel over 4 (the encoder's MLP too), rows over 2; the padded draft
  replicated (the placeholder id falls on one of its padding rows: it reads it as padding)."""
  sampler = Sampler.from_params(target_params(), TARGET, mesh=make_mesh((2, 4)),
                                draft_params=ex._padded(ex.draft_params()),
                                draft_cfg=ex.PADDED_DRAFT, draft_rules=REPLICATED)
  result = sampler.generate([TEXT] * ex.BATCH, images=[[IMAGE]] * ex.BATCH,
                            max_new_tokens=ex.MAX_NEW, k=3, seed=513)
  p, each = ex.exactness_pvalue(ex._full_rows(result), target="vision")
  assert p > ex.ALPHA, f"output departs from the target law given the image (p = {p:.2e}; {each})"


@pytest.mark.slow
def test_law_given_the_image_with_a_multimodal_draft_on_a_2x4_mesh():
  """Target and multimodal draft both tensor-parallel over 4 (each encoder by the default
  rules), rows over 2."""
  sampler = Sampler.from_params(target_params(), TARGET, mesh=make_mesh((2, 4)),
                                draft_params=mm_draft_params(), draft_cfg=MM_DRAFT)
  result = sampler.generate([TEXT] * ex.BATCH, images=[[IMAGE]] * ex.BATCH,
                            max_new_tokens=ex.MAX_NEW, k=3, seed=533)
  p, each = ex.exactness_pvalue(ex._full_rows(result), target="vision")
  assert p > ex.ALPHA, f"output departs from the target law given the image (p = {p:.2e}; {each})"


# The reference below: the target without cache or sampler, encoder and decoder in one program
# whose shapes fit every call (rows right-padded: the logits read are causal, before the pad).
REF_ROWS, REF_LEN, REF_IMAGES = 8, 32, 4


@jax.jit
def _last_logits_device(params, ids_bt, last_b, pixels_bnhwc):
  b, n = pixels_bnhwc.shape[:2]
  soft = model.encode_images(params, TARGET, pixels_bnhwc.reshape(
      (b * n,) + pixels_bnhwc.shape[2:]))
  logits = model.forward_full(params, TARGET, ids_bt, soft=soft.reshape(b, -1, TARGET.d_model))
  return logits[jnp.arange(b), last_b]


def last_logits(rows):
  """The target's next-token logits after each row: (laid-out ids, the images of its blocks)."""
  ids = np.zeros((REF_ROWS, REF_LEN), np.int32)
  last = np.zeros(REF_ROWS, np.int32)
  size = VISION.image_size
  pixels = np.zeros((REF_ROWS, REF_IMAGES, size, size, 3), np.float32)
  for i, (row_ids, images) in enumerate(rows):
    ids[i, :len(row_ids)], last[i] = row_ids, len(row_ids) - 1
    for j, img in enumerate(images):
      pixels[i, j] = image_lib.prepare(img, size)
  return np.asarray(_last_logits_device(target_params(), ids, last, pixels))[:len(rows)]


def test_the_image_changes_the_law():
  """Not vacuous: another image gives another next-token law (the suite above would notice an
  image dropped or misplaced)."""
  other = np.random.default_rng(1).integers(0, 256, (14, 14, 3), dtype=np.uint8)
  ids = prompt_lib.expand(TEXT, 1, VISION)
  first = np.asarray(jax.nn.softmax(last_logits([(ids, [IMAGE]), (ids, [other])])))
  assert np.max(np.abs(first[0] - first[1])) > 0.02


WIDE = np.random.default_rng(3).integers(0, 256, (300, 700, 3), dtype=np.uint8)
CROP_TEXT = ([3, 4], [5], [3])  # Pan & Scan's words, as ids of the toy vocabulary
# Requests with 0, 1 and 2 images, and one whose wide image Pan & Scan reads as 3 (the original
# and 2 crops; the others have none, so for them it is off): the greedy, Pan & Scan and engine
# tests ask their questions of these, so each program (K = 0 and K = 3, these rows, their prompt
# bucket and soft tokens) is compiled once for all of them.
_small = functools.partial(np.random.default_rng(3).integers, 0, 256, (10, 30, 3), np.uint8)
MIXED_PROMPTS = [(3, VISION.start_id, 1), (1, 2, 3, 4), (VISION.start_id, 0, VISION.start_id),
                 (5, VISION.start_id), (2, 2), TEXT]
MIXED_IMAGES = [[_small()], [], [_small(), _small()], [_small()], [], [WIDE]]
MIXED_NEW = 8


def _by_hand():
  """The mixed requests with the wide image's crops laid out as a caller would write them
  without pan_and_scan: Pan & Scan's words around start_of_image marks, the crops passed as
  images after the original."""
  s, prompts, images = VISION.start_id, [], []
  for p, row in zip(MIXED_PROMPTS, MIXED_IMAGES):
    if row and row[0] is WIDE:
      assert p == TEXT
      p = [3] + CROP_TEXT[0] + [s] + CROP_TEXT[1] + [s] + CROP_TEXT[2] + [s]
      row = image_lib.pan_and_scan(WIDE)
      assert len(row) == 3
    prompts.append(list(p))
    images.append(list(row))
  return prompts, images


def test_greedy_speculative_equals_greedy_autoregressive(single, multimodal):
  greedy = SamplingParams(temperature=0.0)
  run = lambda sampler, k: sampler.generate(  # noqa: E731
      MIXED_PROMPTS, images=MIXED_IMAGES, max_new_tokens=MIXED_NEW, k=k, sampling=greedy,
      pan_and_scan=CROP_TEXT).tokens
  ar = run(single, 0)
  assert run(single, 3) == ar
  assert run(multimodal, 3) == ar
  # The rows' prefill logits are the model's given each row's own images (the wide one's
  # original and crops laid out by hand).
  logits = last_logits([(prompt_lib.expand(p, len(row), VISION), row)
                        for p, row in zip(*_by_hand())])
  assert [t[0] for t in ar] == np.argmax(logits, axis=-1).tolist()


def _png(image) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def test_images_from_bytes_files_and_pil_read_alike(tmp_path):
  from PIL import Image
  data = _png(IMAGE)
  (tmp_path / "a.png").write_bytes(data)
  want = image_lib.prepare(IMAGE, 14)
  assert want.shape == (14, 14, 3) and -1 <= want.min() and want.max() <= 1
  for form in (data, str(tmp_path / "a.png"), Image.open(io.BytesIO(data)),
               IMAGE.astype(np.float32) / 255):
    np.testing.assert_allclose(image_lib.prepare(form, 14), want, atol=1e-6)


@pytest.mark.parametrize("image,match", [
    (b"not an image at all", "not in an image format Pillow reads"),
    (_png(IMAGE)[:60], "cannot be decoded"),
    (np.zeros((4, 4, 2), np.uint8), "expected H x W x 3"),
    (np.full((4, 4, 3), 2.0), r"float pixel values must lie in \[0, 1\]"),
], ids=["unknown_format", "truncated", "two_channels", "float_out_of_range"])
def test_bad_images_are_refused_in_one_line(single, image, match):
  with pytest.raises(ValueError, match="prompt 0 image 0.*" + match):
    single.generate([TEXT], images=[[image]], max_new_tokens=2)


def test_image_misuse_is_refused(single):
  with pytest.raises(ValueError, match=r"prompt 0 has 1 start_of_image token\(s\).*2 image"):
    single.generate([TEXT], images=[[IMAGE, IMAGE]], max_new_tokens=2)
  with pytest.raises(ValueError, match="one list per prompt"):
    single.generate([TEXT, TEXT], images=[[IMAGE]], max_new_tokens=2)
  text_only = Sampler.from_params(ex.target_params(), ex.TARGET)
  with pytest.raises(ValueError, match="has no vision encoder"):
    text_only.generate([TEXT], images=[[IMAGE]], max_new_tokens=2)
  with pytest.raises(ValueError, match="a draft reads images only where its target does"):
    Sampler.from_params(ex.target_params(), ex.TARGET, draft_params=mm_draft_params(),
                        draft_cfg=MM_DRAFT)
  other = MM_DRAFT.replace(vision=MM_DRAFT.vision.replace(num_soft_tokens=1))
  with pytest.raises(ValueError, match=r"\(num_soft_tokens differ\): a multimodal draft must"):
    Sampler.from_params(target_params(), TARGET, draft_params=mm_draft_params(), draft_cfg=other)
  small = Sampler.from_params(target_params(), TARGET, max_cache_len=10)
  with pytest.raises(ValueError, match="prompt of 9 tokens .* does not fit the cache"):
    small.generate([TEXT], images=[[IMAGE]], max_new_tokens=2)


def test_engine_serves_image_and_text_requests_side_by_side(single):
  """The mixed requests, inserted together and behind each other (rows at other positions),
  give each seeded request the tokens Sampler.generate gives its row."""
  from spec_tpu.serving.engine import ContextLengthError, Engine
  from spec_tpu.serving.request import GenerationParams
  s, seed = VISION.start_id, 77
  want = single.generate(MIXED_PROMPTS, images=MIXED_IMAGES, max_new_tokens=MIXED_NEW, k=3,
                         seed=seed, pan_and_scan=CROP_TEXT).tokens
  engine = Engine(single.pair, num_slots=3, max_len=48, k=3, adaptive_k=False, prefill_rows=2)
  requests = [engine.submit(p, GenerationParams(max_new_tokens=MIXED_NEW, seed=seed + i * 2**32),
                            im, pan_and_scan=CROP_TEXT if im and im[0] is WIDE else None)
              for i, (p, im) in enumerate(zip(MIXED_PROMPTS, MIXED_IMAGES))]
  assert len(requests[-1].prompt) == 3 * VISION.block_len + 1 + sum(map(len, CROP_TEXT))
  assert len(requests[-1].images) == 3
  while engine.step():
    pass
  assert [r.result().tokens for r in requests] == want
  with pytest.raises(ValueError, match="image 0 is not in an image format"):
    engine.submit(TEXT, GenerationParams(max_new_tokens=2), [b"GIF89a?"])
  with pytest.raises(ContextLengthError, match="prompt of 40 tokens"):  # 5 blocks of 8
    engine.submit((s,) * 5, GenerationParams(max_new_tokens=8), [_small()] * 5)
  with pytest.raises(ValueError, match=r"pan_and_scan's words has token ids outside"):
    engine.submit((s,), GenerationParams(max_new_tokens=2), [WIDE], pan_and_scan=([4], [99], []))
  assert engine.queue_length == 0


def test_pan_and_scan_reads_an_image_as_the_original_then_its_crops(single):
  """With pan_and_scan, a wide image is read as the original and its crops, in the layout the
  prompt gets when the caller writes the crop text and passes the crops as images itself (the
  mixed requests; the other rows' images have no crops)."""
  by_hand, views = _by_hand()
  got = single.generate(MIXED_PROMPTS, images=MIXED_IMAGES, pan_and_scan=CROP_TEXT,
                        max_new_tokens=MIXED_NEW)
  want = single.generate(by_hand, images=views, max_new_tokens=MIXED_NEW)
  assert got.tokens == want.tokens
  ids, soft = single._with_images(MIXED_PROMPTS, MIXED_IMAGES, CROP_TEXT)
  ids_by_hand, soft_by_hand = single._with_images(by_hand, views)
  assert ids == ids_by_hand and ids[-1].count(VISION.image_id) == 3 * VISION.num_soft_tokens
  np.testing.assert_array_equal(soft(False), soft_by_hand(False))
  # Off by default: one block, the original's.
  assert single._with_images([TEXT], [[WIDE]])[0] == [prompt_lib.expand(TEXT, 1, VISION)]
