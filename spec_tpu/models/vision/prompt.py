"""Where images go in a prompt: each start_of_image token of the prompt becomes an image block,
"\\n\\n", start_of_image, num_soft_tokens placeholders (image_id), end_of_image, "\\n\\n" (as
transformers' Gemma3Processor and the gemma library lay them out); the decoder replaces the
placeholders' embeddings by the image's soft tokens (model.forward's `soft`). A draft reads the
same ids: a multimodal one fills the placeholders with its own encoder's soft tokens, a
text-only one reads them as padding."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from spec_tpu.models.vision.config import VisionConfig


# Pan & Scan's words around an image with crops, as transformers' Gemma3Processor writes them:
# ORIGINAL, the original's block, CROPS, then the crops' blocks joined by SEPARATOR.
PAN_AND_SCAN_TEXT = ("Here is the original image ",
                     " and here are some crops to help you see better ", " ")


def crop_text_ids(encode) -> tuple[list[int], ...]:
  """PAN_AND_SCAN_TEXT's pieces as token ids, each through encode(piece) -> ids (no BOS).
  Tokenized piece by piece, so they may split differently from transformers' tokenizing the
  whole expanded text at once (same words, possibly other token boundaries)."""
  return tuple(list(encode(piece)) for piece in PAN_AND_SCAN_TEXT)


def expand(prompt: Sequence[int], num_images: int, vcfg: VisionConfig,
           what: str = "the prompt", crops: Sequence[int] | None = None,
           crop_text: Sequence[Sequence[int]] | None = None) -> list[int]:
  """The prompt's token ids with each start_of_image expanded into an image block, or a
  ValueError when the prompt's start_of_image tokens and its images differ in number.
  With Pan & Scan, crops[k] is image k's number of crops (image.pan_and_scan's list less the
  original): an image with crops becomes crop_text's words (crop_text_ids) around 1 + crops[k]
  blocks, filled in order by the original's soft tokens then its crops'."""
  prompt = [int(t) for t in prompt]
  if vcfg.image_id in prompt:
    raise ValueError(f"{what} holds the image placeholder id {vcfg.image_id}: mark an image's "
                     f"place with start_of_image ({vcfg.start_id}) and pass the image")
  places = prompt.count(vcfg.start_id)
  if places != num_images:
    raise ValueError(f"{what} has {places} start_of_image token(s) ({vcfg.start_id}) but "
                     f"{num_images} image(s): give one image per start_of_image")
  block = ([vcfg.newline_id, vcfg.start_id] + [vcfg.image_id] * vcfg.num_soft_tokens
           + [vcfg.end_id, vcfg.newline_id])
  crops = [0] * num_images if crops is None else [int(c) for c in crops]
  if len(crops) != num_images or min(crops, default=0) < 0:
    raise ValueError(f"{what}: crops must give a count >= 0 for each of its {num_images} "
                     "image(s)")
  if any(crops) and (crop_text is None or len(crop_text) != 3):
    raise ValueError(f"{what}: images with Pan & Scan crops need crop_text (crop_text_ids)")
  out, k = [], 0
  for t in prompt:
    if t != vcfg.start_id:
      out.append(t)
      continue
    if crops[k]:
      original, between, sep = (list(map(int, ids)) for ids in crop_text)
      out += original + block + between + block
      for _ in range(crops[k] - 1):
        out += sep + block
    else:
      out += block
    k += 1
  return out


def lay_out(prompt: Sequence[int], images: Sequence, vcfg: VisionConfig,
            what: str = "the prompt", crop_text: Sequence[Sequence[int]] | None = None
            ) -> tuple[list[int], list]:
  """(the prompt's ids with its image blocks laid out, the images that fill the blocks, in
  order). Without crop_text those are `images` as given; with it (Pan & Scan's words as ids,
  crop_text_ids) each image becomes image.pan_and_scan's [original, crops...], decoded here,
  one block each."""
  images = list(images)
  if crop_text is None:
    return expand(prompt, len(images), vcfg, what), images
  from spec_tpu.models.vision import image as image_lib
  views = [image_lib.pan_and_scan(img, what=f"{what} image {j}") for j, img in enumerate(images)]
  ids = expand(prompt, len(images), vcfg, what, [len(v) - 1 for v in views], crop_text)
  return ids, [view for v in views for view in v]


def encode_marked(encode, text: str, mark: str, start_id: int) -> list[int]:
  """Token ids of a text in which `mark` stands for an image's place: each mark becomes
  start_id, the text between marks goes through encode(piece) -> ids."""
  first, *rest = text.split(mark)
  ids = list(encode(first))
  for piece in rest:
    ids += [start_id] + list(encode(piece))
  return ids


def soft_rows(soft_ujd: np.ndarray, counts: Sequence[int], width: int | None = None):
  """Soft tokens of all images (u j d, rows' images in order) as one row per prompt
  (b m d): row i holds its counts[i] images' tokens first, zeros after; m = width or the most
  any row needs."""
  _, j, d = soft_ujd.shape
  m = width if width is not None else max(counts) * j
  out = np.zeros((len(counts), max(m, j), d), soft_ujd.dtype)
  start = 0
  for i, c in enumerate(counts):
    out[i, :c * j] = soft_ujd[start:start + c].reshape(c * j, d)
    start += c
  return out
