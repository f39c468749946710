"""The serving engine against fixed batches, and its latency under concurrent clients.

    python -m launch.serve_bench --config=configs/default.py --output_dir=/tmp/serve_bench \
        --end_text='return '

Workload: --requests prompts (the config's run.prompts, cycled), each generating up to
--max_new_tokens with the config's sampling settings and its own seed, ending at an end token
(--end_text, default the tokenizer's EOS). The embedded pair rarely writes EOS within a few
hundred tokens, so its figures use --end_text='return ' (one token of its vocabulary): output
lengths then vary from a few tokens to the maximum, as EOS makes them vary in real traffic. A
fixed batch waits for its longest row; the engine refills a slot as soon as it frees.

1. Throughput (tokens per second of wall time over the whole workload, and per second of
   process CPU time, which other jobs on a shared machine do not inflate; compiles excluded;
   the fastest of --repeats runs with the modes taking turns): fixed batches of --num_slots
   requests (`Sampler.generate`, as launch.benchmark runs them) at K = 0 and at engine.k,
   against the engine with --num_slots slots at K = 0 and with adaptive K (calibrated first;
   the K's it ran are reported; without a draft, the engine at K = 0 alone).
2. Latency at each --clients count: that many client threads, each submitting a request,
   reading its stream and submitting the next (closed loop) until --latency_requests are done,
   on the adaptive engine running on its background thread. Time to first token (submission
   to first chunk, queueing included) and inter-token latency ((last chunk - first chunk) /
   (tokens - 1) per request), median and 90th percentile, and tokens/s.

Writes results.json, table.txt (also printed) and serve_bench.png. The work is
spec_tpu/serving/bench.py's; the engine is the one `engine.*` configures (as launch.serve runs it).
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
flags.mark_flag_as_required("output_dir")


def main(argv):
  del argv  # cli.run refuses positional arguments
  # SetupError, CheckpointError, ...: one line each (cli.run).
  from spec_tpu.serving import bench
  bench.run(_CONFIG.value, _OUTPUT_DIR.value, _REQUESTS.value, _MAX_NEW.value, _NUM_SLOTS.value,
            cli.int_list("clients", _CLIENTS.value), _LATENCY_REQUESTS.value, _END_TEXT.value,
            _REPEATS.value)


if __name__ == "__main__":
  cli.run(main)
