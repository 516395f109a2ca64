// libFuzzer target for the safetensors reader: any byte string must parse or fail with a message
// naming the file, never crash; whatever parses must have every tensor inside the buffer.
#include <cstddef>
#include <cstdint>
#include <string>

#include "formats/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string bytes(reinterpret_cast<const char*>(data), size);
  auto f = kiln::SafetensorsFile::from_bytes(bytes, "fuzz.safetensors");
  if (!f.is_ok()) {
    KILN_CHECK(f.message().rfind("fuzz.safetensors: ", 0) == 0);
    return 0;
  }
  volatile uint8_t sink = 0;
  for (const auto& t : f->tensors()) {
    KILN_CHECK(t.nbytes == size_t(t.numel()) * kiln::dtype_size(t.dtype));
    KILN_CHECK(f->find(t.name) == &t);
    // Read the first and last byte: ASan flags any pointer outside the buffer. (Bytes, not
    // elements: tensor data need not be aligned to the element size.)
    if (t.nbytes) sink = sink + t.data[0] + t.data[t.nbytes - 1];
  }
  return 0;
}
