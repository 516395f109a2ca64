// kiln convert: an HF checkpoint directory (BF16/F16/F32, or ModelOpt FP8 pre-quantized) or a
// GGUF file -> a kiln checkpoint directory (engine_dir.h, docs/engine-format.md): fused qkv and
// gate_up, a chosen dtype, optional FP8 E4M3 weights (per-tensor or per-channel scales), optional
// FP8 KV-cache scales, one safetensors file per tensor-parallel rank, tokenizer files copied.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/status.h"
#include "model/weights.h"

namespace kiln {

enum class Fp8Scaling { kPerTensor, kPerChannel };

struct ConvertOptions {
  std::string model_dir;   // HF directory or .gguf file
  std::string output_dir;
  std::string dtype = "auto";  // auto | bfloat16 | float16 | float32 (non-FP8 matrices)
  bool use_fp8 = false;
  bool fp8_kv_cache = false;
  int32_t tp_size = 1;
  Fp8Scaling fp8_scaling = Fp8Scaling::kPerTensor;
  // Activations of FP8 linears when the source has no calibrated input_scale. Per token keeps a
  // request's logits independent of its batch (the CPU backend's invariant); per tensor is what a
  // plain cuBLASLt FP8 GEMM with one scale does.
  ActQuant fp8_activations = ActQuant::kDynamicToken;
  // ModelOpt's exclude_modules: fnmatch patterns over HF module names ("lm_head",
  // "model.layers.0.*", "*down_proj"); matching linears stay in `dtype`. A fused group (qkv,
  // gate_up) with any part matched is excluded whole: one matrix has one format. Added to the
  // patterns a pre-quantized source lists; embed_tokens and lm_head are always excluded.
  std::vector<std::string> fp8_exclude;
  // Calibrated max |x| at the input of each linear, by HF module name (q_proj, ..., down_proj;
  // backend/cpu/cpu_fp8.h fp8_calibrate): with --use_fp8, every FP8 linear gets a static
  // input_scale = amax / 448, as ModelOpt's max calibration writes. Empty: dynamic activations.
  std::map<std::string, float> input_amax;
};

struct ConvertResult {
  std::string source_format;  // "hf" | "gguf"
  bool prequantized = false;  // the source was an FP8 (ModelOpt) checkpoint, kept as it is
  bool fp8 = false;
  std::string dtype;          // resolved dtype of non-FP8 matrices
  int32_t requantized_shards = 0;  // FP8 shards rescaled to a fused tensor's max scale
  std::vector<std::string> excluded_linears;  // fused linears kept in dtype by exclude patterns
  int64_t fp8_linear_params = 0, dtype_linear_params = 0;  // decoder linears by stored format
  size_t bytes_written = 0;
  std::vector<std::string> files;  // written, relative to output_dir
};

Result<ConvertResult> convert_checkpoint(const ConvertOptions& opts);

// Parsers for the CLI (errors name the flag and the accepted values).
Result<std::string> parse_convert_dtype(const std::string& s);
Result<Fp8Scaling> parse_fp8_scaling(const std::string& s);
Result<ActQuant> parse_fp8_activations(const std::string& s);
// "lm_head, model.layers.0.*" -> {"lm_head", "model.layers.0.*"}; an empty item is an error.
Result<std::vector<std::string>> parse_fp8_exclude(const std::string& s);
// fnmatch semantics as Python's fnmatch.fnmatchcase ('*' also crosses '.'), as ModelOpt matches.
bool module_excluded(const std::string& module, const std::vector<std::string>& patterns);

// --- Building blocks, public for tests ------------------------------------------------------
// An FP8 matrix: codes [rows, cols] and one scale (per tensor) or `rows` scales (per channel).
struct Fp8Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> codes;
  std::vector<float> scales;
  float value(int64_t r, int64_t c) const;  // dequantized
};
Fp8Matrix fp8_quantize_matrix(const float* w, int64_t rows, int64_t cols, Fp8Scaling scaling);
// Row-concatenates FP8 shards (e.g. q, k, v): per tensor, the fused scale is the shards' max and a
// shard whose scale differs is requantized to it (each value moves by at most FP8 rounding);
// per channel, codes are copied and each row keeps its shard's scale. `requantized` counts shards
// that were rescaled.
Fp8Matrix fp8_fuse(const std::vector<const Weight*>& shards, Fp8Scaling scaling, int32_t* requantized = nullptr);

}  // namespace kiln
