// GGUF (v2, v3): memory-mapped reading of metadata and tensor infos, dequantization of the common
// ggml block formats, and a writer (tests, tools). Spec: ggml/docs/gguf.md.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/file.h"
#include "core/status.h"

namespace kiln {

// Values are ggml's; gaps are types ggml removed.
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
  kNVFP4 = 40,
  kQ1_0 = 41,
};

// True if `id` is a ggml type this reader knows the layout of (name, block size).
bool ggml_type_known(uint32_t id);
std::string_view ggml_type_name(GgmlType t);  // "Q4_K", ...; "unknown" for unknown ids
bool ggml_type_dequantizable(GgmlType t);     // ggml_dequantize_row supports it
int64_t ggml_block_elems(GgmlType t);         // elements per block (1 for plain types); 0 if unknown
size_t ggml_block_bytes(GgmlType t);          // bytes per block; 0 if unknown
size_t ggml_row_bytes(GgmlType t, int64_t n_elems);  // n_elems must be a multiple of block elems

// Dequantize n elements (a multiple of ggml_block_elems(t)) from src into dst. Supports F32, F16,
// BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K (see ggml_type_dequantizable);
// other types are a programming error (checked). No allocation; on the CPU matmul's hot path.
void ggml_dequantize_row(GgmlType t, const void* src, float* dst, int64_t n);

// Metadata value types, as numbered in the file.
enum class GgufType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};
std::string_view gguf_type_name(GgufType t);
size_t gguf_type_size(GgufType t);  // bytes of a scalar of this type; 0 for string/array

// One metadata value: a scalar, a string, or an array of scalars or strings (arrays of arrays are
// rejected at parse time). Numeric arrays are stored as their raw little-endian bytes.
class GgufValue {
 public:
  GgufValue() = default;  // U8 0
  template <class T>
    requires std::is_arithmetic_v<T>
  GgufValue(T v) {  // NOLINT: implicit by design, so {"key", 5} reads naturally
    type_ = type_of<T>();
    set_scalar(&v, sizeof(T));
  }
  GgufValue(std::string s) : type_(GgufType::kString), str_(std::move(s)) {}  // NOLINT
  GgufValue(const char* s) : GgufValue(std::string(s)) {}                    // NOLINT
  GgufValue(std::string_view s) : GgufValue(std::string(s)) {}               // NOLINT
  GgufValue(std::vector<std::string> v)  // NOLINT
      : type_(GgufType::kArray), elem_(GgufType::kString), strs_(std::move(v)) {}
  template <class T>
    requires std::is_arithmetic_v<T>
  GgufValue(const std::vector<T>& v) {  // NOLINT
    type_ = GgufType::kArray;
    elem_ = type_of<T>();
    if constexpr (std::is_same_v<T, bool>) {
      raw_.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) raw_[i] = v[i] ? 1 : 0;
    } else {
      raw_.resize(v.size() * sizeof(T));
      if (!v.empty()) std::memcpy(raw_.data(), v.data(), raw_.size());
    }
    n_ = v.size();
  }
  // An array of `n` elements of scalar type `elem` from raw little-endian bytes (the parser's path).
  static GgufValue numeric_array(GgufType elem, std::vector<uint8_t> raw, size_t n);

  GgufType type() const { return type_; }
  bool is_array() const { return type_ == GgufType::kArray; }
  GgufType elem_type() const { return elem_; }  // arrays only

  // Scalars. as_int: any integer type (nullopt for a U64 above INT64_MAX) and bool;
  // as_float: any numeric type; as_bool: bool only.
  std::optional<int64_t> as_int() const;
  std::optional<double> as_float() const;
  std::optional<bool> as_bool() const;
  const std::string* as_string() const { return type_ == GgufType::kString ? &str_ : nullptr; }

  // Arrays. as_int_array: integer/bool elements (empty otherwise); as_float_array: any numeric.
  size_t size() const;  // array length; 0 for scalars
  const std::vector<std::string>* as_string_array() const {
    return is_array() && elem_ == GgufType::kString ? &strs_ : nullptr;
  }
  std::vector<int64_t> as_int_array() const;
  std::vector<double> as_float_array() const;
  // Raw little-endian element bytes of a numeric array (size() * gguf_type_size(elem_type())).
  const std::vector<uint8_t>& raw_array() const { return raw_; }
  // A scalar's little-endian payload, zero-extended to 64 bits (the writer's path).
  uint64_t scalar_bits() const { return bits_; }

  std::string to_string() const;  // short human form for `kiln info` (arrays summarized)

 private:
  template <class T>
  static constexpr GgufType type_of() {
    if constexpr (std::is_same_v<T, bool>) return GgufType::kBool;
    else if constexpr (std::is_floating_point_v<T>) return sizeof(T) == 4 ? GgufType::kF32 : GgufType::kF64;
    else if constexpr (std::is_signed_v<T>)
      return sizeof(T) == 1 ? GgufType::kI8 : sizeof(T) == 2 ? GgufType::kI16 : sizeof(T) == 4 ? GgufType::kI32 : GgufType::kI64;
    else
      return sizeof(T) == 1 ? GgufType::kU8 : sizeof(T) == 2 ? GgufType::kU16 : sizeof(T) == 4 ? GgufType::kU32 : GgufType::kU64;
  }
  void set_scalar(const void* p, size_t n);

  GgufType type_ = GgufType::kU8;
  GgufType elem_ = GgufType::kU8;
  uint64_t bits_ = 0;  // scalar payload, little-endian, zero-extended
  std::string str_;
  std::vector<std::string> strs_;
  std::vector<uint8_t> raw_;
  size_t n_ = 0;  // numeric array length

  friend class GgufFile;
};

class GgufFile {
 public:
  static Result<GgufFile> open(const std::string& path);
  // Parse bytes already in memory (fuzzing, tests); `name` stands in for the path in messages.
  static Result<GgufFile> from_bytes(std::string bytes, const std::string& name);

  uint32_t version() const { return version_; }
  size_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return metadata_; }
  const GgufValue* get(std::string_view key) const;
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const;
  std::optional<std::string> get_string(std::string_view key) const;

  struct Tensor {
    std::string name;
    GgmlType type = GgmlType::kF32;
    std::vector<int64_t> ne;  // ggml order: ne[0] is the innermost, contiguous dim
    const uint8_t* data = nullptr;  // aligned to alignment() relative to the file start
    size_t nbytes = 0;
    uint64_t offset = 0;  // relative to the start of the data section
    int64_t numel() const {
      int64_t n = 1;
      for (int64_t d : ne) n *= d;
      return n;
    }
  };
  const std::vector<Tensor>& tensors() const { return tensors_; }  // in file order
  const Tensor* find(std::string_view name) const;
  const std::string& path() const { return path_; }

  // Dequantize a whole tensor to f32 (row-major in ggml order, ne[0] fastest). Error names the
  // file and tensor if the type is not dequantizable.
  Status dequantize(const Tensor& t, float* dst) const;

 private:
  static Result<GgufFile> parse(std::shared_ptr<const void> owner, const uint8_t* data, size_t size,
                                const std::string& path);
  std::shared_ptr<const void> owner_;  // the MappedFile (or byte buffer) the tensors point into
  std::string path_;
  uint32_t version_ = 0;
  size_t alignment_ = 32;
  std::map<std::string, GgufValue, std::less<>> metadata_;
  std::vector<Tensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
};

struct GgufTensorWrite {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<int64_t> ne;  // ggml order
  const void* data = nullptr;
  size_t nbytes = 0;  // must equal ggml_row_bytes(type, ne[0]) * (product of the other ne)
};

// Writes GGUF v3. Metadata keys are written in the given order; if `alignment` != 32 and the
// metadata has no general.alignment, it is added.
Status gguf_write(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                  const std::vector<GgufTensorWrite>& tensors, uint32_t alignment = 32);
// Same, into a byte string (tests, fuzz seeds).
Result<std::string> gguf_serialize(const std::vector<std::pair<std::string, GgufValue>>& metadata,
                                   const std::vector<GgufTensorWrite>& tensors, uint32_t alignment = 32);

}  // namespace kiln
