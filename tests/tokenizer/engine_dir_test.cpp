// A kiln checkpoint/engine converted from a GGUF carries its vocabulary as DIR/tokenizer.gguf.
#include <gtest/gtest.h>

#include <filesystem>

#include "core/file.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;

TEST(TokenizerDir, FallsBackToTokenizerGguf) {
  const std::string src = std::string(KILN_SOURCE_DIR) + "/../shared/assets/vocab-gguf/ggml-vocab-gpt-2.gguf";
  if (!kiln::file_exists(src)) GTEST_SKIP() << "../shared/assets absent: " << src;
  const fs::path dir = fs::temp_directory_path() / "kiln_tok_dir_test";
  fs::remove_all(dir);
  fs::create_directories(dir);
  auto empty = kiln::Tokenizer::load(dir.string());
  ASSERT_FALSE(empty.is_ok());
  EXPECT_NE(empty.message().find("no tokenizer.json (or tokenizer.gguf)"), std::string::npos) << empty.message();
  fs::copy_file(src, dir / "tokenizer.gguf");
  auto from_dir = kiln::Tokenizer::load(dir.string());
  ASSERT_TRUE(from_dir.is_ok()) << from_dir.message();
  auto direct = kiln::Tokenizer::load(src);
  ASSERT_TRUE(direct.is_ok()) << direct.message();
  EXPECT_EQ((*from_dir)->encode("Hello world, 123", false), (*direct)->encode("Hello world, 123", false));
  fs::remove_all(dir);
}
