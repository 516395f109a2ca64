#include "formats/gguf.h"
#include "core/text.h"

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <set>

namespace kiln {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as little-endian u32
constexpr int kMaxDims = 4;              // GGML_MAX_DIMS

std::string quote(std::string_view s) { return quote_untrusted(s); }

bool is_scalar_type(uint32_t t) { return t <= 12 && t != 8 && t != 9; }

// Bounds-checked little-endian cursor over the file. Every read names what it was reading, so a
// truncated file says where it ends.
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& path) : p_(data), size_(size), path_(path) {}
  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }
  const uint8_t* at(size_t off) const { return p_ + off; }

  Status need(size_t n, std::string_view what) const {
    if (n <= left()) return Status::ok();
    return Status::error(path_ + ": truncated: file ends at byte " + std::to_string(size_) + " while reading " +
                         std::string(what) + " (needs " + std::to_string(n) + " bytes at offset " +
                         std::to_string(pos_) + ")");
  }
  template <class T>
  Status read(T* out, std::string_view what) {
    KILN_RETURN_IF_ERROR(need(sizeof(T), what));
    std::memcpy(out, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return Status::ok();
  }
  Status read_bytes(size_t n, const uint8_t** out, std::string_view what) {
    KILN_RETURN_IF_ERROR(need(n, what));
    *out = p_ + pos_;
    pos_ += n;
    return Status::ok();
  }
  Status read_string(std::string* out, std::string_view what) {
    uint64_t len = 0;
    KILN_RETURN_IF_ERROR(read(&len, what));
    if (len > left()) {
      return Status::error(path_ + ": " + std::string(what) + " has length " + std::to_string(len) +
                           ", past the end of the file (truncated or corrupt)");
    }
    out->assign(reinterpret_cast<const char*>(p_ + pos_), size_t(len));
    pos_ += size_t(len);
    return Status::ok();
  }

 private:
  const uint8_t* p_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::optional<int64_t> int_at(GgufType t, const uint8_t* p) {
  switch (t) {
    case GgufType::kU8: return int64_t(load<uint8_t>(p));
    case GgufType::kI8: return int64_t(load<int8_t>(p));
    case GgufType::kU16: return int64_t(load<uint16_t>(p));
    case GgufType::kI16: return int64_t(load<int16_t>(p));
    case GgufType::kU32: return int64_t(load<uint32_t>(p));
    case GgufType::kI32: return int64_t(load<int32_t>(p));
    case GgufType::kU64: {
      uint64_t v = load<uint64_t>(p);
      if (v > uint64_t(INT64_MAX)) return std::nullopt;
      return int64_t(v);
    }
    case GgufType::kI64: return load<int64_t>(p);
    case GgufType::kBool: return int64_t(load<uint8_t>(p) != 0);
    case GgufType::kF32:
    case GgufType::kF64:
    case GgufType::kString:
    case GgufType::kArray: return std::nullopt;
  }
  return std::nullopt;
}

std::optional<double> float_at(GgufType t, const uint8_t* p) {
  switch (t) {
    case GgufType::kF32: return double(load<float>(p));
    case GgufType::kF64: return load<double>(p);
    case GgufType::kU64: return double(load<uint64_t>(p));
    case GgufType::kU8:
    case GgufType::kI8:
    case GgufType::kU16:
    case GgufType::kI16:
    case GgufType::kU32:
    case GgufType::kI32:
    case GgufType::kI64:
    case GgufType::kBool: return double(*int_at(t, p));
    case GgufType::kString:
    case GgufType::kArray: return std::nullopt;
  }
  return std::nullopt;
}

void put_bytes(std::string* out, const void* p, size_t n) { out->append(static_cast<const char*>(p), n); }
template <class T>
void put(std::string* out, T v) {
  put_bytes(out, &v, sizeof v);
}
void put_string(std::string* out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out->append(s);
}

}  // namespace

// --- GgufValue -----------------------------------------------------------------------------------

std::string_view gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::kU8: return "u8";
    case GgufType::kI8: return "i8";
    case GgufType::kU16: return "u16";
    case GgufType::kI16: return "i16";
    case GgufType::kU32: return "u32";
    case GgufType::kI32: return "i32";
    case GgufType::kF32: return "f32";
    case GgufType::kBool: return "bool";
    case GgufType::kString: return "string";
    case GgufType::kArray: return "array";
    case GgufType::kU64: return "u64";
    case GgufType::kI64: return "i64";
    case GgufType::kF64: return "f64";
  }
  return "unknown";
}

size_t gguf_type_size(GgufType t) {
  switch (t) {
    case GgufType::kU8:
    case GgufType::kI8:
    case GgufType::kBool: return 1;
    case GgufType::kU16:
    case GgufType::kI16: return 2;
    case GgufType::kU32:
    case GgufType::kI32:
    case GgufType::kF32: return 4;
    case GgufType::kU64:
    case GgufType::kI64:
    case GgufType::kF64: return 8;
    case GgufType::kString:
    case GgufType::kArray: return 0;
  }
  return 0;
}

void GgufValue::set_scalar(const void* p, size_t n) {
  bits_ = 0;
  std::memcpy(&bits_, p, n);
}

GgufValue GgufValue::numeric_array(GgufType elem, std::vector<uint8_t> raw, size_t n) {
  KILN_CHECK(is_scalar_type(uint32_t(elem)) && raw.size() == n * gguf_type_size(elem));
  GgufValue v;
  v.type_ = GgufType::kArray;
  v.elem_ = elem;
  v.raw_ = std::move(raw);
  v.n_ = n;
  return v;
}

std::optional<int64_t> GgufValue::as_int() const {
  if (!is_scalar_type(uint32_t(type_))) return std::nullopt;
  return int_at(type_, reinterpret_cast<const uint8_t*>(&bits_));
}

std::optional<double> GgufValue::as_float() const {
  if (!is_scalar_type(uint32_t(type_))) return std::nullopt;
  return float_at(type_, reinterpret_cast<const uint8_t*>(&bits_));
}

std::optional<bool> GgufValue::as_bool() const {
  if (type_ != GgufType::kBool) return std::nullopt;
  return (bits_ & 0xff) != 0;
}

size_t GgufValue::size() const {
  if (!is_array()) return 0;
  return elem_ == GgufType::kString ? strs_.size() : n_;
}

std::vector<int64_t> GgufValue::as_int_array() const {
  std::vector<int64_t> out;
  if (!is_array() || elem_ == GgufType::kString || elem_ == GgufType::kF32 || elem_ == GgufType::kF64) return out;
  const size_t es = gguf_type_size(elem_);
  out.resize(n_);
  for (size_t i = 0; i < n_; ++i) out[i] = int_at(elem_, raw_.data() + i * es).value_or(INT64_MAX);
  return out;
}

std::vector<double> GgufValue::as_float_array() const {
  std::vector<double> out;
  if (!is_array() || elem_ == GgufType::kString) return out;
  const size_t es = gguf_type_size(elem_);
  out.resize(n_);
  if (elem_ == GgufType::kF32) {  // the common case (tokenizer scores): keep it a tight loop
    for (size_t i = 0; i < n_; ++i) out[i] = double(load<float>(raw_.data() + i * 4));
    return out;
  }
  for (size_t i = 0; i < n_; ++i) out[i] = *float_at(elem_, raw_.data() + i * es);
  return out;
}

std::string GgufValue::to_string() const {
  if (type_ == GgufType::kString) return str_.size() > 80 ? quote(str_.substr(0, 77)) + "..." : quote(str_);
  if (type_ == GgufType::kBool) return *as_bool() ? "true" : "false";
  if (type_ == GgufType::kF32 || type_ == GgufType::kF64) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", *as_float());
    return buf;
  }
  if (type_ == GgufType::kU64 && !as_int()) return std::to_string(bits_);
  if (!is_array()) return std::to_string(*as_int());
  std::string out = "[" + std::string(gguf_type_name(elem_)) + " x " + std::to_string(size()) + "]";
  return out;
}

// --- GgufFile ------------------------------------------------------------------------------------

Result<GgufFile> GgufFile::open(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(std::shared_ptr<MappedFile> m, MappedFile::open(path));
  const uint8_t* data = m->data();
  size_t size = m->size();
  return parse(std::shared_ptr<const void>(m, m.get()), data, size, path);
}

Result<GgufFile> GgufFile::from_bytes(std::string bytes, const std::string& name) {
  auto buf = std::make_shared<std::string>(std::move(bytes));
  const auto* data = reinterpret_cast<const uint8_t*>(buf->data());
  size_t size = buf->size();
  return parse(std::shared_ptr<const void>(buf, buf.get()), data, size, name);
}

Result<GgufFile> GgufFile::parse(std::shared_ptr<const void> owner, const uint8_t* data, size_t size,
                                 const std::string& path) {
  auto fail = [&](const std::string& msg) { return Status::error(path + ": " + msg); };
  Cursor c(data, size, path);
  uint32_t magic = 0, version = 0;
  if (size < 4) return fail("file is " + std::to_string(size) + " bytes, too small to be GGUF");
  KILN_RETURN_IF_ERROR(c.read(&magic, "the magic"));
  if (magic != kMagic) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%02x %02x %02x %02x", data[0], data[1], data[2], data[3]);
    return fail(std::string("not a GGUF file (magic bytes ") + buf + ", expected 47 47 55 46 \"GGUF\")");
  }
  KILN_RETURN_IF_ERROR(c.read(&version, "the version"));
  if (version == 1) return fail("GGUF version 1 is not supported (v2, v3 are)");
  if (version != 2 && version != 3) {
    uint32_t swapped = __builtin_bswap32(version);
    if (swapped == 2 || swapped == 3) return fail("big-endian GGUF is not supported (little-endian v2, v3 are)");
    return fail("GGUF version " + std::to_string(version) + " is not supported (v2, v3 are)");
  }
  uint64_t n_tensors = 0, n_kv = 0;
  KILN_RETURN_IF_ERROR(c.read(&n_tensors, "the tensor count"));
  KILN_RETURN_IF_ERROR(c.read(&n_kv, "the metadata count"));
  // A key-value pair takes at least 13 bytes (u64 key length, u32 type, 1 byte value) and a tensor
  // info at least 24 (u64 name length, u32 n_dims, u32 type, u64 offset): bound counts by that.
  if (n_kv > c.left() / 13) {
    return fail("metadata count " + std::to_string(n_kv) + " is impossible for a file of " + std::to_string(size) +
                " bytes (corrupt header)");
  }
  if (n_tensors > c.left() / 24) {
    return fail("tensor count " + std::to_string(n_tensors) + " is impossible for a file of " +
                std::to_string(size) + " bytes (corrupt header)");
  }

  GgufFile f;
  f.owner_ = std::move(owner);
  f.path_ = path;
  f.version_ = version;

  std::string key;
  for (uint64_t i = 0; i < n_kv; ++i) {
    KILN_RETURN_IF_ERROR(c.read_string(&key, "metadata key #" + std::to_string(i)));
    const std::string what = "metadata " + quote(key);
    uint32_t t = 0;
    KILN_RETURN_IF_ERROR(c.read(&t, what + " type"));
    GgufValue v;
    if (is_scalar_type(t)) {
      const size_t n = gguf_type_size(GgufType(t));
      const uint8_t* p = nullptr;
      KILN_RETURN_IF_ERROR(c.read_bytes(n, &p, what));
      v.type_ = GgufType(t);
      v.set_scalar(p, n);
    } else if (t == uint32_t(GgufType::kString)) {
      v.type_ = GgufType::kString;
      KILN_RETURN_IF_ERROR(c.read_string(&v.str_, what));
    } else if (t == uint32_t(GgufType::kArray)) {
      uint32_t et = 0;
      uint64_t n = 0;
      KILN_RETURN_IF_ERROR(c.read(&et, what + " element type"));
      KILN_RETURN_IF_ERROR(c.read(&n, what + " length"));
      v.type_ = GgufType::kArray;
      if (is_scalar_type(et)) {
        const size_t es = gguf_type_size(GgufType(et));
        if (n > c.left() / es) {
          return fail(what + ": array of " + std::to_string(n) + " " + std::string(gguf_type_name(GgufType(et))) +
                      " runs past the end of the file (truncated or corrupt)");
        }
        const uint8_t* p = nullptr;
        KILN_RETURN_IF_ERROR(c.read_bytes(size_t(n) * es, &p, what));
        v.elem_ = GgufType(et);
        v.raw_.assign(p, p + size_t(n) * es);
        v.n_ = size_t(n);
      } else if (et == uint32_t(GgufType::kString)) {
        if (n > c.left() / 8) {
          return fail(what + ": array of " + std::to_string(n) +
                      " strings runs past the end of the file (truncated or corrupt)");
        }
        v.elem_ = GgufType::kString;
        v.strs_.resize(size_t(n));
        for (uint64_t j = 0; j < n; ++j) {
          // Inline read: the per-element message is only built on failure (150k-entry vocabularies).
          uint64_t len = 0;
          if (c.left() < 8 || (std::memcpy(&len, c.at(c.pos()), 8), len > c.left() - 8)) {
            return fail(what + ": string #" + std::to_string(j) + " of " + std::to_string(n) +
                        " runs past the end of the file (truncated or corrupt)");
          }
          const uint8_t* p = nullptr;
          (void)c.read_bytes(8, &p, what);
          (void)c.read_bytes(size_t(len), &p, what);
          v.strs_[j].assign(reinterpret_cast<const char*>(p), size_t(len));
        }
      } else if (et == uint32_t(GgufType::kArray)) {
        return fail(what + ": arrays of arrays are not supported");
      } else {
        return fail(what + ": unknown array element type " + std::to_string(et));
      }
    } else {
      return fail(what + ": unknown value type " + std::to_string(t));
    }
    if (!f.metadata_.emplace(key, std::move(v)).second) return fail(what + " appears twice");
  }

  if (const GgufValue* a = f.get("general.alignment")) {
    auto v = a->as_int();
    if (!v || *v <= 0 || *v > (1 << 30) || (*v & (*v - 1)) != 0) {
      return fail("general.alignment (" + a->to_string() + ") must be a power of two");
    }
    f.alignment_ = size_t(*v);
  }

  f.tensors_.reserve(size_t(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    Tensor t;
    KILN_RETURN_IF_ERROR(c.read_string(&t.name, "the name of tensor #" + std::to_string(i)));
    const std::string what = "tensor " + quote(t.name);
    uint32_t n_dims = 0;
    KILN_RETURN_IF_ERROR(c.read(&n_dims, what + " n_dims"));
    if (n_dims > kMaxDims) {
      return fail(what + " has " + std::to_string(n_dims) + " dims (at most " + std::to_string(kMaxDims) + ")");
    }
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne = 0;
      KILN_RETURN_IF_ERROR(c.read(&ne, what + " dims"));
      if (ne == 0 || ne > uint64_t(INT64_MAX) || __builtin_mul_overflow(numel, int64_t(ne), &numel)) {
        return fail(what + " has a bad dim ne[" + std::to_string(d) + "] = " + std::to_string(ne));
      }
      t.ne.push_back(int64_t(ne));
    }
    if (t.ne.empty()) t.ne.push_back(1);  // ggml treats a 0-dim tensor as a scalar
    uint32_t type = 0;
    KILN_RETURN_IF_ERROR(c.read(&type, what + " type"));
    if (!ggml_type_known(type)) {
      return fail(what + " has unknown ggml type id " + std::to_string(type));
    }
    t.type = GgmlType(type);
    KILN_RETURN_IF_ERROR(c.read(&t.offset, what + " offset"));
    const int64_t be = ggml_block_elems(t.type);
    if (t.ne[0] % be != 0) {
      return fail(what + ": ne[0] = " + std::to_string(t.ne[0]) + " is not a multiple of the " +
                  std::string(ggml_type_name(t.type)) + " block size " + std::to_string(be));
    }
    // numel fits int64, so rows * row_bytes fits: block_bytes / block_elems <= 8.
    t.nbytes = ggml_row_bytes(t.type, t.ne[0]) * size_t(numel / t.ne[0]);
    if (t.offset % f.alignment_ != 0) {
      return fail(what + ": data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
                  std::to_string(f.alignment_));
    }
    if (f.index_.count(t.name)) return fail(what + " appears twice");
    f.index_.emplace(t.name, f.tensors_.size());
    f.tensors_.push_back(std::move(t));
  }

  // The data section starts at the next multiple of the alignment after the tensor infos.
  size_t data_start = c.pos();
  data_start += (f.alignment_ - data_start % f.alignment_) % f.alignment_;
  if (data_start > size && !f.tensors_.empty()) {
    return fail("truncated: the data section would start at byte " + std::to_string(data_start) +
                ", past the end of the file (" + std::to_string(size) + " bytes)");
  }
  const uint64_t data_size = data_start <= size ? size - data_start : 0;
  for (auto& t : f.tensors_) {
    if (t.offset > data_size || t.nbytes > data_size - t.offset) {
      return fail("tensor " + quote(t.name) + " (" + std::string(ggml_type_name(t.type)) + ", " +
                  std::to_string(t.nbytes) + " bytes at data offset " + std::to_string(t.offset) +
                  ") runs past the end of the file: truncated or corrupt");
    }
    t.data = data + data_start + t.offset;
  }
  return f;
}

const GgufValue* GgufFile::get(std::string_view key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

std::optional<int64_t> GgufFile::get_int(std::string_view key) const {
  const GgufValue* v = get(key);
  return v ? v->as_int() : std::nullopt;
}

std::optional<double> GgufFile::get_float(std::string_view key) const {
  const GgufValue* v = get(key);
  return v ? v->as_float() : std::nullopt;
}

std::optional<std::string> GgufFile::get_string(std::string_view key) const {
  const GgufValue* v = get(key);
  if (!v || !v->as_string()) return std::nullopt;
  return *v->as_string();
}

const GgufFile::Tensor* GgufFile::find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Status GgufFile::dequantize(const Tensor& t, float* dst) const {
  if (!ggml_type_dequantizable(t.type)) {
    return Status::error(path_ + ": tensor " + quote(t.name) + " has ggml type " +
                         std::string(ggml_type_name(t.type)) + ", which kiln cannot dequantize (supported: " +
                         "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)");
  }
  const int64_t n = t.numel();
  const int64_t rows = n / t.ne[0];
  const size_t rb = ggml_row_bytes(t.type, t.ne[0]);
  for (int64_t r = 0; r < rows; ++r) ggml_dequantize_row(t.type, t.data + size_t(r) * rb, dst + r * t.ne[0], t.ne[0]);
  return Status::ok();
}

// --- Writer --------------------------------------------------------------------------------------

Result<std::string> gguf_serialize(const std::vector<std::pair<std::string, GgufValue>>& metadata,
                                   const std::vector<GgufTensorWrite>& tensors, uint32_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return Status::error("gguf_write: alignment " + std::to_string(alignment) + " is not a power of two");
  }
  std::vector<std::pair<std::string, GgufValue>> md = metadata;
  bool has_alignment = false;
  std::set<std::string> keys;
  for (const auto& [k, v] : md) {
    if (!keys.insert(k).second) return Status::error("gguf_write: metadata key " + quote(k) + " repeated");
    if (k == "general.alignment") {
      has_alignment = true;
      if (v.as_int() != int64_t(alignment)) {
        return Status::error("gguf_write: general.alignment " + v.to_string() + " differs from alignment " +
                             std::to_string(alignment));
      }
    }
  }
  if (!has_alignment && alignment != 32) md.emplace_back("general.alignment", uint32_t(alignment));

  std::string out;
  put<uint32_t>(&out, kMagic);
  put<uint32_t>(&out, 3);
  put<uint64_t>(&out, tensors.size());
  put<uint64_t>(&out, md.size());
  for (const auto& [k, v] : md) {
    put_string(&out, k);
    put<uint32_t>(&out, uint32_t(v.type()));
    if (v.type() == GgufType::kString) {
      put_string(&out, *v.as_string());
    } else if (v.is_array()) {
      put<uint32_t>(&out, uint32_t(v.elem_type()));
      put<uint64_t>(&out, v.size());
      if (const auto* s = v.as_string_array()) {
        for (const auto& e : *s) put_string(&out, e);
      } else {
        put_bytes(&out, v.raw_array().data(), v.raw_array().size());
      }
    } else {
      const uint64_t bits = v.scalar_bits();
      put_bytes(&out, &bits, gguf_type_size(v.type()));
    }
  }
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  std::set<std::string> names;
  for (const auto& t : tensors) {
    if (!names.insert(t.name).second) return Status::error("gguf_write: tensor " + quote(t.name) + " repeated");
    if (t.ne.empty() || t.ne.size() > size_t(kMaxDims)) {
      return Status::error("gguf_write: tensor " + quote(t.name) + " needs 1 to 4 dims");
    }
    const int64_t be = ggml_block_elems(t.type);
    if (be == 0 || t.ne[0] % be != 0) {
      return Status::error("gguf_write: tensor " + quote(t.name) + ": ne[0] not a multiple of the block size");
    }
    size_t nbytes = ggml_row_bytes(t.type, t.ne[0]);
    for (size_t d = 1; d < t.ne.size(); ++d) nbytes *= size_t(t.ne[d]);
    if (nbytes != t.nbytes) {
      return Status::error("gguf_write: tensor " + quote(t.name) + " has " + std::to_string(t.nbytes) +
                           " bytes, its type and shape need " + std::to_string(nbytes));
    }
    put_string(&out, t.name);
    put<uint32_t>(&out, uint32_t(t.ne.size()));
    for (int64_t d : t.ne) put<uint64_t>(&out, uint64_t(d));
    put<uint32_t>(&out, uint32_t(t.type));
    put<uint64_t>(&out, offset);
    offsets.push_back(offset);
    offset += (t.nbytes + alignment - 1) / alignment * alignment;
  }
  out.resize((out.size() + alignment - 1) / alignment * alignment, '\0');
  const size_t data_start = out.size();
  out.resize(data_start + offset, '\0');
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].nbytes) std::memcpy(&out[data_start + offsets[i]], tensors[i].data, tensors[i].nbytes);
  }
  return out;
}

Status gguf_write(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                  const std::vector<GgufTensorWrite>& tensors, uint32_t alignment) {
  auto bytes = gguf_serialize(metadata, tensors, alignment);
  if (!bytes) return Status::error(path + ": " + bytes.message());
  return write_file(path, *bytes);
}

}  // namespace kiln
