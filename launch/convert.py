"""Converts a model checkpoint from another framework to a spec_tpu checkpoint.

    python -m launch.convert --from=hf --src=/models/gemma-2-2b --dst=/ckpt/gemma2_2b \
        [--dtype=bfloat16] [--quantize=int8] [--overwrite]

    python -m launch.convert --from=reference --src=/models/recurrentgemma/2b \
        --dst=/ckpt/recurrentgemma_2b

    python -m launch.convert --from=gemma --src=/models/gemma-2/flax/gemma2-2b-it \
        --dst=/ckpt/gemma2_2b_it [--preset=gemma2_2b] [--tokenizer=/models/tokenizer.model]

--from=hf: a transformers model directory (config.json + *.safetensors). Pickle-based weights
(*.bin, *.pt) are refused, and no remote code is ever run. RecurrentGemmaForCausalLM is
detected from config.json. The logic lives in spec_tpu.checkpoints.hf.convert_directory.
--from=reference: a RecurrentGemma checkpoint of the recurrentgemma package as released (the
orbax PyTree checkpoint of its Flax params, e.g. Kaggle's google/recurrentgemma 2b/ or 9b/);
spec_tpu.checkpoints.recurrent_convert.convert_reference_directory.
--from=gemma: a checkpoint of the gemma library (the Flax/JAX releases of Gemma 1, 2 and 3, Gemma
3's image encoder included, e.g. Kaggle's google/gemma-2 flax gemma2-2b-it/), with the
tokenizer.model found in or beside it
unless --tokenizer names one; the config comes from the tree and the released preset with its
shapes, or --preset; spec_tpu.checkpoints.gemma_lib.convert_directory. This file only parses
flags.
"""

import os

from absl import flags

from launch import cli

_FROM = flags.DEFINE_enum("from", None, ["hf", "reference", "gemma"],
                          "Source format: hf (Hugging Face safetensors), reference (the "
                          "recurrentgemma package's orbax param checkpoint), gemma (the gemma "
                          "library's orbax param checkpoint).")
_SRC = flags.DEFINE_string("src", None, "Source model directory.")
_DST = flags.DEFINE_string("dst", None, "Destination checkpoint directory.")
_DTYPE = flags.DEFINE_string("dtype", None, "Params dtype (e.g. bfloat16); default: the "
                             "source's declared dtype.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing destination.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8"], "Store the matmul weights as int8 "
                              "with per-output-channel scales (spec_tpu/models/quant.py), each "
                              "tensor quantized as it is read.")
_PRESET = flags.DEFINE_string("preset", None, "--from=gemma: the preset (spec_tpu/models/"
                              "config.py) whose window, soft caps and RoPE apply, checked against "
                              "the checkpoint; default: the released model with its shapes.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "--from=gemma: the tokenizer.model to copy "
                                 "into the checkpoint; default: the one in or beside --src.")
flags.mark_flags_as_required(["from", "src", "dst"])


def main(argv):
  del argv  # cli.run refuses positional arguments
  # Conversion needs no accelerator, and a whole model may not fit in one device's memory.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # After flag parsing: --help stays fast. HFConversionError, ReferenceConversionError,
  # SafetensorsError, CheckpointError: one line each (cli.run).
  if _FROM.value != "gemma" and (_PRESET.value or _TOKENIZER.value):
    cli.fail("--preset and --tokenizer go with --from=gemma (the other formats carry both)")
  note = ""
  if _FROM.value == "gemma":
    from spec_tpu.checkpoints import gemma_lib
    cfg = gemma_lib.convert_directory(
        _SRC.value, _DST.value, preset=_PRESET.value, tokenizer=_TOKENIZER.value,
        dtype=_DTYPE.value, overwrite=_OVERWRITE.value, quantize=_QUANTIZE.value)
    note = (f", tokenizer {cfg.tokenizer} copied" if cfg.tokenizer.startswith("sp:") else
            ", no tokenizer.model found (token ids only; --tokenizer= names one)")
  elif _FROM.value == "reference":
    if _QUANTIZE.value:
      cli.fail("--quantize works with --from=hf; convert the reference checkpoint first, then "
               "load it with --config.model.quantize=int8")
    from spec_tpu.checkpoints import recurrent_convert
    cfg = recurrent_convert.convert_reference_directory(
        _SRC.value, _DST.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
  else:
    from spec_tpu.checkpoints import hf
    cfg = hf.convert_directory(_SRC.value, _DST.value, dtype=_DTYPE.value,
                               overwrite=_OVERWRITE.value, quantize=_QUANTIZE.value)
  print(f"converted {_SRC.value} -> {_DST.value}: {cfg.num_layers} layers, d_model "
        f"{cfg.d_model}, vocab {cfg.vocab_size}, {cfg.dtype}"
        + (f", {cfg.quantize} weights" if cfg.quantize else "")
        + (f", image encoder of {cfg.vision.num_layers} layers" if cfg.vision else "") + note)


if __name__ == "__main__":
  cli.run(main)
