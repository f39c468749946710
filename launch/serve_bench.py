"""The serving engine against fixed batches, and its latency under concurrent clients.

    python -m launch.serve_bench --config=configs/default.py --output_dir=/tmp/serve_bench \
        --end_text='return '

Throughput of fixed batches (Sampler.generate) at K = 0 and engine.k against the engine at K = 0
and with adaptive K, then time to first token and inter-token latency at each --clients count
(what each means: spec_tpu/serving/bench.py). The engine is the one `engine.*` configures, as
launch.serve runs it. --end_text: one token that ends a request ('' = the tokenizer's EOS); the
embedded pair rarely writes EOS, so its figures use --end_text='return '. --workload=rewrite
runs prompts whose outputs repeat them (where n-gram drafts pay); with
--config.draft.kind=auto the adaptive engine picks the draft source per step as well as K:

    python -m launch.serve_bench --config=configs/default.py --output_dir=/tmp/serve_bench_auto \
        --end_text='return ' --config.draft.kind=auto --workload=rewrite

--draft_kinds=model,auto,ngram times one adaptive engine per draft kind in the same process,
taking turns (docs/results.md, "Choosing the draft source").

Writes results.json, table.txt (also printed) and serve_bench.png.
"""

from __future__ import annotations

from absl import flags

from launch import cli

_CONFIG = cli.define_config_file("config", "configs/default.py", "Setup to run.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results.json and the plot go.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "Requests in the throughput workload.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens per request.")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", None, "Slots = fixed batch size "
                                  "(default: engine.num_slots).")
_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent clients to measure.")
_LATENCY_REQUESTS = flags.DEFINE_integer("latency_requests", 32,
                                         "Requests per client count (at least one per client).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs of each throughput mode (the fastest kept).")
_END_TEXT = flags.DEFINE_string("end_text", "", "Text of one token that ends a request "
                                "('' = the tokenizer's EOS).")
_WORKLOAD = flags.DEFINE_string("workload", "prompts", "prompts: the config's run.prompts; "
                                "rewrite: 'rewrite this function' prompts over held-out stdlib "
                                "code (outputs that repeat the prompt).")
_DRAFT_KINDS = flags.DEFINE_list("draft_kinds", None, "Time the adaptive engine with each of "
                                 "these draft.kind values (model, ngram, hybrid, auto), taking "
                                 "turns; latency runs on the first.")
flags.mark_flag_as_required("output_dir")


def main(argv):
  del argv  # cli.run refuses positional arguments
  # SetupError, CheckpointError, ...: one line each (cli.run).
  from spec_tpu.serving import bench
  bench.run(_CONFIG.value, _OUTPUT_DIR.value, _REQUESTS.value, _MAX_NEW.value, _NUM_SLOTS.value,
            cli.int_list("clients", _CLIENTS.value), _LATENCY_REQUESTS.value, _END_TEXT.value,
            _REPEATS.value, _WORKLOAD.value, _DRAFT_KINDS.value)


if __name__ == "__main__":
  cli.run(main)
