#include "formats/gguf.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/file.h"
#include "formats/formats_test_util.h"

using namespace kiln;
using kiln::test::ScratchDir;

namespace {

bool contains(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

using Meta = std::vector<std::pair<std::string, GgufValue>>;

std::string serialize(const Meta& md, const std::vector<GgufTensorWrite>& ts, uint32_t alignment = 32) {
  auto r = gguf_serialize(md, ts, alignment);
  EXPECT_TRUE(r.is_ok()) << r.message();
  return r.is_ok() ? *r : std::string();
}

// Little-endian pieces for hand-built files.
struct Bytes {
  std::string s;
  template <class T>
  Bytes& put(T v) {
    s.append(reinterpret_cast<const char*>(&v), sizeof v);
    return *this;
  }
  Bytes& str(const std::string& v) {
    put<uint64_t>(v.size());
    s += v;
    return *this;
  }
};

Bytes header(uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
  Bytes b;
  b.put<uint32_t>(0x46554747).put<uint32_t>(version).put<uint64_t>(n_tensors).put<uint64_t>(n_kv);
  return b;
}

}  // namespace

TEST(Gguf, MetadataRoundTripEveryType) {
  Meta md = {
      {"u8", uint8_t(200)},
      {"i8", int8_t(-100)},
      {"u16", uint16_t(60000)},
      {"i16", int16_t(-30000)},
      {"u32", uint32_t(4000000000u)},
      {"i32", int32_t(-2000000000)},
      {"f32", 1.5f},
      {"bool", true},
      {"string", std::string("hello \xe4\xb8\x96\xe7\x95\x8c")},
      {"u64", uint64_t(18446744073709551615ull)},
      {"i64", int64_t(-9000000000000000000ll)},
      {"f64", 2.25},
      {"arr.u8", std::vector<uint8_t>{1, 2, 255}},
      {"arr.i8", std::vector<int8_t>{-1, 2}},
      {"arr.u16", std::vector<uint16_t>{65535}},
      {"arr.i16", std::vector<int16_t>{-5, 5}},
      {"arr.u32", std::vector<uint32_t>{7, 8, 9}},
      {"arr.i32", std::vector<int32_t>{-7, 8}},
      {"arr.f32", std::vector<float>{0.5f, -1.25f}},
      {"arr.bool", std::vector<bool>{true, false, true}},
      {"arr.u64", std::vector<uint64_t>{1ull << 40}},
      {"arr.i64", std::vector<int64_t>{-(1ll << 40)}},
      {"arr.f64", std::vector<double>{1e300}},
      {"arr.str", std::vector<std::string>{"a", "", "<|im_start|>"}},
      {"arr.empty", std::vector<std::string>{}},
      {"arr.empty_i32", std::vector<int32_t>{}},
  };
  auto f = GgufFile::from_bytes(serialize(md, {}), "meta.gguf");
  ASSERT_TRUE(f.is_ok()) << f.message();
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 32u);
  EXPECT_EQ(f->metadata().size(), md.size());
  const GgufType want[] = {GgufType::kU8,  GgufType::kI8,   GgufType::kU16,    GgufType::kI16,
                           GgufType::kU32, GgufType::kI32,  GgufType::kF32,    GgufType::kBool,
                           GgufType::kString, GgufType::kU64, GgufType::kI64, GgufType::kF64};
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(f->get(md[i].first)->type(), want[i]) << md[i].first;
  EXPECT_EQ(f->get_int("u8"), 200);
  EXPECT_EQ(f->get_int("i8"), -100);
  EXPECT_EQ(f->get_int("u16"), 60000);
  EXPECT_EQ(f->get_int("i16"), -30000);
  EXPECT_EQ(f->get_int("u32"), 4000000000ll);
  EXPECT_EQ(f->get_int("i32"), -2000000000);
  EXPECT_EQ(f->get_float("f32"), 1.5);
  EXPECT_EQ(f->get("bool")->as_bool(), true);
  EXPECT_EQ(f->get_string("string"), "hello \xe4\xb8\x96\xe7\x95\x8c");
  EXPECT_EQ(f->get_int("u64"), std::nullopt);  // above INT64_MAX
  EXPECT_EQ(f->get("u64")->scalar_bits(), 18446744073709551615ull);
  EXPECT_EQ(f->get_int("i64"), -9000000000000000000ll);
  EXPECT_EQ(f->get_float("f64"), 2.25);
  EXPECT_EQ(f->get_float("i32"), -2e9);        // ints read as floats
  EXPECT_EQ(f->get_int("f32"), std::nullopt);  // floats do not read as ints
  EXPECT_EQ(f->get_string("u8"), std::nullopt);
  EXPECT_EQ(f->get("missing"), nullptr);

  EXPECT_EQ(f->get("arr.u8")->as_int_array(), (std::vector<int64_t>{1, 2, 255}));
  EXPECT_EQ(f->get("arr.i8")->as_int_array(), (std::vector<int64_t>{-1, 2}));
  EXPECT_EQ(f->get("arr.u16")->as_int_array(), (std::vector<int64_t>{65535}));
  EXPECT_EQ(f->get("arr.i16")->as_int_array(), (std::vector<int64_t>{-5, 5}));
  EXPECT_EQ(f->get("arr.u32")->as_int_array(), (std::vector<int64_t>{7, 8, 9}));
  EXPECT_EQ(f->get("arr.i32")->as_int_array(), (std::vector<int64_t>{-7, 8}));
  EXPECT_EQ(f->get("arr.f32")->as_float_array(), (std::vector<double>{0.5, -1.25}));
  EXPECT_TRUE(f->get("arr.f32")->as_int_array().empty());
  EXPECT_EQ(f->get("arr.bool")->as_int_array(), (std::vector<int64_t>{1, 0, 1}));
  EXPECT_EQ(f->get("arr.bool")->elem_type(), GgufType::kBool);
  EXPECT_EQ(f->get("arr.u64")->as_int_array(), (std::vector<int64_t>{1ll << 40}));
  EXPECT_EQ(f->get("arr.i64")->as_int_array(), (std::vector<int64_t>{-(1ll << 40)}));
  EXPECT_EQ(f->get("arr.f64")->as_float_array(), (std::vector<double>{1e300}));
  EXPECT_EQ(f->get("arr.i32")->as_float_array(), (std::vector<double>{-7, 8}));
  ASSERT_NE(f->get("arr.str")->as_string_array(), nullptr);
  EXPECT_EQ(*f->get("arr.str")->as_string_array(), (std::vector<std::string>{"a", "", "<|im_start|>"}));
  EXPECT_EQ(f->get("arr.str")->size(), 3u);
  EXPECT_EQ(f->get("arr.empty")->size(), 0u);
  EXPECT_EQ(f->get("arr.empty")->elem_type(), GgufType::kString);
  EXPECT_EQ(f->get("arr.empty_i32")->size(), 0u);
  EXPECT_EQ(f->get("arr.u8")->size(), 3u);
  EXPECT_EQ(f->get("u8")->size(), 0u);
  EXPECT_FALSE(f->get("u8")->is_array());
  EXPECT_EQ(f->get("arr.str")->as_string(), nullptr);
  EXPECT_EQ(f->get("arr.u8")->as_int(), std::nullopt);
  EXPECT_EQ(f->get("arr.u32")->to_string(), "[u32 x 3]");
}

TEST(Gguf, TensorsRoundTripAndAlignment) {
  for (uint32_t alignment : {32u, 64u, 8u}) {
    std::vector<float> a(4 * 3);
    for (size_t i = 0; i < a.size(); ++i) a[i] = float(i) - 5.5f;
    std::vector<uint8_t> q(ggml_row_bytes(GgmlType::kQ4_0, 64) * 2, 0x37);
    std::vector<uint16_t> h(5, 0x3c00);
    std::vector<GgufTensorWrite> ts = {
        {"a", GgmlType::kF32, {4, 3}, a.data(), a.size() * 4},
        {"h", GgmlType::kF16, {5}, h.data(), 10},  // 10 bytes: the next tensor needs padding
        {"blk.0.q", GgmlType::kQ4_0, {64, 2, 1}, q.data(), q.size()},
    };
    auto f = GgufFile::from_bytes(serialize({{"general.architecture", "llama"}}, ts, alignment), "t.gguf");
    ASSERT_TRUE(f.is_ok()) << f.message();
    EXPECT_EQ(f->alignment(), alignment);
    EXPECT_EQ(f->get_int("general.alignment").has_value(), alignment != 32);
    ASSERT_EQ(f->tensors().size(), 3u);
    EXPECT_EQ(f->tensors()[0].name, "a");  // file order
    EXPECT_EQ(f->tensors()[2].name, "blk.0.q");
    const auto* t = f->find("a");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->ne, (std::vector<int64_t>{4, 3}));
    EXPECT_EQ(t->numel(), 12);
    EXPECT_EQ(t->nbytes, 48u);
    EXPECT_EQ(std::memcmp(t->data, a.data(), 48), 0);
    const auto* tq = f->find("blk.0.q");
    EXPECT_EQ(tq->type, GgmlType::kQ4_0);
    EXPECT_EQ(tq->ne, (std::vector<int64_t>{64, 2, 1}));
    EXPECT_EQ(tq->nbytes, q.size());
    EXPECT_EQ(std::memcmp(tq->data, q.data(), q.size()), 0);
    for (const auto& x : f->tensors()) EXPECT_EQ(x.offset % alignment, 0u) << x.name;
    std::vector<float> out(12);
    ASSERT_TRUE(f->dequantize(*t, out.data()).is_ok());
    EXPECT_EQ(out, a);
  }
}

TEST(Gguf, WriteToDiskAndOpen) {
  ScratchDir dir;
  std::vector<float> a = {1, 2, 3, 4};
  const std::string path = dir.file("m.gguf");
  ASSERT_TRUE(gguf_write(path, {{"tokenizer.chat_template", "{{ x }}"}}, {{"w", GgmlType::kF32, {4}, a.data(), 16}})
                  .is_ok());
  GgufFile copy = [&] {
    auto f = GgufFile::open(path);
    EXPECT_TRUE(f.is_ok()) << f.message();
    return *f;
  }();
  EXPECT_EQ(copy.path(), path);
  EXPECT_EQ(copy.get_string("tokenizer.chat_template"), "{{ x }}");
  EXPECT_EQ(std::memcmp(copy.find("w")->data, a.data(), 16), 0);
  auto missing = GgufFile::open(dir.file("nope.gguf"));
  ASSERT_FALSE(missing.is_ok());
  EXPECT_TRUE(contains(missing.message(), "nope.gguf")) << missing.message();
}

TEST(Gguf, WriterRejectsBadInput) {
  std::vector<float> a(4);
  EXPECT_FALSE(gguf_serialize({}, {{"w", GgmlType::kF32, {4}, a.data(), 12}}).is_ok());
  EXPECT_FALSE(gguf_serialize({}, {{"w", GgmlType::kQ4_0, {4}, a.data(), 16}}).is_ok());
  EXPECT_FALSE(gguf_serialize({}, {{"w", GgmlType::kF32, {4}, a.data(), 16}}, 24).is_ok());
  EXPECT_FALSE(gguf_serialize({{"general.alignment", uint32_t(64)}}, {}, 32).is_ok());
  EXPECT_FALSE(gguf_serialize({{"k", 1}, {"k", 2}}, {}).is_ok());
}

TEST(Gguf, TypeTable) {
  EXPECT_EQ(ggml_type_name(GgmlType::kQ4_K), "Q4_K");
  EXPECT_EQ(ggml_type_name(GgmlType(4)), "unknown");  // removed Q4_2
  EXPECT_FALSE(ggml_type_known(4));
  EXPECT_TRUE(ggml_type_known(30));
  EXPECT_EQ(ggml_block_elems(GgmlType::kQ6_K), 256);
  EXPECT_EQ(ggml_block_bytes(GgmlType::kQ6_K), 210u);
  EXPECT_EQ(ggml_row_bytes(GgmlType::kQ4_1, 576), 18u * 20u);
  EXPECT_EQ(ggml_row_bytes(GgmlType::kBF16, 3), 6u);
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0, GgmlType::kQ4_0,
                     GgmlType::kQ4_1, GgmlType::kQ5_0, GgmlType::kQ5_1, GgmlType::kQ2_K, GgmlType::kQ3_K,
                     GgmlType::kQ4_K, GgmlType::kQ5_K, GgmlType::kQ6_K, GgmlType::kQ8_K}) {
    EXPECT_TRUE(ggml_type_dequantizable(t)) << ggml_type_name(t);
  }
  EXPECT_FALSE(ggml_type_dequantizable(GgmlType::kIQ2_XXS));
  EXPECT_FALSE(ggml_type_dequantizable(GgmlType::kQ8_1));
}

// Hand-built blocks with values worked out on paper; gguf-py checks the rest (test_formats_gguf_quants.py).
TEST(Gguf, DequantizeHandBuiltBlocks) {
  {  // Q8_0: d = 0.5, qs = -16..15
    uint8_t b[34];
    uint16_t d = f32_to_f16(0.5f);
    std::memcpy(b, &d, 2);
    for (int i = 0; i < 32; ++i) b[2 + i] = uint8_t(int8_t(i - 16));
    float y[32];
    ggml_dequantize_row(GgmlType::kQ8_0, b, y, 32);
    for (int i = 0; i < 32; ++i) EXPECT_EQ(y[i], 0.5f * float(i - 16)) << i;
  }
  {  // Q4_0: d = 2, low nibble j, high nibble 15 - j
    uint8_t b[18];
    uint16_t d = f32_to_f16(2.0f);
    std::memcpy(b, &d, 2);
    for (int j = 0; j < 16; ++j) b[2 + j] = uint8_t(j | ((15 - j) << 4));
    float y[32];
    ggml_dequantize_row(GgmlType::kQ4_0, b, y, 32);
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(y[j], 2.0f * float(j - 8));
      EXPECT_EQ(y[j + 16], 2.0f * float(7 - j));
    }
  }
  {  // Q4_1: d = 0.25, m = -1
    uint8_t b[20];
    uint16_t d = f32_to_f16(0.25f), m = f32_to_f16(-1.0f);
    std::memcpy(b, &d, 2);
    std::memcpy(b + 2, &m, 2);
    for (int j = 0; j < 16; ++j) b[4 + j] = uint8_t(j | (3 << 4));
    float y[32];
    ggml_dequantize_row(GgmlType::kQ4_1, b, y, 32);
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(y[j], 0.25f * float(j) - 1.0f);
      EXPECT_EQ(y[j + 16], 0.25f * 3.0f - 1.0f);
    }
  }
  {  // Q8_K: f32 d = 0.1, qs = -128..127
    std::vector<uint8_t> b(292, 0);
    float d = 0.1f;
    std::memcpy(b.data(), &d, 4);
    for (int i = 0; i < 256; ++i) b[4 + i] = uint8_t(int8_t(i - 128));
    std::vector<float> y(256);
    ggml_dequantize_row(GgmlType::kQ8_K, b.data(), y.data(), 256);
    for (int i = 0; i < 256; ++i) EXPECT_EQ(y[i], 0.1f * float(i - 128));
  }
  {  // F16 (vector and scalar tail paths) and BF16, including subnormals, inf and -0
    std::vector<uint16_t> h = {0x3c00, 0xc000, 0x0001, 0x7c00, 0x8000, 0x3555, 0x7bff, 0x0400, 0x3800, 0x4248, 0xabcd};
    std::vector<float> y(h.size());
    ggml_dequantize_row(GgmlType::kF16, h.data(), y.data(), int64_t(h.size()));
    for (size_t i = 0; i < h.size(); ++i) EXPECT_EQ(f32_to_bits(y[i]), f32_to_bits(f16_to_f32(h[i]))) << i;
    ggml_dequantize_row(GgmlType::kBF16, h.data(), y.data(), int64_t(h.size()));
    for (size_t i = 0; i < h.size(); ++i) EXPECT_EQ(f32_to_bits(y[i]), f32_to_bits(bf16_to_f32(h[i]))) << i;
  }
}

TEST(Gguf, DequantizeUnsupportedTypeIsAnError) {
  std::vector<uint8_t> raw(66, 0);
  auto f = GgufFile::from_bytes(serialize({}, {{"blk.3.ffn_down.weight", GgmlType::kIQ2_XXS, {256}, raw.data(), 66}}),
                                "iq.gguf");
  ASSERT_TRUE(f.is_ok()) << f.message();  // parsing is fine: the layout is known
  std::vector<float> out(256);
  auto s = f->dequantize(f->tensors()[0], out.data());
  ASSERT_FALSE(s.is_ok());
  EXPECT_TRUE(contains(s.message(), "iq.gguf: tensor 'blk.3.ffn_down.weight' has ggml type IQ2_XXS")) << s.message();
}

TEST(Gguf, LargeVocabularyParsesFast) {
  const int n = 151936;  // Qwen2's vocabulary
  std::vector<std::string> tokens(n);
  std::vector<float> scores(n);
  std::vector<int32_t> types(n, 1);
  for (int i = 0; i < n; ++i) {
    tokens[i] = "tok" + std::to_string(i) + "\xc4\xa0x";
    scores[i] = -float(i);
  }
  std::vector<std::string> merges(n);
  for (int i = 0; i < n; ++i) merges[i] = "a" + std::to_string(i) + " b";
  std::string bytes = serialize({{"tokenizer.ggml.model", "gpt2"},
                                 {"tokenizer.ggml.tokens", tokens},
                                 {"tokenizer.ggml.scores", scores},
                                 {"tokenizer.ggml.token_type", types},
                                 {"tokenizer.ggml.merges", merges}},
                                {});
  auto t0 = std::chrono::steady_clock::now();
  auto f = GgufFile::from_bytes(std::move(bytes), "vocab.gguf");
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(f.is_ok()) << f.message();
  EXPECT_EQ(f->get("tokenizer.ggml.tokens")->as_string_array()->at(12345), "tok12345\xc4\xa0x");
  EXPECT_EQ(f->get("tokenizer.ggml.scores")->as_float_array()[7], -7.0);
  EXPECT_EQ(f->get("tokenizer.ggml.token_type")->as_int_array().size(), size_t(n));
  std::printf("parsed %d tokens + %d merges in %.1f ms\n", n, n, ms);
  EXPECT_LT(ms, 100.0);
}

// --- Bad input -----------------------------------------------------------------------------------

TEST(Gguf, TruncatedAtEveryByte) {
  std::vector<float> a(8, 1.0f);
  std::vector<uint8_t> q(18, 0x11);
  std::string bytes = serialize({{"general.architecture", "llama"},
                                 {"llama.block_count", uint32_t(1)},
                                 {"tokenizer.ggml.tokens", std::vector<std::string>{"a", "bc"}},
                                 {"tokenizer.ggml.scores", std::vector<float>{0, 1}}},
                                {{"a", GgmlType::kF32, {8}, a.data(), 32}, {"q", GgmlType::kQ4_0, {32}, q.data(), 18}});
  ASSERT_TRUE(GgufFile::from_bytes(bytes, "trunc.gguf").is_ok());
  // The last tensor ends before the final alignment padding; cut only up to its end.
  size_t end_of_data = bytes.size() - (32 - 18);
  for (size_t n = 0; n < end_of_data; ++n) {
    auto f = GgufFile::from_bytes(bytes.substr(0, n), "trunc.gguf");
    ASSERT_FALSE(f.is_ok()) << "prefix of " << n << " bytes parsed";
    EXPECT_EQ(f.message().rfind("trunc.gguf: ", 0), 0u) << f.message();
  }
}

TEST(Gguf, BadHeadersTable) {
  struct Case {
    std::string name;
    std::string bytes;
    std::string expect;
  };
  std::vector<Case> cases;
  cases.push_back({"empty", "", "too small"});
  cases.push_back({"bad magic", "GGML\x03\0\0\0", "not a GGUF file (magic bytes 47 47 4d 4c"});
  cases.push_back({"v1", header(1, 0, 0).s, "GGUF version 1 is not supported (v2, v3 are)"});
  cases.push_back({"v4", header(4, 0, 0).s, "GGUF version 4 is not supported"});
  cases.push_back({"big-endian", header(0x03000000, 0, 0).s, "big-endian"});
  cases.push_back({"absurd tensor count", header(3, 1ull << 60, 0).s, "tensor count"});
  cases.push_back({"absurd kv count", header(3, 0, 1ull << 62).s, "metadata count"});
  cases.push_back({"huge key length", header(3, 0, 1).put<uint64_t>(1ull << 63).put<uint32_t>(0).put<uint64_t>(0).s,
                   "metadata key #0 has length 9223372036854775808, past the end"});
  cases.push_back({"unknown value type", header(3, 0, 1).str("k").put<uint32_t>(13).put<uint8_t>(0).s,
                   "metadata 'k': unknown value type 13"});
  cases.push_back({"huge string", header(3, 0, 1).str("k").put<uint32_t>(8).put<uint64_t>(1ull << 40).s,
                   "metadata 'k' has length 1099511627776, past the end"});
  cases.push_back({"huge array", header(3, 0, 1).str("k").put<uint32_t>(9).put<uint32_t>(5).put<uint64_t>(1ull << 61).s,
                   "metadata 'k': array of 2305843009213693952 i32"});
  cases.push_back({"huge string array",
                   header(3, 0, 1).str("k").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(1ull << 61).s,
                   "metadata 'k': array of 2305843009213693952 strings"});
  cases.push_back({"string in array past end",
                   header(3, 0, 1).str("tokenizer.ggml.tokens").put<uint32_t>(9).put<uint32_t>(8).put<uint64_t>(2)
                       .str("a").put<uint64_t>(99).s,
                   "metadata 'tokenizer.ggml.tokens': string #1 of 2"});
  cases.push_back({"nested array",
                   header(3, 0, 1).str("k").put<uint32_t>(9).put<uint32_t>(9).put<uint64_t>(1).put<uint64_t>(0).s,
                   "arrays of arrays"});
  cases.push_back({"bad array elem type",
                   header(3, 0, 1).str("k").put<uint32_t>(9).put<uint32_t>(77).put<uint64_t>(1).put<uint64_t>(0).s,
                   "unknown array element type 77"});
  cases.push_back({"duplicate key",
                   header(3, 0, 2).str("k").put<uint32_t>(4).put<uint32_t>(1).str("k").put<uint32_t>(4).put<uint32_t>(2).s,
                   "metadata 'k' appears twice"});
  cases.push_back({"bad alignment",
                   header(3, 0, 1).str("general.alignment").put<uint32_t>(4).put<uint32_t>(48).s,
                   "general.alignment (48) must be a power of two"});
  cases.push_back({"zero alignment",
                   header(3, 0, 1).str("general.alignment").put<uint32_t>(4).put<uint32_t>(0).s,
                   "general.alignment (0)"});
  auto tensor = [](const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t off) {
    Bytes b = header(3, 1, 0);
    b.str(name).put<uint32_t>(uint32_t(ne.size()));
    for (auto d : ne) b.put<uint64_t>(d);
    b.put<uint32_t>(type).put<uint64_t>(off);
    b.s.resize(b.s.size() + 128, '\0');  // room for a data section
    return b.s;
  };
  cases.push_back({"five dims", tensor("w", {1, 1, 1, 1, 1}, 0, 0), "tensor 'w' has 5 dims (at most 4)"});
  cases.push_back({"zero dim", tensor("w", {4, 0}, 0, 0), "tensor 'w' has a bad dim ne[1] = 0"});
  cases.push_back({"overflowing dims", tensor("w", {1ull << 32, 1ull << 32}, 0, 0), "tensor 'w' has a bad dim ne[1]"});
  cases.push_back({"unknown tensor type", tensor("blk.0.attn_q.weight", {32}, 4, 0),
                   "tensor 'blk.0.attn_q.weight' has unknown ggml type id 4"});
  cases.push_back({"unknown tensor type 999", tensor("w", {32}, 999, 0), "unknown ggml type id 999"});
  cases.push_back({"ne0 not a block multiple", tensor("w", {33}, 2, 0), "not a multiple of the Q4_0 block size 32"});
  cases.push_back({"misaligned offset", tensor("w", {4}, 0, 4), "data offset 4 is not a multiple of the alignment 32"});
  cases.push_back({"offset past end", tensor("w", {4}, 0, 1ull << 40), "runs past the end of the file"});
  cases.push_back({"data past end", tensor("w", {4096}, 0, 0), "tensor 'w' (F32, 16384 bytes at data offset 0)"});
  cases.push_back({"offset wraps", tensor("w", {4}, 0, ~uint64_t(31)), "runs past the end"});
  {
    Bytes b = header(3, 2, 0);
    for (int i = 0; i < 2; ++i) b.str("w").put<uint32_t>(1).put<uint64_t>(4).put<uint32_t>(0).put<uint64_t>(0);
    b.s.resize(b.s.size() + 64, '\0');
    cases.push_back({"duplicate tensor", b.s, "tensor 'w' appears twice"});
  }
  cases.push_back({"control chars in names are escaped", tensor(std::string("w\n\x01", 3), {1, 1, 1, 1, 1}, 0, 0),
                   "tensor 'w\\x0a\\x01' has 5 dims"});

  for (const auto& c : cases) {
    auto f = GgufFile::from_bytes(c.bytes, "bad.gguf");
    ASSERT_FALSE(f.is_ok()) << c.name;
    EXPECT_EQ(f.message().rfind("bad.gguf: ", 0), 0u) << c.name << ": " << f.message();
    EXPECT_TRUE(contains(f.message(), c.expect)) << c.name << ": " << f.message();
  }
}

TEST(Gguf, Version2Reads) {
  Bytes b = header(2, 1, 1);
  b.str("general.name").put<uint32_t>(8).str("v2");
  b.str("w").put<uint32_t>(1).put<uint64_t>(2).put<uint32_t>(0).put<uint64_t>(0);
  while (b.s.size() % 32) b.s.push_back('\0');
  b.put<float>(1.0f).put<float>(-2.0f);
  auto f = GgufFile::from_bytes(b.s, "v2.gguf");
  ASSERT_TRUE(f.is_ok()) << f.message();
  EXPECT_EQ(f->version(), 2u);
  EXPECT_EQ(f->get_string("general.name"), "v2");
  float y[2];
  ASSERT_TRUE(f->dequantize(*f->find("w"), y).is_ok());
  EXPECT_EQ(y[1], -2.0f);
  // A 0-dim tensor reads as a scalar.
  Bytes s = header(3, 1, 0);
  s.str("s").put<uint32_t>(0).put<uint32_t>(0).put<uint64_t>(0);
  while (s.s.size() % 32) s.s.push_back('\0');
  s.put<float>(3.0f);
  f = GgufFile::from_bytes(s.s, "s.gguf");
  ASSERT_TRUE(f.is_ok()) << f.message();
  EXPECT_EQ(f->find("s")->ne, (std::vector<int64_t>{1}));
}
