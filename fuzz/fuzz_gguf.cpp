// libFuzzer target for the GGUF reader: any byte string must parse or fail with a message naming
// the file, never crash; whatever parses must have every tensor inside the buffer and, where the
// type allows, dequantize.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "formats/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  auto f = kiln::GgufFile::from_bytes(bytes, "fuzz.gguf");
  if (!f.is_ok()) {
    KILN_CHECK(f.message().rfind("fuzz.gguf: ", 0) == 0);
    return 0;
  }
  // Touch every metadata accessor.
  for (const auto& [key, v] : f->metadata()) {
    (void)v.as_int();
    (void)v.as_float();
    (void)v.as_bool();
    (void)v.to_string();
    (void)v.as_int_array();
    (void)v.as_float_array();
    if (const auto* s = v.as_string_array()) KILN_CHECK(s->size() == v.size());
  }
  std::vector<float> out;
  for (const auto& t : f->tensors()) {
    KILN_CHECK(t.numel() > 0);
    KILN_CHECK(t.nbytes == kiln::ggml_row_bytes(t.type, t.ne[0]) * size_t(t.numel() / t.ne[0]));
    if (!kiln::ggml_type_dequantizable(t.type) || t.numel() > (1 << 20)) continue;
    out.resize(size_t(t.numel()));
    KILN_CHECK(f->dequantize(t, out.data()).is_ok());
  }
  return 0;
}
