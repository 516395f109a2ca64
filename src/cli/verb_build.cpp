// kiln build --checkpoint_dir CKPT --output_dir ENGINE [limits]: TensorRT-LLM's trtllm-build, as
// one verb (src/build/build.h). The plugin flags are accepted and ignored. On a GPU (--device, or
// "auto": the first GPU when one is visible) plan.json gets GEMM algorithms timed on that GPU.
#include <cstdio>

#include "build/build.h"
#include "cli/cli.h"
#include "cli/executor_factory.h"

namespace kiln::cli {
namespace {

int build(BuildOptions o, const std::string& device) {
  auto name = plan_device_name(device);
  if (!name) return fail("build", name.message());
  o.device_name = *name;
  auto r = build_engine(o);
  if (!r) return fail("build", r.message());
  const EnginePlan& p = r->plan;
  std::printf("kiln build: %s -> %s: device %s, max_batch_size %d, max_input_len %d, max_seq_len %d, "
              "max_num_tokens %d, %zu graph buckets, KV %s %.1f KiB/token (%.1f MiB at the limits)\n",
              o.checkpoint_dir.c_str(), o.output_dir.c_str(), p.device_name.c_str(), p.limits.max_batch_size,
              p.limits.max_input_len, p.limits.max_seq_len, p.limits.max_num_tokens, p.cuda_graph_batch_sizes.size(),
              p.kv.dtype.c_str(), double(p.kv.bytes_per_token) / 1024.0, double(p.kv.bytes_for_limits) / (1 << 20));
  if (p.device != "cpu") {
    const auto e = p.gemm_algorithms.find("entries");
    std::printf("kiln build: %zu GEMM algorithms planned on %s\n", e != p.gemm_algorithms.end() ? e->size() : size_t(0),
                p.device_name.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(build) {
  using namespace kiln::cli;
  static kiln::BuildOptions o;
  static std::string device = "auto";
  auto* cmd = app.add_subcommand("build", "kiln checkpoint -> engine directory (limits + plan.json)");
  add_flag(*cmd, "checkpoint_dir", o.checkpoint_dir, "checkpoint written by kiln convert")->required();
  add_flag(*cmd, "output_dir", o.output_dir, "engine directory to write (may equal --checkpoint_dir)")->required();
  add_flag(*cmd, "max_batch_size", o.limits.max_batch_size, "most sequences per step");
  add_flag(*cmd, "max_input_len", o.limits.max_input_len, "longest prompt (0: min(1024, max_seq_len))");
  add_flag(*cmd, "max_seq_len", o.limits.max_seq_len, "longest prompt + output (0: the model's context)");
  add_flag(*cmd, "max_num_tokens", o.limits.max_num_tokens, "most tokens per step (prefill chunk budget)");
  add_flag(*cmd, "gemm_plugin", o.gemm_plugin, "accepted for TensorRT-LLM compatibility and ignored: kiln picks GEMMs itself");
  add_flag(*cmd, "gpt_attention_plugin", o.gpt_attention_plugin,
           "accepted for TensorRT-LLM compatibility and ignored: kiln's attention is always on");
  add_flag(*cmd, "device", device,
           "what to plan for: auto (the first GPU if one is visible, else cpu), cpu, cuda or cuda:N; on a GPU "
           "plan.json gets GEMM algorithms timed there");
  cmd->callback([] {
    if (int rc = build(o, device)) throw CLI::RuntimeError(rc);
  });
}
