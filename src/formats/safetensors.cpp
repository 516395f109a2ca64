#include "formats/safetensors.h"
#include "core/text.h"

#include <dirent.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

namespace kiln {
namespace {

using json = nlohmann::json;

// The reference implementation caps the header at 100 MB; a larger one is corruption.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

constexpr const char* kSupportedList = "F32, F16, BF16, F8_E4M3, I8, U8, I32, I64, BOOL";

struct DTypeName {
  std::string_view name;
  DType dtype;
};
constexpr DTypeName kDTypeNames[] = {
    {"F32", DType::kF32},    {"F16", DType::kF16}, {"BF16", DType::kBF16},
    {"F8_E4M3", DType::kF8E4M3}, {"I8", DType::kI8},   {"U8", DType::kU8},
    {"I32", DType::kI32},    {"I64", DType::kI64}, {"BOOL", DType::kBool},
};

std::string quote(std::string_view s) { return quote_untrusted(s); }

// Reads a non-negative integer that fits int64 from a JSON number.
bool json_to_i64(const json& j, int64_t* out) {
  if (j.is_number_unsigned()) {
    uint64_t v = j.get<uint64_t>();
    if (v > uint64_t(INT64_MAX)) return false;
    *out = int64_t(v);
    return true;
  }
  if (j.is_number_integer()) {
    int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = v;
    return true;
  }
  return false;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty() || dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

}  // namespace

bool safetensors_dtype_from_name(std::string_view name, DType* out) {
  for (const auto& d : kDTypeNames) {
    if (d.name == name) {
      *out = d.dtype;
      return true;
    }
  }
  return false;
}

Result<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> m, MappedFile::open(path));
  const uint8_t* data = m->data();
  size_t size = m->size();
  return parse(std::shared_ptr<const void>(m, m.get()), data, size, path);
}

Result<SafetensorsFile> SafetensorsFile::from_bytes(std::string bytes, const std::string& name) {
  auto buf = std::make_shared<std::string>(std::move(bytes));
  const auto* data = reinterpret_cast<const uint8_t*>(buf->data());
  size_t size = buf->size();
  return parse(std::shared_ptr<const void>(buf, buf.get()), data, size, name);
}

Result<SafetensorsFile> SafetensorsFile::parse(std::shared_ptr<const void> owner, const uint8_t* data,
                                               size_t size, const std::string& path) {
  auto fail = [&](const std::string& msg) { return Status::error(path + ": " + msg); };
  if (size < 8) {
    return fail("file is " + std::to_string(size) + " bytes, too small for a safetensors header");
  }
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= uint64_t(data[i]) << (8 * i);
  if (header_len > kMaxHeaderBytes) {
    return fail("header length " + std::to_string(header_len) +
                " is over the 100 MB limit: not a safetensors file, or corrupt");
  }
  if (header_len > size - 8) {
    return fail("header length " + std::to_string(header_len) + " runs past the end of the file (" +
                std::to_string(size) + " bytes): truncated or not a safetensors file");
  }
  const char* hbegin = reinterpret_cast<const char*>(data + 8);
  json header = json::parse(hbegin, hbegin + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) {
    // Re-parse with exceptions only to get the position; the no-exception parse stays the default.
    std::string why = "invalid JSON";
    try {
      json unused = json::parse(hbegin, hbegin + header_len);
    } catch (const json::exception& e) {
      why = e.what();
    }
    return fail("header is not valid JSON (" + why + ")");
  }
  if (!header.is_object()) return fail("header JSON is not an object");

  const uint8_t* region = data + 8 + header_len;
  const uint64_t region_size = size - 8 - header_len;

  SafetensorsFile f;
  f.owner_ = std::move(owner);
  f.path_ = path;
  f.tensors_.reserve(header.size());
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) return fail("__metadata__ is not an object");
      for (const auto& [k, v] : entry.items()) {
        f.metadata_[k] = v.is_string() ? v.get<std::string>() : v.dump();
      }
      continue;
    }
    const std::string tname = "tensor " + quote(name);
    if (!entry.is_object()) return fail(tname + ": entry is not an object");
    auto dt = entry.find("dtype");
    auto sh = entry.find("shape");
    auto off = entry.find("data_offsets");
    if (dt == entry.end() || !dt->is_string()) return fail(tname + ": missing or non-string 'dtype'");
    if (sh == entry.end() || !sh->is_array()) return fail(tname + ": missing or non-array 'shape'");
    if (off == entry.end() || !off->is_array() || off->size() != 2) {
      return fail(tname + ": 'data_offsets' must be an array [begin, end]");
    }
    SafeTensor t;
    t.name = name;
    t.file = path;
    const std::string dtype_str = dt->get<std::string>();
    if (!safetensors_dtype_from_name(dtype_str, &t.dtype)) {
      return fail(tname + " has dtype " + quote(dtype_str) + ", which kiln does not support (supported: " +
                  kSupportedList + ")");
    }
    int64_t numel = 1;
    for (const auto& d : *sh) {
      int64_t v = 0;
      if (!json_to_i64(d, &v)) return fail(tname + ": shape " + sh->dump() + " has a non-integer or negative dim");
      if (__builtin_mul_overflow(numel, v, &numel)) return fail(tname + ": shape " + sh->dump() + " overflows");
      t.shape.push_back(v);
    }
    int64_t begin = 0, end = 0;
    if (!json_to_i64((*off)[0], &begin) || !json_to_i64((*off)[1], &end) || begin > end) {
      return fail(tname + ": bad data_offsets " + off->dump());
    }
    if (uint64_t(end) > region_size) {
      return fail(tname + ": data_offsets " + off->dump() + " run past the end of the data (" +
                  std::to_string(region_size) + " bytes): file truncated or corrupt");
    }
    int64_t want = 0;
    if (__builtin_mul_overflow(numel, int64_t(dtype_size(t.dtype)), &want) || want != end - begin) {
      return fail(tname + ": data_offsets " + off->dump() + " hold " + std::to_string(end - begin) +
                  " bytes but shape " + sh->dump() + " of " + dtype_str + " needs " +
                  (want > 0 ? std::to_string(want) : std::string("more")));
    }
    t.data = region + begin;
    t.nbytes = size_t(end - begin);
    f.tensors_.push_back(std::move(t));
  }
  std::sort(f.tensors_.begin(), f.tensors_.end(), [](const SafeTensor& a, const SafeTensor& b) {
    return a.data != b.data ? a.data < b.data : a.name < b.name;
  });
  for (size_t i = 0; i < f.tensors_.size(); ++i) f.index_.emplace(f.tensors_[i].name, i);
  return f;
}

const SafeTensor* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

// --- Checkpoint ----------------------------------------------------------------------------------

Result<SafetensorsCheckpoint> SafetensorsCheckpoint::open(const std::string& dir_or_file) {
  SafetensorsCheckpoint ck;
  std::vector<std::string> paths;
  std::map<std::string, std::string> wanted;  // from the index: tensor -> shard file name
  std::string index_path;

  if (!file_exists(dir_or_file)) return Status::error(dir_or_file + ": no such file or directory");
  const bool is_index = !is_directory(dir_or_file) && ends_with(dir_or_file, ".index.json");
  if (!is_directory(dir_or_file) && !is_index) {
    paths.push_back(dir_or_file);
  } else {
    // The directory, or the index file itself (its shards are beside it).
    const std::string dir =
        is_index ? (dir_or_file.find('/') == std::string::npos ? std::string(".")
                                                               : dir_or_file.substr(0, dir_or_file.rfind('/')))
                 : dir_or_file;
    index_path = is_index ? dir_or_file : join_path(dir, "model.safetensors.index.json");
    if (file_exists(index_path)) {
      KILN_ASSIGN_OR_RETURN(std::string text, read_file(index_path));
      json idx = json::parse(text, nullptr, false);
      if (idx.is_discarded() || !idx.is_object()) return Status::error(index_path + ": not a valid JSON object");
      auto wm = idx.find("weight_map");
      if (wm == idx.end() || !wm->is_object()) return Status::error(index_path + ": missing 'weight_map' object");
      std::set<std::string> shard_names;
      for (const auto& [tensor, shard] : wm->items()) {
        if (!shard.is_string()) return Status::error(index_path + ": weight_map entry " + quote(tensor) + " is not a string");
        std::string s = shard.get<std::string>();
        if (s.empty() || s[0] == '/' || s.find("..") != std::string::npos) {
          return Status::error(index_path + ": weight_map entry " + quote(tensor) + " names shard " + quote(s) +
                               ", which is not a file name inside the checkpoint directory");
        }
        wanted[tensor] = s;
        shard_names.insert(s);
      }
      if (shard_names.empty()) return Status::error(index_path + ": weight_map is empty");
      for (const auto& s : shard_names) {
        std::string p = join_path(dir, s);
        if (!file_exists(p)) {
          return Status::error(index_path + ": shard " + quote(s) + " (holding e.g. tensor " +
                               quote(std::find_if(wanted.begin(), wanted.end(), [&](auto& kv) {
                                       return kv.second == s;
                                     })->first) +
                               ") is missing from " + dir);
        }
        paths.push_back(p);
      }
      auto md = idx.find("metadata");
      if (md != idx.end() && md->is_object()) {
        for (const auto& [k, v] : md->items()) ck.metadata_[k] = v.is_string() ? v.get<std::string>() : v.dump();
      }
    } else if (file_exists(join_path(dir, "model.safetensors"))) {
      paths.push_back(join_path(dir, "model.safetensors"));
    } else {
      DIR* d = ::opendir(dir.c_str());
      if (!d) return Status::error(dir + ": cannot list directory (" + std::strerror(errno) + ")");
      while (dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (ends_with(n, ".safetensors")) paths.push_back(join_path(dir, n));
      }
      ::closedir(d);
      std::sort(paths.begin(), paths.end());
      if (paths.empty()) {
        return Status::error(dir + ": no model.safetensors, model.safetensors.index.json or *.safetensors file");
      }
    }
  }

  for (const auto& p : paths) {
    KILN_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::open(p));
    ck.shards_.push_back(std::move(f));
    ck.files_.push_back(p);
  }
  for (uint32_t s = 0; s < ck.shards_.size(); ++s) {
    const auto& ts = ck.shards_[s].tensors();
    for (uint32_t i = 0; i < ts.size(); ++i) {
      auto [it, inserted] = ck.index_.emplace(ts[i].name, std::make_pair(s, i));
      if (!inserted) {
        return Status::error(ck.files_[s] + ": tensor " + quote(ts[i].name) + " is also in " +
                             ck.files_[it->second.first]);
      }
    }
  }
  if (!ck.shards_.empty()) {
    for (const auto& [k, v] : ck.shards_[0].metadata()) ck.metadata_.emplace(k, v);  // index wins
  }
  for (const auto& [tensor, shard] : wanted) {
    auto it = ck.index_.find(tensor);
    if (it == ck.index_.end()) {
      return Status::error(index_path + ": weight_map puts tensor " + quote(tensor) + " in " + quote(shard) +
                           ", but that shard has no such tensor");
    }
    const std::string& holder = ck.files_[it->second.first];
    if (!ends_with(holder, "/" + shard) && holder != shard) {
      return Status::error(index_path + ": weight_map puts tensor " + quote(tensor) + " in " + quote(shard) +
                           ", but it is in " + holder);
    }
  }
  return ck;
}

const SafeTensor* SafetensorsCheckpoint::find(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return nullptr;
  return &shards_[it->second.first].tensors()[it->second.second];
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& kv : index_) out.push_back(kv.first);  // std::map: already sorted
  return out;
}

// --- Writer --------------------------------------------------------------------------------------

Status safetensors_write(const std::string& path, const std::vector<SafeTensorWrite>& tensors,
                         const std::map<std::string, std::string>& metadata) {
  // nlohmann's object is a std::map, so the header's keys come out sorted; data keeps input order.
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__" || !seen.insert(t.name).second) {
      return Status::error(path + ": tensor name " + quote(t.name) + " is reserved or repeated");
    }
    int64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0 || __builtin_mul_overflow(numel, d, &numel)) {
        return Status::error(path + ": tensor " + quote(t.name) + " has a bad shape");
      }
    }
    if (uint64_t(numel) * dtype_size(t.dtype) != t.nbytes) {
      return Status::error(path + ": tensor " + quote(t.name) + " has " + std::to_string(t.nbytes) +
                           " bytes but its shape and dtype need " +
                           std::to_string(uint64_t(numel) * dtype_size(t.dtype)));
    }
    if (t.nbytes > 0 && t.data == nullptr) return Status::error(path + ": tensor " + quote(t.name) + " has no data");
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');

  // Write beside the target and rename, so a failed write never leaves a half file under the name.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return Status::error(tmp + ": cannot open for writing (" + std::strerror(errno) + ")");
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(h.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(h.data(), std::streamsize(h.size()));
    for (const auto& t : tensors) {
      if (t.nbytes) out.write(static_cast<const char*>(t.data), std::streamsize(t.nbytes));
    }
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      return Status::error(path + ": write error (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    return Status::error(path + ": cannot rename " + tmp + " into place (" + std::strerror(errno) + ")");
  }
  return Status::ok();
}

}  // namespace kiln
