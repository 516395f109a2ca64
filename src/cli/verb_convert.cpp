// kiln convert --model_dir HF_DIR|FILE.gguf --output_dir CKPT [--dtype] [--use_fp8] [--fp8_kv_cache]
// [--tp_size N] [--fp8_exclude PATTERNS] [--calib_file TEXT]: TensorRT-LLM's convert_checkpoint.py
// (and ModelOpt's FP8 max calibration), as one verb (src/convert/convert.h).
#include <algorithm>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "backend/cpu/cpu_fp8.h"
#include "core/file.h"
#include "tokenizer/tokenizer.h"

#include "cli/cli.h"
#include "convert/convert.h"
#include "model/engine_dir.h"

namespace kiln::cli {
namespace {

struct ConvertArgs {
  std::string model_dir, output_dir, dtype = "auto", fp8_scaling = "per_tensor", fp8_activations = "dynamic_per_token";
  std::string fp8_exclude, calib_file;
  bool use_fp8 = false, fp8_kv_cache = false;
  int32_t tp_size = 1, pp_size = 1, calib_ctx = 512;
};

// ModelOpt's "max" calibration on the CPU: the source model as it is, run over the text.
Result<std::map<std::string, Fp8CalibStats>> calibrate(const ConvertArgs& a) {
  KILN_ASSIGN_OR_RETURN(std::string text, read_file(a.calib_file));
  KILN_ASSIGN_OR_RETURN(auto model, load_model(a.model_dir));
  auto tok = Tokenizer::load(a.model_dir);
  if (!tok) return Status::error("--calib_file: cannot load a tokenizer from " + a.model_dir + ": " + tok.message());
  const std::vector<int32_t> ids = (*tok)->encode(text, /*add_special_tokens=*/true);
  if (ids.size() < 2) return Status::error(a.calib_file + ": fewer than 2 tokens");
  std::fprintf(stderr, "kiln convert: calibrating activation scales on %s (%zu tokens, windows of %d)\n",
               a.calib_file.c_str(), ids.size(), a.calib_ctx);
  return fp8_calibrate(model, ids, a.calib_ctx);
}

// calibration.json beside the checkpoint: per linear amax, RMS and their ratio, worst ratio first
// (a cheap sensitivity ranking for --fp8_exclude).
Status write_calibration_report(const std::string& path, const std::map<std::string, Fp8CalibStats>& stats) {
  std::vector<std::pair<std::string, Fp8CalibStats>> v(stats.begin(), stats.end());
  std::stable_sort(v.begin(), v.end(), [](const auto& x, const auto& y) { return x.second.outlier_ratio() > y.second.outlier_ratio(); });
  nlohmann::json j = nlohmann::json::array();
  for (const auto& [name, s] : v)
    j.push_back({{"module", name}, {"amax", s.amax}, {"rms", s.rms()}, {"outlier_ratio", s.outlier_ratio()}});
  return write_file(path, j.dump(1) + "\n");
}

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
  if (!a.fp8_exclude.empty()) {
    auto ex = parse_fp8_exclude(a.fp8_exclude);
    if (!ex) return fail("convert", ex.message());
    o.fp8_exclude = *ex;
  }
  std::map<std::string, Fp8CalibStats> calib;
  if (!a.calib_file.empty()) {
    if (!a.use_fp8) return fail("convert", "--calib_file needs --use_fp8 (it sets the FP8 linears' activation scales)");
    if (a.calib_ctx < 2) return fail("convert", "--calib_ctx (" + std::to_string(a.calib_ctx) + ") must be at least 2");
    auto st = calibrate(a);
    if (!st) return fail("convert", st.message());
    calib = std::move(*st);
    for (const auto& [name, s] : calib) o.input_amax[name] = s.amax;
  }
  auto r = convert_checkpoint(o);
  if (!r) return fail("convert", r.message());
  std::printf("kiln convert: %s (%s) -> %s: %s%s, tp_size %d, %.1f MB in %zu files%s\n", a.model_dir.c_str(),
              r->source_format.c_str(), a.output_dir.c_str(), r->fp8 ? "FP8 E4M3 weights, other tensors " : "",
              r->dtype.c_str(), a.tp_size, double(r->bytes_written) / 1e6, r->files.size(),
              r->prequantized ? " (source was pre-quantized FP8)" : "");
  if (r->fp8 && !r->excluded_linears.empty())
    std::printf("kiln convert: %zu linears kept in %s by exclusion: %.1f%% of linear weights\n", r->excluded_linears.size(),
                r->dtype.c_str(), 100.0 * double(r->dtype_linear_params) / double(r->dtype_linear_params + r->fp8_linear_params));
  if (!calib.empty()) {
    Status st = write_calibration_report(a.output_dir + "/calibration.json", calib);
    if (!st) return fail("convert", st.message());
    std::printf("kiln convert: static activation scales from %s; per-linear stats in calibration.json\n", a.calib_file.c_str());
  }
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
  add_flag(*cmd, "fp8_exclude", a.fp8_exclude,
           "comma-separated fnmatch patterns over HF module names kept in --dtype, not FP8 (ModelOpt's exclude_modules; "
           "e.g. lm_head,model.layers.0.*,*down_proj). A fused group (q/k/v, gate/up) with any part matched is kept whole. "
           "embed_tokens and lm_head are always kept");
  add_flag(*cmd, "calib_file", a.calib_file,
           "UTF-8 text to calibrate static FP8 activation scales on (input_scale = max |x| / 448 per linear, ModelOpt's "
           "max calibration), run on the CPU with the source weights; writes calibration.json");
  add_flag(*cmd, "calib_ctx", a.calib_ctx, "calibration window length in tokens (with --calib_file)");
  cmd->callback([] {
    if (int rc = convert(a)) throw CLI::RuntimeError(rc);
  });
}
