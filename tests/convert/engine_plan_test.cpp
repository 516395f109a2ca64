// Re-planning an engine at load (issue #6 item 2): what `kiln serve|run|bench ENGINE` does before
// loading (engine_plan_for_run), on the CPU: a plan made on an H100 opened on "cpu" warns naming both
// devices and is re-planned, never refused; a stale GEMM table on the same GPU is re-planned; HF
// directories and unbuilt checkpoints are left alone.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "build/build.h"
#include "convert/convert.h"
#include "core/file.h"
#include "core/log.h"
#include "model/engine_dir.h"

using namespace kiln;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kGolden = std::string(KILN_SOURCE_DIR) + "/tests/golden/";
const std::string kH100 = "NVIDIA H100 80GB HBM3";

struct PlanDir {
  std::string path;
  PlanDir() {
    path = (fs::temp_directory_path() / ("kiln_engine_plan_test_" + std::to_string(::getpid()) + "_" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name()))
               .string();
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~PlanDir() { fs::remove_all(path); }
};

// Log lines while alive (warnings carry the devices' names).
struct LogCapture {
  std::vector<std::string> lines;
  LogCapture() {
    set_log_sink([this](std::string_view l) { lines.emplace_back(l); });
  }
  ~LogCapture() { set_log_sink(nullptr); }
  std::string all() const {
    std::string s;
    for (const auto& l : lines) s += l + "\n";
    return s;
  }
};

// A built llama31 engine (in place) whose plan.json pretends to come from an H100 with a GEMM table.
std::string h100_engine(const PlanDir& t) {
  ConvertOptions o;
  o.model_dir = kGolden + "llama31";
  o.output_dir = t.path + "/engine";
  EXPECT_TRUE(convert_checkpoint(o).is_ok());
  BuildOptions b;
  b.checkpoint_dir = b.output_dir = o.output_dir;
  b.limits.max_batch_size = 16;
  b.limits.max_seq_len = 256;
  b.limits.max_input_len = 128;
  auto r = build_engine(b);
  EXPECT_TRUE(r.is_ok()) << r.message();
  json j = json::parse(*read_file(o.output_dir + "/plan.json"));
  j["device"] = "cuda";
  j["device_name"] = kH100;
  j["gemm_algorithms"] = {{"cublaslt_version", 130100},
                          {"device_name", kH100},
                          {"entries",
                           {{{"shape", "qkv"},
                             {"kind", "bf16"},
                             {"M", 16},
                             {"N", 96},
                             {"K", 64},
                             {"outer_vec", false},
                             {"algo", std::string(128, '0')},
                             {"us", 3.1},
                             {"heuristic_us", 3.4}}}}};
  EXPECT_TRUE(write_file(o.output_dir + "/plan.json", j.dump(2)).is_ok());
  return o.output_dir;
}

}  // namespace

TEST(EnginePlanForRun, H100PlanOpenedOnCpuWarnsAndReplans) {
  PlanDir t;
  const std::string dir = h100_engine(t);
  LogCapture log;
  auto p = engine_plan_for_run(dir, "cpu");
  ASSERT_TRUE(p.is_ok()) << p.message() << " (a device mismatch must never refuse)";
  ASSERT_TRUE(p->has_value()) << "a built engine has a plan";
  const std::string warn = log.all();
  EXPECT_NE(warn.find(kH100), std::string::npos) << warn;
  EXPECT_NE(warn.find("'cpu'"), std::string::npos) << warn;
  EXPECT_NE(warn.find("re-planning"), std::string::npos) << warn;
  EXPECT_EQ((*p)->device, "cpu");
  EXPECT_EQ((*p)->device_name, "cpu");
  EXPECT_TRUE((*p)->gemm_algorithms.empty()) << "the H100's GEMM table must not survive on another device";
  EXPECT_EQ((*p)->limits.max_batch_size, 16) << "limits survive re-planning";
  EXPECT_EQ((*p)->cuda_graph_batch_sizes, (std::vector<int32_t>{1, 2, 4, 8, 16}));
  json saved = json::parse(*read_file(dir + "/plan.json"));
  EXPECT_EQ(saved["device_name"], "cpu") << "the new plan is written back";
  EXPECT_TRUE(saved["gemm_algorithms"].empty());
  // Opened again on the CPU: the plan is current now, no warning, no rewrite.
  LogCapture again;
  auto q = engine_plan_for_run(dir, "cpu");
  ASSERT_TRUE(q.is_ok() && q->has_value()) << q.message();
  EXPECT_EQ(again.all().find("re-planning"), std::string::npos) << again.all();
}

TEST(EnginePlanForRun, SameGpuKeepsItsPlanUnlessTheCheckFindsItStale) {
  PlanDir t;
  const std::string dir = h100_engine(t);
  const std::string before = *read_file(dir + "/plan.json");
  int planned = 0;
  set_gemm_planner([&](const KilnDirInfo&, EnginePlan* plan) {
    ++planned;
    plan->gemm_algorithms = {{"cublaslt_version", 130200}, {"device_name", kH100}, {"entries", json::array()}};
    return Status::ok();
  });
  {
    LogCapture log;
    auto p = engine_plan_for_run(dir, kH100, [](const EnginePlan&) { return std::string(); });
    ASSERT_TRUE(p.is_ok() && p->has_value()) << p.message();
    EXPECT_EQ(planned, 0) << "same device, usable table: no re-plan";
    EXPECT_EQ((*p)->gemm_algorithms["entries"].size(), 1u);
    EXPECT_EQ(*read_file(dir + "/plan.json"), before) << "an unchanged plan is not rewritten";
    EXPECT_EQ(log.all().find("re-planning"), std::string::npos) << log.all();
  }
  {
    // The CUDA side's check: the table was chosen with another cuBLASLt.
    LogCapture log;
    auto p = engine_plan_for_run(dir, kH100, [](const EnginePlan& plan) {
      return plan.gemm_algorithms.value("cublaslt_version", 0) == 130200
                 ? std::string()
                 : std::string("GEMM algorithms were chosen with cuBLASLt 130100, this is 130200");
    });
    ASSERT_TRUE(p.is_ok() && p->has_value()) << p.message();
    EXPECT_EQ(planned, 1);
    EXPECT_NE(log.all().find("cuBLASLt 130100"), std::string::npos) << log.all();
    EXPECT_NE(log.all().find("re-planning"), std::string::npos) << log.all();
    EXPECT_EQ((*p)->gemm_algorithms["cublaslt_version"], 130200);
    EXPECT_EQ((*p)->device_name, kH100);
  }
  set_gemm_planner(nullptr);
}

TEST(EnginePlanForRun, PlannerFailureIsAWarningNotARefusal) {
  PlanDir t;
  const std::string dir = h100_engine(t);
  set_gemm_planner([](const KilnDirInfo&, EnginePlan*) { return Status::error("CUDA out of memory (test)"); });
  LogCapture log;
  auto p = engine_plan_for_run(dir, "NVIDIA H200");
  set_gemm_planner(nullptr);
  ASSERT_TRUE(p.is_ok() && p->has_value()) << p.message();
  EXPECT_EQ((*p)->device_name, "NVIDIA H200");
  EXPECT_TRUE((*p)->gemm_algorithms.empty());
  EXPECT_NE(log.all().find("CUDA out of memory (test)"), std::string::npos) << log.all();
}

TEST(EnginePlanForRun, HfDirsAndUnbuiltCheckpointsAreLeftAlone) {
  PlanDir t;
  auto hf = engine_plan_for_run(kGolden + "llama31", "cpu");
  ASSERT_TRUE(hf.is_ok()) << hf.message();
  EXPECT_FALSE(hf->has_value());
  ConvertOptions o;
  o.model_dir = kGolden + "llama31";
  o.output_dir = t.path + "/ckpt";
  ASSERT_TRUE(convert_checkpoint(o).is_ok());
  auto ck = engine_plan_for_run(o.output_dir, kH100);
  ASSERT_TRUE(ck.is_ok()) << ck.message();
  EXPECT_FALSE(ck->has_value());
  EXPECT_FALSE(file_exists(o.output_dir + "/plan.json")) << "a checkpoint stays a checkpoint";
  auto missing = engine_plan_for_run(t.path + "/nope", "cpu");
  ASSERT_TRUE(missing.is_ok());
  EXPECT_FALSE(missing->has_value());
}
