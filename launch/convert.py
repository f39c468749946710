"""Converts a model checkpoint from another framework to a spec_tpu checkpoint.

    python -m launch.convert --from=hf --src=/models/gemma-2-2b --dst=/ckpt/gemma2_2b \
        [--dtype=bfloat16] [--quantize=int8] [--overwrite]

--from=hf: a transformers model directory (config.json + *.safetensors). Pickle-based weights
(*.bin, *.pt) are refused, and no remote code is ever run. The logic lives in
spec_tpu.checkpoints.hf.convert_directory; this file only parses flags.
"""

import os

from absl import flags
from absl import logging

from launch import cli

_FROM = flags.DEFINE_enum("from", None, ["hf"], "Source format: hf (Hugging Face safetensors).")
_SRC = flags.DEFINE_string("src", None, "Source model directory.")
_DST = flags.DEFINE_string("dst", None, "Destination checkpoint directory.")
_DTYPE = flags.DEFINE_string("dtype", None, "Params dtype (e.g. bfloat16); default: the "
                             "source's declared dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing destination.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8"], "Store the matmul weights as int8 "
                              "with per-output-channel scales (spec_tpu/models/quant.py), each "
                              "tensor quantized as it is read.")
flags.mark_flags_as_required(["from", "src", "dst"])


def main(argv):
  del argv  # cli.run refuses positional arguments
  # Conversion needs no accelerator, and a whole model may not fit in one device's memory.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
  from spec_tpu.checkpoints import hf  # after flag parsing: --help stays fast
  # HFConversionError, SafetensorsError, CheckpointError: one line each (cli.run).
  cfg = hf.convert_directory(_SRC.value, _DST.value, dtype=_DTYPE.value,
                             overwrite=_OVERWRITE.value, quantize=_QUANTIZE.value)
  print(f"converted {_SRC.value} -> {_DST.value}: {cfg.num_layers} layers, d_model "
        f"{cfg.d_model}, vocab {cfg.vocab_size}, {cfg.dtype}"
        + (f", {cfg.quantize} weights" if cfg.quantize else ""))


if __name__ == "__main__":
  cli.run(main)
