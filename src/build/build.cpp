#include "build/build.h"

#include <algorithm>
#include <filesystem>
#include <mutex>

#include "core/file.h"
#include "core/log.h"

namespace kiln {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::mutex g_planner_mu;
GemmPlanner g_planner;

Result<json> read_json(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(std::string text, read_file(path));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) return Status::error(path + ": not valid JSON");
  return j;
}

json limits_json(const BuildLimits& l) {
  return {{"max_batch_size", l.max_batch_size},
          {"max_input_len", l.max_input_len},
          {"max_seq_len", l.max_seq_len},
          {"max_num_tokens", l.max_num_tokens}};
}

Status int_field(const json& j, const char* key, int32_t* out, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) return Status::ok();
  if (!it->is_number_integer()) return Status::error(where + ": " + key + " must be an integer");
  *out = it->get<int32_t>();
  return Status::ok();
}

}  // namespace

void set_gemm_planner(GemmPlanner planner) {
  std::lock_guard<std::mutex> lock(g_planner_mu);
  g_planner = std::move(planner);
}

json EnginePlan::to_json() const {
  return {{"kiln_plan", 1},
          {"device", device},
          {"device_name", device_name},
          {"cuda_graph_batch_sizes", cuda_graph_batch_sizes},
          {"kv_cache",
           {{"block_size", kv.block_size},
            {"dtype", kv.dtype},
            {"bytes_per_token", kv.bytes_per_token},
            {"blocks_for_limits", kv.blocks_for_limits},
            {"bytes_for_limits", kv.bytes_for_limits}}},
          {"gemm_algorithms", gemm_algorithms},
          {"limits", limits_json(limits)}};
}

Result<EnginePlan> EnginePlan::from_json(const json& j, const std::string& where) {
  if (!j.is_object() || !j.contains("kiln_plan")) return Status::error(where + ": not a kiln plan (no kiln_plan)");
  EnginePlan p;
  p.device = j.value("device", std::string("cpu"));
  p.device_name = j.value("device_name", p.device);
  if (auto it = j.find("cuda_graph_batch_sizes"); it != j.end()) {
    if (!it->is_array()) return Status::error(where + ": cuda_graph_batch_sizes must be a list");
    for (auto& v : *it) {
      if (!v.is_number_integer()) return Status::error(where + ": cuda_graph_batch_sizes must hold integers");
      p.cuda_graph_batch_sizes.push_back(v.get<int32_t>());
    }
  }
  if (auto it = j.find("kv_cache"); it != j.end() && it->is_object()) {
    KILN_RETURN_IF_ERROR(int_field(*it, "block_size", &p.kv.block_size, where + ": kv_cache"));
    p.kv.dtype = it->value("dtype", std::string());
    p.kv.bytes_per_token = it->value("bytes_per_token", int64_t(0));
    p.kv.blocks_for_limits = it->value("blocks_for_limits", int64_t(0));
    p.kv.bytes_for_limits = it->value("bytes_for_limits", int64_t(0));
  }
  if (auto it = j.find("gemm_algorithms"); it != j.end()) p.gemm_algorithms = *it;
  if (auto it = j.find("limits"); it != j.end() && it->is_object()) {
    KILN_RETURN_IF_ERROR(int_field(*it, "max_batch_size", &p.limits.max_batch_size, where + ": limits"));
    KILN_RETURN_IF_ERROR(int_field(*it, "max_input_len", &p.limits.max_input_len, where + ": limits"));
    KILN_RETURN_IF_ERROR(int_field(*it, "max_seq_len", &p.limits.max_seq_len, where + ": limits"));
    KILN_RETURN_IF_ERROR(int_field(*it, "max_num_tokens", &p.limits.max_num_tokens, where + ": limits"));
  }
  return p;
}

std::vector<int32_t> graph_batch_buckets(int32_t max_batch_size) {
  std::vector<int32_t> b;
  for (int32_t n = 1; n < max_batch_size; n *= 2) b.push_back(n);
  if (max_batch_size >= 1) b.push_back(max_batch_size);
  return b;
}

KvSizing kv_sizing(const KilnDirInfo& info, const BuildLimits& limits, int32_t block_size) {
  KvSizing kv;
  kv.block_size = block_size;
  int64_t elem = 2;
  if (info.quant.fp8_kv_cache) {
    kv.dtype = "fp8_e4m3";
    elem = 1;
  } else if (info.dtype == "float32") {
    kv.dtype = "float32";
    elem = 4;
  } else {
    kv.dtype = info.dtype;
  }
  const ModelConfig& c = info.config;
  kv.bytes_per_token = 2 * int64_t(c.num_layers) * c.kv_dim() * elem / info.tp_size;
  const int64_t blocks_per_seq = (int64_t(limits.max_seq_len) + block_size - 1) / block_size;
  kv.blocks_for_limits = blocks_per_seq * limits.max_batch_size;
  kv.bytes_for_limits = kv.blocks_for_limits * block_size * kv.bytes_per_token;
  return kv;
}

Result<BuildLimits> resolve_limits(const ModelConfig& c, BuildLimits l) {
  auto positive = [](const char* flag, int32_t v) -> Status {
    if (v < 1) return Status::error(std::string("--") + flag + " (" + std::to_string(v) + ") must be at least 1");
    return Status::ok();
  };
  if (l.max_seq_len == 0) l.max_seq_len = c.max_position_embeddings;
  if (l.max_input_len == 0) l.max_input_len = std::min(1024, l.max_seq_len);
  KILN_RETURN_IF_ERROR(positive("max_batch_size", l.max_batch_size));
  KILN_RETURN_IF_ERROR(positive("max_input_len", l.max_input_len));
  KILN_RETURN_IF_ERROR(positive("max_seq_len", l.max_seq_len));
  KILN_RETURN_IF_ERROR(positive("max_num_tokens", l.max_num_tokens));
  if (l.max_input_len > l.max_seq_len)
    return Status::error("--max_input_len (" + std::to_string(l.max_input_len) + ") must not exceed --max_seq_len (" +
                         std::to_string(l.max_seq_len) + ")");
  if (l.max_seq_len > c.max_position_embeddings)
    log_warn("build: --max_seq_len (" + std::to_string(l.max_seq_len) + ") exceeds the model's max_position_embeddings (" +
             std::to_string(c.max_position_embeddings) + "); quality past it is the model's problem");
  return l;
}

Result<EnginePlan> make_plan(const KilnDirInfo& info, const BuildLimits& limits, const std::string& device_name) {
  EnginePlan p;
  p.device_name = device_name.empty() ? "cpu" : device_name;
  p.device = p.device_name == "cpu" ? "cpu" : "cuda";
  p.limits = limits;
  p.cuda_graph_batch_sizes = graph_batch_buckets(limits.max_batch_size);
  p.kv = kv_sizing(info, limits);
  if (p.device != "cpu") {
    GemmPlanner planner;
    {
      std::lock_guard<std::mutex> lock(g_planner_mu);
      planner = g_planner;
    }
    if (planner) {
      // A plan without GEMM algorithms still runs (on the cuBLASLt heuristic): never fail a build
      // or a load over it.
      Status st = planner(info, &p);
      if (!st) {
        log_warn("build: GEMM planning on '" + p.device_name + "' failed (" + st.message() +
                 "); gemm_algorithms left empty, GEMMs use the cuBLASLt heuristic");
        p.gemm_algorithms = json::object();
      }
    } else log_warn("build: no GEMM planner in this build for '" + p.device_name + "'; gemm_algorithms left empty");
  }
  return p;
}

Result<BuildResult> build_engine(const BuildOptions& o) {
  if (o.checkpoint_dir.empty()) return Status::error("--checkpoint_dir is required");
  if (o.output_dir.empty()) return Status::error("--output_dir is required");
  if (!is_directory(o.checkpoint_dir)) return Status::error(o.checkpoint_dir + ": no such directory");
  if (!is_kiln_dir(o.checkpoint_dir))
    return Status::error(o.checkpoint_dir + ": not a kiln checkpoint (config.json has no kiln_format); run kiln convert first");
  for (const std::string* plugin : {&o.gemm_plugin, &o.gpt_attention_plugin})
    if (*plugin != "auto" && *plugin != "disable" && *plugin != "float16" && *plugin != "bfloat16" && *plugin != "fp8" &&
        *plugin != "float32")
      return Status::error("plugin value '" + *plugin + "' is not one of auto, disable, float16, bfloat16, float32, fp8");
  KILN_ASSIGN_OR_RETURN(KilnDirInfo info, read_kiln_config(o.checkpoint_dir));
  KILN_ASSIGN_OR_RETURN(BuildLimits limits, resolve_limits(info.config, o.limits));
  KILN_ASSIGN_OR_RETURN(EnginePlan plan, make_plan(info, limits, o.device_name));

  std::error_code ec;
  fs::create_directories(o.output_dir, ec);
  if (ec) return Status::error("cannot create output directory " + o.output_dir + ": " + ec.message());
  BuildResult res;
  const bool in_place = fs::equivalent(o.checkpoint_dir, o.output_dir, ec);
  if (!in_place) {
    for (const auto& entry : fs::directory_iterator(o.checkpoint_dir)) {
      const std::string name = entry.path().filename().string();
      if (name == "config.json" || name == "plan.json") continue;
      const fs::path dst = fs::path(o.output_dir) / name;
      fs::remove_all(dst, ec);
      if (entry.is_directory()) {
        fs::copy(entry.path(), dst, fs::copy_options::recursive, ec);
      } else {
        // Weights are large and never modified in place: a hard link costs nothing.
        fs::create_hard_link(entry.path(), dst, ec);
        if (ec) {
          ec.clear();
          fs::copy_file(entry.path(), dst, ec);
        }
      }
      if (ec) return Status::error("copying " + entry.path().string() + " to " + dst.string() + ": " + ec.message());
      res.files.push_back(name);
    }
  }
  json cfg = info.json;
  cfg["build_config"] = limits_json(limits);
  cfg["build_config"]["gemm_plugin"] = o.gemm_plugin;
  cfg["build_config"]["gpt_attention_plugin"] = o.gpt_attention_plugin;
  cfg["build_config"]["plugins_note"] = "accepted for TensorRT-LLM compatibility; kiln uses its own kernels";
  KILN_RETURN_IF_ERROR(write_file(o.output_dir + "/config.json", cfg.dump(2) + "\n"));
  KILN_RETURN_IF_ERROR(write_file(o.output_dir + "/plan.json", plan.to_json().dump(2) + "\n"));
  res.files.push_back("config.json");
  res.files.push_back("plan.json");
  res.plan = std::move(plan);
  return res;
}

Result<EnginePlan> replan_if_needed(const std::string& dir, const std::string& device_name, const PlanCheck& check) {
  const std::string want = device_name.empty() ? "cpu" : device_name;
  KILN_ASSIGN_OR_RETURN(KilnDirInfo info, read_kiln_config(dir));
  const std::string plan_path = dir + "/plan.json";
  BuildLimits limits;
  const bool had_plan = file_exists(plan_path);
  if (had_plan) {
    KILN_ASSIGN_OR_RETURN(json j, read_json(plan_path));
    KILN_ASSIGN_OR_RETURN(EnginePlan p, EnginePlan::from_json(j, plan_path));
    if (p.device_name == want) {
      const std::string why = check ? check(p) : std::string();
      if (why.empty()) return p;
      log_warn(dir + ": plan.json for '" + want + "' cannot be used as it is (" + why + "): re-planning");
    } else {
      log_warn(dir + ": engine was planned for '" + p.device_name + "', running on '" + want + "': re-planning");
    }
    limits = p.limits;
  } else {
    log_info(dir + ": no plan.json (a checkpoint, not a built engine): planning with default limits");
    if (auto b = info.json.find("build_config"); b != info.json.end() && b->is_object()) {
      limits.max_batch_size = b->value("max_batch_size", limits.max_batch_size);
      limits.max_input_len = b->value("max_input_len", limits.max_input_len);
      limits.max_seq_len = b->value("max_seq_len", limits.max_seq_len);
      limits.max_num_tokens = b->value("max_num_tokens", limits.max_num_tokens);
    }
  }
  KILN_ASSIGN_OR_RETURN(limits, resolve_limits(info.config, limits));
  KILN_ASSIGN_OR_RETURN(EnginePlan plan, make_plan(info, limits, want));
  // A plain checkpoint stays a checkpoint: only an engine's plan is rewritten.
  if (!had_plan) return plan;
  Status st = write_file(plan_path, plan.to_json().dump(2) + "\n");
  if (!st) log_warn(dir + ": could not save the new plan (" + st.message() + "); using it for this run only");
  return plan;
}

Result<std::optional<EnginePlan>> engine_plan_for_run(const std::string& path, const std::string& device_name,
                                                      const PlanCheck& check) {
  if (!is_kiln_dir(path) || !file_exists(path + "/plan.json")) return std::optional<EnginePlan>();
  KILN_ASSIGN_OR_RETURN(EnginePlan plan, replan_if_needed(path, device_name, check));
  return std::optional<EnginePlan>(std::move(plan));
}

}  // namespace kiln
