#include "formats/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "core/file.h"
#include "formats/formats_test_util.h"

using namespace kiln;
using kiln::test::ScratchDir;

namespace {

// A raw safetensors file from a header JSON string and `data_bytes` bytes of data (0, 1, 2, ...).
std::string make_raw(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  out += header;
  for (size_t i = 0; i < data_bytes; ++i) out.push_back(char(i & 0xff));
  return out;
}

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = uint8_t(seed + i * 7);
  return v;
}

bool contains(const std::string& hay, const std::string& needle) { return hay.find(needle) != std::string::npos; }

}  // namespace

TEST(Safetensors, RoundTripEveryDtype) {
  ScratchDir dir;
  const DType all[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kF8E4M3, DType::kI8,
                       DType::kU8,  DType::kI32, DType::kI64,  DType::kBool};
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<SafeTensorWrite> ws;
  uint8_t seed = 1;
  for (DType d : all) {
    std::vector<int64_t> shape = {3, 5};
    bufs.push_back(pattern(15 * dtype_size(d), seed++));
    ws.push_back({"t." + std::string(dtype_name(d)), d, shape, bufs.back().data(), bufs.back().size()});
  }
  // A scalar and an empty tensor are legal too.
  float scalar = 2.5f;
  ws.push_back({"scalar", DType::kF32, {}, &scalar, 4});
  ws.push_back({"empty", DType::kF16, {0, 4}, nullptr, 0});
  const std::string path = dir.file("model.safetensors");
  ASSERT_TRUE(safetensors_write(path, ws, {{"format", "pt"}, {"note", "kiln test"}}).is_ok());

  auto f = SafetensorsFile::open(path);
  ASSERT_TRUE(f.is_ok()) << f.message();
  EXPECT_EQ(f->path(), path);
  EXPECT_EQ(f->tensors().size(), ws.size());
  EXPECT_EQ(f->metadata().at("format"), "pt");
  EXPECT_EQ(f->metadata().at("note"), "kiln test");
  for (const auto& w : ws) {
    const SafeTensor* t = f->find(w.name);
    ASSERT_NE(t, nullptr) << w.name;
    EXPECT_EQ(t->dtype, w.dtype) << w.name;
    EXPECT_EQ(t->shape, w.shape) << w.name;
    EXPECT_EQ(t->nbytes, w.nbytes) << w.name;
    EXPECT_EQ(t->file, path);
    if (w.nbytes) {
      EXPECT_EQ(std::memcmp(t->data, w.data, w.nbytes), 0) << w.name;
    }
  }
  EXPECT_EQ(f->find("scalar")->numel(), 1);
  EXPECT_EQ(f->find("empty")->numel(), 0);
  EXPECT_EQ(f->find("nope"), nullptr);
  // The writer pads the header so the data region starts 8-aligned.
  auto raw = read_file(path);
  ASSERT_TRUE(raw.is_ok());
  uint64_t header_len;
  std::memcpy(&header_len, raw->data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  float back;
  std::memcpy(&back, f->find("scalar")->data, 4);
  EXPECT_EQ(back, 2.5f);
}

TEST(Safetensors, CopiesOutliveTheOriginal) {
  ScratchDir dir;
  std::vector<float> v(64);
  std::iota(v.begin(), v.end(), 0.0f);
  const std::string path = dir.file("a.safetensors");
  ASSERT_TRUE(safetensors_write(path, {{"w", DType::kF32, {8, 8}, v.data(), 256}}).is_ok());
  std::vector<SafeTensor> copy;
  SafetensorsFile keep = [&] {
    auto f = SafetensorsFile::open(path);
    EXPECT_TRUE(f.is_ok());
    return *f;  // copy; the Result and its mapping reference go away
  }();
  const SafeTensor* t = keep.find("w");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(std::memcmp(t->data, v.data(), 256), 0);
}

TEST(Safetensors, FromBytesMatchesFile) {
  std::vector<uint16_t> h = {0x3c00, 0x4000};
  ScratchDir dir;
  const std::string path = dir.file("x.safetensors");
  ASSERT_TRUE(safetensors_write(path, {{"h", DType::kF16, {2}, h.data(), 4}}).is_ok());
  auto bytes = read_file(path);
  ASSERT_TRUE(bytes.is_ok());
  auto f = SafetensorsFile::from_bytes(*bytes, "mem");
  ASSERT_TRUE(f.is_ok()) << f.message();
  EXPECT_EQ(load_as_f32(f->find("h")->data, DType::kF16, 1), 2.0f);
}

TEST(Safetensors, Fp8WeightsKeepTheirScales) {
  ScratchDir dir;
  std::vector<uint8_t> w(32);
  for (int i = 0; i < 32; ++i) w[i] = f32_to_fp8e4m3(float(i) / 4);
  float ws = 0.125f, is = 2.0f;
  const std::string path = dir.file("fp8.safetensors");
  ASSERT_TRUE(safetensors_write(path, {{"layer.weight", DType::kF8E4M3, {4, 8}, w.data(), 32},
                                       {"layer.weight_scale", DType::kF32, {}, &ws, 4},
                                       {"layer.input_scale", DType::kF32, {}, &is, 4}})
                  .is_ok());
  auto ck = SafetensorsCheckpoint::open(path);
  ASSERT_TRUE(ck.is_ok()) << ck.message();
  const SafeTensor* t = ck->find("layer.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dtype, DType::kF8E4M3);
  EXPECT_EQ(load_as_f32(t->data, t->dtype, 9), 2.25f);
  ASSERT_NE(ck->find("layer.weight_scale"), nullptr);
  EXPECT_EQ(load_as_f32(ck->find("layer.weight_scale")->data, DType::kF32, 0), 0.125f);
  ASSERT_NE(ck->find("layer.input_scale"), nullptr);
  EXPECT_EQ((ck->names()), (std::vector<std::string>{"layer.input_scale", "layer.weight", "layer.weight_scale"}));
}

TEST(SafetensorsCheckpoint, ShardedIndex) {
  ScratchDir dir;
  std::vector<float> a(6, 1.0f), b(4, 2.0f), c(2, 3.0f);
  ASSERT_TRUE(safetensors_write(dir.file("model-00001-of-00002.safetensors"),
                                {{"a", DType::kF32, {2, 3}, a.data(), 24}, {"b", DType::kF32, {4}, b.data(), 16}})
                  .is_ok());
  ASSERT_TRUE(safetensors_write(dir.file("model-00002-of-00002.safetensors"), {{"c", DType::kF32, {2}, c.data(), 8}})
                  .is_ok());
  ASSERT_TRUE(write_file(dir.file("model.safetensors.index.json"),
                         R"({"metadata": {"total_size": 48}, "weight_map": {
                              "a": "model-00001-of-00002.safetensors",
                              "b": "model-00001-of-00002.safetensors",
                              "c": "model-00002-of-00002.safetensors"}})")
                  .is_ok());
  auto ck = SafetensorsCheckpoint::open(dir.str());
  ASSERT_TRUE(ck.is_ok()) << ck.message();
  EXPECT_EQ(ck->names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(ck->files().size(), 2u);
  EXPECT_EQ(ck->metadata().at("total_size"), "48");
  ASSERT_NE(ck->find("c"), nullptr);
  EXPECT_EQ(load_as_f32(ck->find("c")->data, DType::kF32, 1), 3.0f);
  EXPECT_TRUE(contains(ck->find("c")->file, "model-00002-of-00002.safetensors"));
  EXPECT_EQ(ck->find("a")->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(ck->find("zzz"), nullptr);

  // The index file itself opens the same checkpoint.
  auto by_index = SafetensorsCheckpoint::open(dir.file("model.safetensors.index.json"));
  ASSERT_TRUE(by_index.is_ok()) << by_index.message();
  EXPECT_EQ(by_index->names(), ck->names());

  // A copy stays usable after the original is gone.
  SafetensorsCheckpoint copy = *ck;
  ck = Status::error("dropped");
  EXPECT_EQ(load_as_f32(copy.find("b")->data, DType::kF32, 3), 2.0f);
}

TEST(SafetensorsCheckpoint, MissingShardIsNamed) {
  ScratchDir dir;
  float a = 1;
  ASSERT_TRUE(safetensors_write(dir.file("s1.safetensors"), {{"a", DType::kF32, {1}, &a, 4}}).is_ok());
  ASSERT_TRUE(write_file(dir.file("model.safetensors.index.json"),
                         R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})")
                  .is_ok());
  auto ck = SafetensorsCheckpoint::open(dir.str());
  ASSERT_FALSE(ck.is_ok());
  EXPECT_TRUE(contains(ck.message(), "s2.safetensors")) << ck.message();
  EXPECT_TRUE(contains(ck.message(), "'b'")) << ck.message();
  EXPECT_TRUE(contains(ck.message(), "missing")) << ck.message();
}

TEST(SafetensorsCheckpoint, IndexNamesTensorTheShardLacks) {
  ScratchDir dir;
  float a = 1;
  ASSERT_TRUE(safetensors_write(dir.file("s1.safetensors"), {{"a", DType::kF32, {1}, &a, 4}}).is_ok());
  ASSERT_TRUE(write_file(dir.file("model.safetensors.index.json"),
                         R"({"weight_map": {"a": "s1.safetensors", "ghost": "s1.safetensors"}})")
                  .is_ok());
  auto ck = SafetensorsCheckpoint::open(dir.str());
  ASSERT_FALSE(ck.is_ok());
  EXPECT_TRUE(contains(ck.message(), "'ghost'")) << ck.message();
}

TEST(SafetensorsCheckpoint, BadIndexPaths) {
  ScratchDir dir;
  ASSERT_TRUE(write_file(dir.file("model.safetensors.index.json"), R"({"weight_map": {"a": "../x.safetensors"}})")
                  .is_ok());
  auto ck = SafetensorsCheckpoint::open(dir.str());
  ASSERT_FALSE(ck.is_ok());
  EXPECT_TRUE(contains(ck.message(), "model.safetensors.index.json")) << ck.message();
  ASSERT_TRUE(write_file(dir.file("model.safetensors.index.json"), "{not json").is_ok());
  ck = SafetensorsCheckpoint::open(dir.str());
  ASSERT_FALSE(ck.is_ok());
  EXPECT_TRUE(contains(ck.message(), "JSON")) << ck.message();
}

TEST(SafetensorsCheckpoint, DirectoryForms) {
  ScratchDir dir;
  float a = 1, b = 2;
  // No index, no model.safetensors: every *.safetensors file.
  ASSERT_TRUE(safetensors_write(dir.file("x.safetensors"), {{"a", DType::kF32, {1}, &a, 4}}).is_ok());
  ASSERT_TRUE(safetensors_write(dir.file("y.safetensors"), {{"b", DType::kF32, {1}, &b, 4}}).is_ok());
  auto ck = SafetensorsCheckpoint::open(dir.str());
  ASSERT_TRUE(ck.is_ok()) << ck.message();
  EXPECT_EQ(ck->names(), (std::vector<std::string>{"a", "b"}));
  // model.safetensors wins over the others.
  ASSERT_TRUE(safetensors_write(dir.file("model.safetensors"), {{"m", DType::kF32, {1}, &a, 4}}).is_ok());
  ck = SafetensorsCheckpoint::open(dir.str() + "/");
  ASSERT_TRUE(ck.is_ok()) << ck.message();
  EXPECT_EQ(ck->names(), (std::vector<std::string>{"m"}));
  // A tensor in two files is an error naming both.
  ScratchDir* unused = nullptr;
  (void)unused;
  ASSERT_TRUE(std::remove(dir.file("model.safetensors").c_str()) == 0);
  ASSERT_TRUE(safetensors_write(dir.file("y.safetensors"), {{"a", DType::kF32, {1}, &b, 4}}).is_ok());
  ck = SafetensorsCheckpoint::open(dir.str());
  ASSERT_FALSE(ck.is_ok());
  EXPECT_TRUE(contains(ck.message(), "x.safetensors") && contains(ck.message(), "y.safetensors")) << ck.message();
}

TEST(SafetensorsCheckpoint, EmptyOrMissing) {
  ScratchDir dir;
  auto ck = SafetensorsCheckpoint::open(dir.str());
  ASSERT_FALSE(ck.is_ok());
  EXPECT_TRUE(contains(ck.message(), dir.str())) << ck.message();
  ck = SafetensorsCheckpoint::open(dir.file("nope"));
  ASSERT_FALSE(ck.is_ok());
  EXPECT_TRUE(contains(ck.message(), "nope")) << ck.message();
}

TEST(Safetensors, UnsupportedDtypeNamesFileTensorAndDtype) {
  for (const char* dt : {"F64", "I16", "U16", "F8_E5M2", "C64", "Q4"}) {
    std::string hdr = std::string(R"({"ok":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)") +
                      R"("model.layers.0.w":{"dtype":")" + dt + R"(","shape":[1],"data_offsets":[4,12]}})";
    auto f = SafetensorsFile::from_bytes(make_raw(hdr, 12), "dt.safetensors");
    ASSERT_FALSE(f.is_ok()) << dt;
    const std::string& m = f.message();
    EXPECT_TRUE(contains(m, "dt.safetensors: ")) << m;
    EXPECT_TRUE(contains(m, "tensor 'model.layers.0.w' has dtype '" + std::string(dt) + "'")) << m;
    EXPECT_TRUE(contains(m, "which kiln does not support (supported: F32, F16, BF16, F8_E4M3")) << m;
  }
}

// {header JSON, data bytes, expected message fragment}
struct BadCase {
  std::string header;
  size_t data_bytes;
  std::string expect;
};

TEST(Safetensors, CorruptHeadersTable) {
  const BadCase cases[] = {
      {"{not json", 0, "not valid JSON"},
      {"[1,2]", 0, "not an object"},
      {R"({"w":5})", 0, "tensor 'w': entry is not an object"},
      {R"({"w":{"shape":[1],"data_offsets":[0,4]}})", 4, "'dtype'"},
      {R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", 4, "'shape'"},
      {R"({"w":{"dtype":"F32","shape":[1]}})", 4, "data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4, "data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, "negative"},
      {R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4, "non-integer"},
      {R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 8, "needs 8"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4, "bad data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4, "bad data_offsets"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 3, "past the end"},
      {R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}})", 4, "overflows"},
      {R"({"w":{"dtype":"F32","shape":[2305843009213693952],"data_offsets":[0,4]}})", 4, "needs more"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}})", 4, "bad data_offsets"},
      {R"({"__metadata__":[1]})", 0, "__metadata__"},
  };
  for (const auto& c : cases) {
    auto f = SafetensorsFile::from_bytes(make_raw(c.header, c.data_bytes), "bad.safetensors");
    ASSERT_FALSE(f.is_ok()) << c.header;
    EXPECT_TRUE(contains(f.message(), "bad.safetensors: ")) << f.message();
    EXPECT_TRUE(contains(f.message(), c.expect)) << c.header << " -> " << f.message();
  }
}

TEST(Safetensors, BadHeaderLength) {
  std::string raw = make_raw("{}", 0);
  uint64_t huge = 200ull * 1000 * 1000;
  std::memcpy(raw.data(), &huge, 8);
  auto f = SafetensorsFile::from_bytes(raw, "h.safetensors");
  ASSERT_FALSE(f.is_ok());
  EXPECT_TRUE(contains(f.message(), "100 MB")) << f.message();
  uint64_t past = 1000;
  std::memcpy(raw.data(), &past, 8);
  f = SafetensorsFile::from_bytes(raw, "h.safetensors");
  ASSERT_FALSE(f.is_ok());
  EXPECT_TRUE(contains(f.message(), "past the end")) << f.message();
  f = SafetensorsFile::from_bytes("abc", "h.safetensors");
  ASSERT_FALSE(f.is_ok());
  EXPECT_TRUE(contains(f.message(), "too small")) << f.message();
  // An empty header object is a valid file with no tensors.
  f = SafetensorsFile::from_bytes(make_raw("{}", 0), "h.safetensors");
  ASSERT_TRUE(f.is_ok()) << f.message();
  EXPECT_TRUE(f->tensors().empty());
}

TEST(Safetensors, TruncatedAtEveryByte) {
  ScratchDir dir;
  std::vector<float> a(10, 1.5f);
  std::vector<uint16_t> b(6, 0x3c00);
  const std::string path = dir.file("t.safetensors");
  ASSERT_TRUE(safetensors_write(path, {{"a", DType::kF32, {2, 5}, a.data(), 40}, {"b", DType::kBF16, {6}, b.data(), 12}},
                                {{"format", "pt"}})
                  .is_ok());
  auto bytes = read_file(path);
  ASSERT_TRUE(bytes.is_ok());
  for (size_t n = 0; n < bytes->size(); ++n) {
    auto f = SafetensorsFile::from_bytes(bytes->substr(0, n), "trunc.safetensors");
    ASSERT_FALSE(f.is_ok()) << "prefix of " << n << " bytes parsed";
    EXPECT_EQ(f.message().rfind("trunc.safetensors: ", 0), 0u) << f.message();
  }
  // The file itself, also through the path, is fine.
  ASSERT_TRUE(SafetensorsFile::open(path).is_ok());
  auto missing = SafetensorsFile::open(dir.file("missing.safetensors"));
  ASSERT_FALSE(missing.is_ok());
  EXPECT_TRUE(contains(missing.message(), "missing.safetensors")) << missing.message();
}

TEST(Safetensors, WriterRejectsInconsistentInput) {
  ScratchDir dir;
  float a[2] = {1, 2};
  auto s = safetensors_write(dir.file("w.safetensors"), {{"a", DType::kF32, {3}, a, 8}});
  ASSERT_FALSE(s.is_ok());
  EXPECT_TRUE(contains(s.message(), "'a'")) << s.message();
  s = safetensors_write(dir.file("w.safetensors"), {{"a", DType::kF32, {2}, a, 8}, {"a", DType::kF32, {2}, a, 8}});
  ASSERT_FALSE(s.is_ok());
  EXPECT_FALSE(file_exists(dir.file("w.safetensors")));
}
