// Errors as values at boundaries (STYLE.md #14): parsing and I/O return Status or Result<T> with a
// message a user can act on; deep invariants use KILN_CHECK, which aborts with file:line.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <variant>

namespace kiln {

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status ok() { return Status(); }
  static Status error(std::string message) {
    Status s;
    s.failed_ = true;
    s.message_ = std::move(message);
    return s;
  }
  bool is_ok() const { return !failed_; }
  explicit operator bool() const { return !failed_; }
  const std::string& message() const { return message_; }
  // Prefix the message with context ("model.safetensors: " + ...).
  Status with_context(const std::string& ctx) const {
    return failed_ ? error(ctx + ": " + message_) : *this;
  }

 private:
  bool failed_ = false;
  std::string message_;
};

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).is_ok()) v_ = Status::error("internal: Result built from an ok Status");
  }
  bool is_ok() const { return v_.index() == 0; }
  explicit operator bool() const { return is_ok(); }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  Status status() const { return is_ok() ? Status::ok() : std::get<1>(v_); }
  const std::string& message() const {
    static const std::string empty;
    return is_ok() ? empty : std::get<1>(v_).message();
  }

 private:
  std::variant<T, Status> v_;
};

[[noreturn]] inline void check_failed(const char* expr, const char* file, int line, const std::string& msg) {
  std::fprintf(stderr, "kiln: internal check failed: %s at %s:%d %s\n", expr, file, line, msg.c_str());
  std::abort();
}

}  // namespace kiln

#define KILN_CHECK(cond)                                                  \
  do {                                                                    \
    if (!(cond)) ::kiln::check_failed(#cond, __FILE__, __LINE__, "");     \
  } while (0)
#define KILN_CHECK_MSG(cond, msg)                                         \
  do {                                                                    \
    if (!(cond)) ::kiln::check_failed(#cond, __FILE__, __LINE__, (msg));  \
  } while (0)

// Propagate a failed Status/Result from an expression.
namespace kiln::detail {
inline Status to_status(const Status& s) { return s; }
template <class T>
Status to_status(const Result<T>& r) { return r.status(); }
}  // namespace kiln::detail
#define KILN_RETURN_IF_ERROR(expr)                                      \
  do {                                                                  \
    auto&& kiln_r_ = (expr);                                            \
    if (!kiln_r_.is_ok()) return ::kiln::detail::to_status(kiln_r_);    \
  } while (0)
// Assign the value of a Result or return its error: KILN_ASSIGN_OR_RETURN(auto x, parse(...));
#define KILN_CONCAT_INNER_(a, b) a##b
#define KILN_CONCAT_(a, b) KILN_CONCAT_INNER_(a, b)
#define KILN_ASSIGN_OR_RETURN(lhs, expr) KILN_ASSIGN_OR_RETURN_IMPL_(KILN_CONCAT_(kiln_res_, __LINE__), lhs, expr)
#define KILN_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.is_ok()) return tmp.status();            \
  lhs = std::move(tmp).value()
