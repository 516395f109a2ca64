// kiln convert --model_dir HF_DIR|FILE.gguf --output_dir CKPT [--dtype] [--use_fp8] [--fp8_kv_cache]
// [--tp_size N]: TensorRT-LLM's convert_checkpoint.py, as one verb (src/convert/convert.h).
#include <cstdio>

#include "cli/cli.h"
#include "convert/convert.h"
#include "model/engine_dir.h"

namespace kiln::cli {
namespace {

struct ConvertArgs {
  std::string model_dir, output_dir, dtype = "auto", fp8_scaling = "per_tensor", fp8_activations = "dynamic_per_token";
  bool use_fp8 = false, fp8_kv_cache = false;
  int32_t tp_size = 1, pp_size = 1;
};

int convert(const ConvertArgs& a) {
  ConvertOptions o;
  o.model_dir = a.model_dir;
  o.output_dir = a.output_dir;
  o.use_fp8 = a.use_fp8;
  o.fp8_kv_cache = a.fp8_kv_cache;
  o.tp_size = a.tp_size;
  auto dtype = parse_convert_dtype(a.dtype);
  if (!dtype) return fail("convert", dtype.message());
  o.dtype = *dtype;
  auto scaling = parse_fp8_scaling(a.fp8_scaling);
  if (!scaling) return fail("convert", scaling.message());
  o.fp8_scaling = *scaling;
  auto act = parse_fp8_activations(a.fp8_activations);
  if (!act) return fail("convert", act.message());
  o.fp8_activations = *act;
  if (a.pp_size != 1) return fail("convert", "--pp_size (" + std::to_string(a.pp_size) + ") must be 1: kiln has no pipeline parallelism");
  auto r = convert_checkpoint(o);
  if (!r) return fail("convert", r.message());
  std::printf("kiln convert: %s (%s) -> %s: %s%s, tp_size %d, %.1f MB in %zu files%s\n", a.model_dir.c_str(),
              r->source_format.c_str(), a.output_dir.c_str(), r->fp8 ? "FP8 E4M3 weights, other tensors " : "",
              r->dtype.c_str(), a.tp_size, double(r->bytes_written) / 1e6, r->files.size(),
              r->prequantized ? " (source was pre-quantized FP8)" : "");
  if (r->requantized_shards > 0)
    std::printf("kiln convert: %d FP8 shards requantized to their fused tensor's max scale\n", r->requantized_shards);
  return 0;
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(convert) {
  using namespace kiln::cli;
  static ConvertArgs a;
  auto* cmd = app.add_subcommand("convert", "HF directory or GGUF file -> kiln checkpoint (fused, optionally FP8, TP shards)");
  add_flag(*cmd, "model_dir", a.model_dir, "HF model directory or .gguf file")->required();
  add_flag(*cmd, "output_dir", a.output_dir, "checkpoint directory to write")->required();
  add_flag(*cmd, "dtype", a.dtype, "auto | bfloat16 | float16 | float32: dtype of non-FP8 tensors (auto: the source's)");
  add_switch(*cmd, "use_fp8", a.use_fp8, "quantize linear weights to FP8 E4M3 (pre-quantized FP8 sources are kept as they are)");
  add_switch(*cmd, "fp8_kv_cache", a.fp8_kv_cache, "record FP8 KV-cache scales (calibrated k/v scales from the source, else 1.0)");
  add_flag(*cmd, "tp_size", a.tp_size, "tensor-parallel ranks: one rank<R>.safetensors each");
  add_flag(*cmd, "pp_size", a.pp_size, "pipeline-parallel size (only 1; accepted for compatibility)");
  add_flag(*cmd, "fp8_scaling", a.fp8_scaling, "per_tensor | per_channel weight scales (with --use_fp8)");
  add_flag(*cmd, "fp8_activations", a.fp8_activations,
           "dynamic_per_token | dynamic_per_tensor: activation scaling when the source has no calibrated input_scale");
  cmd->callback([] {
    if (int rc = convert(a)) throw CLI::RuntimeError(rc);
  });
}
