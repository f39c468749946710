"""The vision tower's shape (SigLIP encoder + Gemma 3 projector) and the ids of an image block.

Free of JAX imports, like models/config.py, which holds a VisionConfig as ModelConfig.vision.
Gemma 3 4B/12B/27B share one encoder (the Gemma 3 technical report; transformers'
SiglipVisionConfig inside Gemma3Config and the gemma library's SigLiP encoder agree):
896x896 images, 14x14 patches (64x64 = 4096 of them), width 1152, 27 pre-LayerNorm blocks of 16
heads and a tanh-GELU MLP of 4304, biases everywhere, a final LayerNorm; then 4x4 average pooling
to 16x16 = 256 soft tokens, RMSNorm with (1 + scale) and a projection to d_model.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 896        # images are resized to image_size x image_size
  patch_size: int = 14
  width: int = 1152
  num_layers: int = 27
  num_heads: int = 16
  mlp_dim: int = 4304
  num_soft_tokens: int = 256   # per image, after pooling (a square number)
  norm_eps: float = 1e-6       # the encoder's LayerNorms and the projector's RMSNorm
  # Token ids of an image block: "\n\n", start_of_image, num_soft_tokens x image, end_of_image,
  # "\n\n" replaces each start_of_image of a prompt (Gemma 3's tokenizer ids; conversion reads
  # "\n\n"'s from the checkpoint's tokenizer where it has one).
  start_id: int = 255_999
  end_id: int = 256_000
  image_id: int = 262_144
  newline_id: int = 108        # "\n\n"

  def __post_init__(self):
    problems = []
    for field in ("image_size", "patch_size", "width", "num_layers", "num_heads", "mlp_dim",
                  "num_soft_tokens"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
        problems.append(f"{field} must be a positive integer, got {getattr(self, field)!r}")
    if not problems:
      side = math.isqrt(self.num_soft_tokens)
      if self.image_size % self.patch_size:
        problems.append(f"image_size ({self.image_size}) must be a multiple of patch_size "
                        f"({self.patch_size})")
      elif side * side != self.num_soft_tokens or self.patches_per_side % side:
        problems.append(f"num_soft_tokens ({self.num_soft_tokens}) must be a square whose side "
                        f"divides the {self.patches_per_side} patches per side")
      if self.width % self.num_heads:
        problems.append(f"width ({self.width}) must be a multiple of num_heads "
                        f"({self.num_heads})")
    if not self.norm_eps > 0:
      problems.append(f"norm_eps must be positive, got {self.norm_eps}")
    ids = (self.start_id, self.end_id, self.image_id, self.newline_id)
    if len(set(ids)) != 4 or min(ids) < 0:
      problems.append(f"start_id, end_id, image_id and newline_id must be distinct token ids, "
                      f"got {ids}")
    if problems:
      raise ValueError("bad VisionConfig: " + "; ".join(problems))

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.patches_per_side ** 2

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def pool(self) -> int:
    """Side of the average-pooling window (4 for Gemma 3: 64 patches -> 16 tokens a side)."""
    return self.patches_per_side // math.isqrt(self.num_soft_tokens)

  @property
  def block_len(self) -> int:
    """Tokens one image takes in a prompt: its soft tokens and the four around them."""
    return self.num_soft_tokens + 4

  def num_params(self, d_model: int) -> int:
    w, m, p = self.width, self.mlp_dim, self.patch_size
    layer = 4 * (w * w + w) + 2 * w * m + m + w + 4 * w
    return (3 * p * p * w + w + self.num_patches * w + self.num_layers * layer + 2 * w
            + w + w * d_model)

  def replace(self, **kw) -> "VisionConfig":
    return dataclasses.replace(self, **kw)


GEMMA3 = VisionConfig()
