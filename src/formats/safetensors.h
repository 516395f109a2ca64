// safetensors: memory-mapped reading (single file or sharded checkpoint) and writing.
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
// then the data region; offsets are relative to the start of the data region.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/file.h"
#include "core/status.h"

namespace kiln {

struct SafeTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;  // row-major, as in the file
  // Points into the mapping; not necessarily aligned to the element size (the format only pads
  // the header to 8 bytes by convention), so read through memcpy or load_as_f32.
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::string file;  // path of the file holding it, for messages
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

class SafetensorsFile {
 public:
  static Result<SafetensorsFile> open(const std::string& path);
  // Parse bytes already in memory (fuzzing, tests); `name` stands in for the path in messages.
  static Result<SafetensorsFile> from_bytes(std::string bytes, const std::string& name);

  const std::vector<SafeTensor>& tensors() const { return tensors_; }  // in data-offset order
  const SafeTensor* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }  // "__metadata__"
  const std::string& path() const { return path_; }

 private:
  static Result<SafetensorsFile> parse(std::shared_ptr<const void> owner, const uint8_t* data,
                                       size_t size, const std::string& path);
  std::shared_ptr<const void> owner_;  // the MappedFile (or byte buffer) the tensors point into
  std::string path_;
  std::vector<SafeTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: a directory holding model.safetensors, or model.safetensors.index.json plus its
// shards, or a directory with *.safetensors files and no index, or a single .safetensors file, or
// an *.index.json file (its shards beside it).
class SafetensorsCheckpoint {
 public:
  static Result<SafetensorsCheckpoint> open(const std::string& dir_or_file);

  const SafeTensor* find(std::string_view name) const;
  std::vector<std::string> names() const;  // sorted
  const std::vector<std::string>& files() const { return files_; }  // paths of the opened files
  const std::vector<SafetensorsFile>& shards() const { return shards_; }
  // "__metadata__" of the first file plus the index's "metadata" (index wins), as strings.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::vector<SafetensorsFile> shards_;
  std::vector<std::string> files_;
  // name -> (shard, tensor) positions, not pointers, so copies of the checkpoint stay valid.
  std::map<std::string, std::pair<uint32_t, uint32_t>, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

struct SafeTensorWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;  // must equal numel * dtype_size
};

// Writes tensors in the given order, header padded with spaces to a multiple of 8 bytes (as the
// reference implementation does) so data offsets stay aligned.
Status safetensors_write(const std::string& path, const std::vector<SafeTensorWrite>& tensors,
                         const std::map<std::string, std::string>& metadata = {});

// "F32" -> DType::kF32 etc.; false for names kiln does not support.
bool safetensors_dtype_from_name(std::string_view name, DType* out);

}  // namespace kiln
