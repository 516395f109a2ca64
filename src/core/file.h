// Whole-file reads and read-only memory maps, with errors that name the file.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/status.h"

namespace kiln {

Result<std::string> read_file(const std::string& path);
Status write_file(const std::string& path, const std::string& data);
bool file_exists(const std::string& path);
bool is_directory(const std::string& path);

// A read-only private mapping of a whole file. Empty files map to size 0 and data nullptr.
class MappedFile {
 public:
  static Result<std::shared_ptr<MappedFile>> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace kiln
