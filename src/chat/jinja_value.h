// The dynamic value of the Jinja interpreter, with Python's semantics where templates can see them:
// str()/repr() formatting, int vs float, truthiness, ==, ordering, insertion-ordered dicts.
// Internal to src/chat (the public API is chat_template.h).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace kiln::chat::jinja {

// A render-time error: caught at the Template boundary and turned into "NAME:LINE: message".
struct Error {
  std::string message;
  int line = 0;  // 0: not known yet, filled in by the statement/expression that catches it
};
[[noreturn]] void fail(std::string message, int line = 0);

enum class Kind : uint8_t {
  kUndefined,
  kNone,
  kBool,
  kInt,
  kFloat,
  kString,
  kList,       // list or tuple (flag)
  kDict,       // insertion-ordered
  kIterator,   // a one-shot generator (select, map, items, reverse, ...), shared position
  kCallable,   // builtin, bound method, macro, loop(...) for recursive loops
  kNamespace,  // mutable attributes: the only mutable container templates can touch
  kLoop,       // the `loop` object of a for statement
};

struct Value;
using ValueList = std::vector<Value>;
struct DictData;
struct Object {
  virtual ~Object() = default;
};

// Why a value is undefined, for jinja2's messages ("'x' is undefined", "'dict object' has no
// attribute 'y'") and for the sandbox's unsafe-attribute undefined (raises SecurityError when used).
struct UndefInfo : Object {
  std::string hint;      // explicit message (e.g. "No first item, sequence was empty.")
  std::string name;      // the missing name/attribute/key (repr'ed in messages)
  bool name_is_str = true;
  std::string obj_type;  // "" when a plain name lookup failed
  bool security = false;
  std::string message() const;
};

struct Value {
  Kind kind = Kind::kUndefined;
  bool flag = false;  // kBool: the value; kList: is a tuple; kString: is Markup (|safe, |e)
  uint16_t nest = 0;  // kList/kDict: nesting depth of containers (bounded, see kMaxNest)
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<const ValueList> list;
  std::shared_ptr<const DictData> dict;
  std::shared_ptr<Object> obj;  // UndefInfo, Callable, NamespaceObj, IteratorObj, LoopObj

  Value() = default;
  static Value undefined(std::string name = "", std::string hint = "");
  static Value undefined_attr(const Value& obj, const Value& name);
  static Value none() { Value v; v.kind = Kind::kNone; return v; }
  static Value boolean(bool b) { Value v; v.kind = Kind::kBool; v.flag = b; return v; }
  static Value integer(int64_t x) { Value v; v.kind = Kind::kInt; v.i = x; return v; }
  static Value real(double x) { Value v; v.kind = Kind::kFloat; v.f = x; return v; }
  static Value string(std::string x) { Value v; v.kind = Kind::kString; v.s = std::move(x); return v; }
  static Value markup(std::string x) { Value v = string(std::move(x)); v.flag = true; return v; }
  bool is_markup() const { return kind == Kind::kString && flag; }
  static Value make_list(ValueList items, bool tuple = false);
  static Value make_dict(DictData d);

  bool is_undefined() const { return kind == Kind::kUndefined; }
  bool is_none() const { return kind == Kind::kNone; }
  bool is_string() const { return kind == Kind::kString; }
  bool is_number() const { return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool; }
  bool is_list() const { return kind == Kind::kList; }
  bool is_dict() const { return kind == Kind::kDict; }
  const ValueList& items() const;  // kList only
  const DictData& entries() const;  // kDict only
  double as_double() const;         // numbers (bool counts as int, as in Python)
  int64_t as_int() const;           // kInt / kBool
};

struct DictData {
  std::vector<std::pair<Value, Value>> items;
  const Value* find(const Value& key) const;
  const Value* find(std::string_view key) const;
  void set(Value key, Value value);  // replaces in place (keeps position) or appends
};

// A Python generator: its body runs lazily, item by item, as it is consumed (so a generator that
// is never consumed never fails), and it is consumed once.
struct IteratorObj : Object {
  std::function<bool(Value& out)> next_fn;  // false when exhausted
  bool exhausted = false;
  std::string type_name = "generator";
  bool next(Value& out);
};

// Sequences that are Python lists underneath but not `list` to templates: range objects and
// dict views. Tagged on a kList value (obj), they print, compare and combine like Python's.
struct SeqTag : Object {
  enum Type { kRange, kDictKeys, kDictValues, kDictItems } type = kRange;
  int64_t start = 0, stop = 0, step = 1;  // kRange
};
const SeqTag* seq_tag(const Value& v);  // nullptr for plain lists/tuples
Value make_range(int64_t start, int64_t stop, int64_t step);  // materialized; caller bounds size
Value make_view(ValueList items, SeqTag::Type type);

struct NamespaceObj : Object {
  DictData attrs;
};

// Containers nest at most this deep: deeper values would overflow the stack of the recursive
// printers (and of the destructors).
constexpr int kMaxNest = 256;

// Work accounting for one render on this thread (set by the renderer): every string built and
// every container element copied is charged; past the limit the render fails.
constexpr size_t kElementCost = 64;  // work units per container element (~ its bytes)
struct WorkBudget {
  size_t used = 0;
  size_t limit = 0;
};
void set_work_budget(WorkBudget* budget);
void charge(size_t units);

// Guards recursion of the value printers/comparators (Python raises RecursionError too).
struct RecursionGuard {
  RecursionGuard();
  ~RecursionGuard();
};

// Python's type name as in error messages ("str", "int", "dict", "NoneType", ...).
std::string type_name(const Value& v);
bool truthy(const Value& v);
std::string to_str(const Value& v);   // Python str(); undefined -> ""
std::string to_repr(const Value& v);  // Python repr()
std::string float_repr(double d);     // Python repr(float)
bool equal(const Value& a, const Value& b);  // Python ==
// Python <: numbers, strings, lists/tuples (lexicographic); anything else is a TypeError.
bool less(const Value& a, const Value& b, const char* op = "<");
// Raises UndefinedError with the undefined's message (or SecurityError for unsafe attributes).
[[noreturn]] void fail_undefined(const Value& v);

// Python len(); TypeError for values without one.
size_t py_len(const Value& v);
// Iterate as Python's iter(): list items, dict keys, string code points, undefined -> nothing,
// iterators are consumed. TypeError for the rest.
ValueList iterate(const Value& v);

Value from_json(const nlohmann::ordered_json& j);
Value from_json(const nlohmann::json& j);

struct JsonOptions {
  bool ensure_ascii = false;
  bool has_indent = false;
  std::string indent;  // used when has_indent
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};
// Python's json.dumps with the given options (TypeError for values JSON can't hold).
std::string to_json(const Value& v, const JsonOptions& opts);

// markupsafe.escape: & < > " ' as entities.
std::string html_escape(std::string_view s);

// ---- UTF-8 helpers (Python strings are code-point sequences) ----
std::vector<char32_t> utf8_decode(std::string_view s);
void utf8_append(std::string& out, char32_t cp);
std::string utf8_encode(const std::vector<char32_t>& cps);
size_t utf8_length(std::string_view s);
bool py_isspace(char32_t c);
char32_t py_lower(char32_t c);
char32_t py_upper(char32_t c);
bool py_is_cased_upper(char32_t c);
bool py_is_cased_lower(char32_t c);
std::string str_upper(std::string_view s);
std::string str_lower(std::string_view s);

}  // namespace kiln::chat::jinja
