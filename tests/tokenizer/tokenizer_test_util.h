// Helpers shared by the tokenizer tests.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/file.h"
#include "tokenizer/tokenizer.h"

namespace kiln::test {

inline std::string assets_dir() { return std::string(KILN_SOURCE_DIR) + "/../shared/assets"; }
inline bool have_assets() { return is_directory(assets_dir()); }

// One tokenizer per path for the whole test binary (tokenizer.json files take ~0.2 s to parse).
std::shared_ptr<const Tokenizer> shared_tokenizer(const std::string& path);

inline std::string ids_str(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s + "]";
}

}  // namespace kiln::test

#define KILN_REQUIRE_ASSETS()                                                                  \
  do {                                                                                         \
    if (!::kiln::test::have_assets())                                                          \
      GTEST_SKIP() << "../shared/assets not found at " << ::kiln::test::assets_dir() << ": skipped"; \
  } while (0)
