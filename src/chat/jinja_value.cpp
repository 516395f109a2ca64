#include "chat/jinja_value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace kiln::chat::jinja {

void fail(std::string message, int line) { throw Error{std::move(message), line}; }

namespace {
thread_local WorkBudget* t_budget = nullptr;
thread_local int t_depth = 0;
thread_local std::vector<const Object*> t_repr_stack;  // namespaces being printed
constexpr int kMaxRecursion = 300;
}  // namespace

void set_work_budget(WorkBudget* budget) { t_budget = budget; }

void charge(size_t units) {
  if (!t_budget) return;
  t_budget->used += units;
  if (t_budget->used > t_budget->limit)
    fail("MemoryError: the template did more than " + std::to_string(t_budget->limit) + " units of work");
}

RecursionGuard::RecursionGuard() {
  if (++t_depth > kMaxRecursion) {
    --t_depth;
    fail("RecursionError: maximum recursion depth exceeded");
  }
}
RecursionGuard::~RecursionGuard() { --t_depth; }

static uint16_t child_nest(const Value& v) {
  return (v.kind == Kind::kList || v.kind == Kind::kDict) ? v.nest : 0;
}

// ---------------------------------------------------------------------------------------------
// UTF-8. Invalid bytes decode to U+DC80+byte (Python's surrogateescape) and encode back to the
// byte, so arbitrary template bytes survive slicing and case mapping unchanged.

std::vector<char32_t> utf8_decode(std::string_view s) {
  std::vector<char32_t> out;
  out.reserve(s.size());
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out.push_back(c);
      ++i;
      continue;
    }
    int len = 0;
    char32_t cp = 0;
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    bool ok = len > 0 && i + len <= n;
    for (int k = 1; ok && k < len; ++k) {
      unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) ok = false;
      else cp = (cp << 6) | (cc & 0x3F);
    }
    if (ok) {
      // Reject overlong forms, surrogates and out-of-range values.
      if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
          cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        ok = false;
    }
    if (!ok) {
      out.push_back(0xDC00 + c);
      ++i;
      continue;
    }
    out.push_back(cp);
    i += len;
  }
  return out;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp >= 0xDC80 && cp <= 0xDCFF) {
    out.push_back(static_cast<char>(cp - 0xDC00));
  } else if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string utf8_encode(const std::vector<char32_t>& cps) {
  std::string out;
  out.reserve(cps.size());
  for (char32_t c : cps) utf8_append(out, c);
  return out;
}

size_t utf8_length(std::string_view s) {
  bool ascii = true;
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) { ascii = false; break; }
  return ascii ? s.size() : utf8_decode(s).size();
}

bool py_isspace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// Simple case mapping for Latin-1, Latin Extended-A, Greek and Cyrillic (what chat content in
// European languages needs); other scripts are left as they are.
char32_t py_lower(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  if (c >= 0x100 && c <= 0x137 && c != 0x130) return c | 1;
  if (c == 0x130) return 'i';
  if (c >= 0x139 && c <= 0x148) return (c & 1) ? c + 1 : c;
  if (c >= 0x14A && c <= 0x177) return c | 1;
  if (c == 0x178) return 0xFF;
  if (c >= 0x179 && c <= 0x17E) return (c & 1) ? c + 1 : c;
  if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
  if (c == 0x386) return 0x3AC;
  if (c >= 0x388 && c <= 0x38A) return c + 37;
  if (c == 0x38C) return 0x3CC;
  if (c == 0x38E || c == 0x38F) return c + 63;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}

char32_t py_upper(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') ? c - 32 : c;
  if (c >= 0xE0 && c <= 0xFE && c != 0xF7) return c - 32;
  if (c == 0xFF) return 0x178;
  if (c == 0xB5) return 0x39C;
  if (c >= 0x100 && c <= 0x137 && c != 0x131) return c & ~char32_t(1);
  if (c == 0x131) return 'I';
  if (c >= 0x139 && c <= 0x148) return (c & 1) ? c : c - 1;
  if (c >= 0x14A && c <= 0x177) return c & ~char32_t(1);
  if (c >= 0x179 && c <= 0x17E) return (c & 1) ? c : c - 1;
  if (c == 0x17F) return 'S';
  if (c >= 0x3B1 && c <= 0x3C9 && c != 0x3C2) return c - 32;
  if (c == 0x3C2) return 0x3A3;
  if (c == 0x3AC) return 0x386;
  if (c >= 0x3AD && c <= 0x3AF) return c - 37;
  if (c == 0x3CC) return 0x38C;
  if (c == 0x3CD || c == 0x3CE) return c - 63;
  if (c >= 0x430 && c <= 0x44F) return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  return c;
}

bool py_is_cased_upper(char32_t c) { return py_lower(c) != c; }
bool py_is_cased_lower(char32_t c) { return py_upper(c) != c || c == 0xDF; }

std::string str_upper(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : utf8_decode(s)) {
    if (c == 0xDF) { out += "SS"; continue; }  // German sharp s, as Python's special casing
    utf8_append(out, py_upper(c));
  }
  return out;
}

std::string str_lower(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : utf8_decode(s)) utf8_append(out, py_lower(c));
  return out;
}

// ---------------------------------------------------------------------------------------------

bool IteratorObj::next(Value& out) {
  if (exhausted || !next_fn) return false;
  bool more;
  try {
    more = next_fn(out);
  } catch (...) {
    exhausted = true;  // a generator that raised is finished, as in Python
    next_fn = nullptr;
    throw;
  }
  if (!more) {
    exhausted = true;
    next_fn = nullptr;
  }
  return more;
}

Value Value::undefined(std::string name, std::string hint) {
  Value v;
  auto info = std::make_shared<UndefInfo>();
  info->name = std::move(name);
  info->hint = std::move(hint);
  v.obj = std::move(info);
  return v;
}

Value Value::undefined_attr(const Value& obj, const Value& name) {
  Value v;
  auto info = std::make_shared<UndefInfo>();
  info->name = name.is_string() ? name.s : to_repr(name);
  info->name_is_str = name.is_string();
  info->obj_type = type_name(obj) + " object";
  if (obj.is_none()) info->obj_type = "None";
  v.obj = std::move(info);
  return v;
}

Value Value::make_list(ValueList items, bool tuple) {
  Value v;
  v.kind = Kind::kList;
  v.flag = tuple;
  uint16_t nest = 0;
  for (const auto& e : items) nest = std::max(nest, child_nest(e));
  if (nest + 1 > kMaxNest) fail("RecursionError: containers nested deeper than " + std::to_string(kMaxNest));
  v.nest = static_cast<uint16_t>(nest + 1);
  charge(items.size() * kElementCost);
  v.list = std::make_shared<const ValueList>(std::move(items));
  return v;
}

Value Value::make_dict(DictData d) {
  Value v;
  v.kind = Kind::kDict;
  uint16_t nest = 0;
  for (const auto& kv : d.items) nest = std::max({nest, child_nest(kv.first), child_nest(kv.second)});
  if (nest + 1 > kMaxNest) fail("RecursionError: containers nested deeper than " + std::to_string(kMaxNest));
  v.nest = static_cast<uint16_t>(nest + 1);
  charge(d.items.size() * 2 * kElementCost);
  v.dict = std::make_shared<const DictData>(std::move(d));
  return v;
}

const SeqTag* seq_tag(const Value& v) {
  return v.kind == Kind::kList && v.obj ? static_cast<const SeqTag*>(v.obj.get()) : nullptr;
}

Value make_range(int64_t start, int64_t stop, int64_t step) {
  int64_t n = 0;
  if (step > 0 && stop > start) n = (stop - start + step - 1) / step;
  if (step < 0 && stop < start) n = (start - stop - step - 1) / (-step);
  ValueList items;
  items.reserve(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) items.push_back(Value::integer(start + k * step));
  Value v = Value::make_list(std::move(items));
  auto tag = std::make_shared<SeqTag>();
  tag->type = SeqTag::kRange;
  tag->start = start;
  tag->stop = stop;
  tag->step = step;
  v.obj = std::move(tag);
  return v;
}

Value make_view(ValueList items, SeqTag::Type type) {
  Value v = Value::make_list(std::move(items));
  auto tag = std::make_shared<SeqTag>();
  tag->type = type;
  v.obj = std::move(tag);
  return v;
}

const ValueList& Value::items() const { return *list; }
const DictData& Value::entries() const { return *dict; }

double Value::as_double() const {
  switch (kind) {
    case Kind::kFloat: return f;
    case Kind::kInt: return static_cast<double>(i);
    case Kind::kBool: return flag ? 1.0 : 0.0;
    default: return 0;
  }
}

int64_t Value::as_int() const { return kind == Kind::kBool ? (flag ? 1 : 0) : i; }

std::string UndefInfo::message() const {
  if (!hint.empty()) return hint;
  if (obj_type.empty()) return "'" + name + "' is undefined";
  if (!name_is_str) return obj_type + " has no element " + name;
  return "'" + obj_type + "' has no attribute '" + name + "'";
}

void fail_undefined(const Value& v) {
  auto* info = dynamic_cast<const UndefInfo*>(v.obj.get());
  if (!info) fail("UndefinedError: value is undefined");
  if (info->security) fail("SecurityError: " + info->message());
  fail("UndefinedError: " + info->message());
}

const Value* DictData::find(const Value& key) const {
  if (key.is_string()) return find(std::string_view(key.s));
  for (const auto& kv : items)
    if (equal(kv.first, key)) return &kv.second;
  return nullptr;
}

const Value* DictData::find(std::string_view key) const {
  for (const auto& kv : items)
    if (kv.first.kind == Kind::kString && kv.first.s == key) return &kv.second;
  return nullptr;
}

void DictData::set(Value key, Value value) {
  for (auto& kv : items)
    if (equal(kv.first, key)) {
      kv.second = std::move(value);
      return;
    }
  items.emplace_back(std::move(key), std::move(value));
}

std::string type_name(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined: return "Undefined";
    case Kind::kNone: return "NoneType";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kFloat: return "float";
    case Kind::kString: return "str";
    case Kind::kList:
      if (const SeqTag* t = seq_tag(v)) {
        switch (t->type) {
          case SeqTag::kRange: return "range";
          case SeqTag::kDictKeys: return "dict_keys";
          case SeqTag::kDictValues: return "dict_values";
          case SeqTag::kDictItems: return "dict_items";
        }
      }
      return v.flag ? "tuple" : "list";
    case Kind::kDict: return "dict";
    case Kind::kIterator: return static_cast<const IteratorObj*>(v.obj.get())->type_name;
    case Kind::kCallable: return "function";
    case Kind::kNamespace: return "Namespace";
    case Kind::kLoop: return "LoopContext";
  }
  return "object";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined: return false;
    case Kind::kNone: return false;
    case Kind::kBool: return v.flag;
    case Kind::kInt: return v.i != 0;
    case Kind::kFloat: return v.f != 0.0;
    case Kind::kString: return !v.s.empty();
    case Kind::kList: return !v.list->empty();
    case Kind::kDict: return !v.dict->items.empty();
    case Kind::kIterator:  // Python generators are always true, even when exhausted
    case Kind::kCallable:
    case Kind::kNamespace:
    case Kind::kLoop: return true;
  }
  return false;
}

std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  // sci = [-]D[.DDD]e(+|-)XX
  bool neg = sci[0] == '-';
  if (neg) sci.erase(0, 1);
  size_t epos = sci.find('e');
  std::string mant = sci.substr(0, epos);
  int exp = std::stoi(sci.substr(epos + 1));
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp >= 0) {
      std::string ip, fp;
      if (static_cast<int>(digits.size()) <= exp + 1) {
        ip = digits + std::string(exp + 1 - digits.size(), '0');
        fp = "0";
      } else {
        ip = digits.substr(0, exp + 1);
        fp = digits.substr(exp + 1);
      }
      out = ip + "." + fp;
    } else {
      out = "0." + std::string(-exp - 1, '0') + digits;
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += eb;
  }
  return neg ? "-" + out : out;
}

static bool py_isprintable(char32_t c) {
  if (c < 0x20 || (c >= 0x7F && c <= 0xA0)) return false;
  if (c == 0xAD || c == 0x1680 || (c >= 0x2000 && c <= 0x200F) || (c >= 0x2028 && c <= 0x202F) ||
      (c >= 0x205F && c <= 0x206F) || c == 0x3000 || c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFB) ||
      (c >= 0xD800 && c <= 0xF8FF) || (c >= 0x600 && c <= 0x605) || c == 0x61C || c == 0x6DD ||
      c == 0x70F || c == 0x180E || c >= 0xF0000)
    return false;
  return true;
}

static std::string str_repr(const std::string& s) {
  bool has_sq = s.find('\'') != std::string::npos;
  bool has_dq = s.find('"') != std::string::npos;
  char q = (has_sq && !has_dq) ? '"' : '\'';
  std::string out(1, q);
  for (char32_t c : utf8_decode(s)) {
    if (c == static_cast<char32_t>(q) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c >= 0xDC80 && c <= 0xDCFF) {
      char b[16];
      std::snprintf(b, sizeof(b), "\\udc%02x", static_cast<unsigned>(c - 0xDC00));
      out += b;
    } else if (!py_isprintable(c)) {
      char b[16];
      if (c < 0x100) std::snprintf(b, sizeof(b), "\\x%02x", static_cast<unsigned>(c));
      else if (c < 0x10000) std::snprintf(b, sizeof(b), "\\u%04x", static_cast<unsigned>(c));
      else std::snprintf(b, sizeof(b), "\\U%08x", static_cast<unsigned>(c));
      out += b;
    } else {
      utf8_append(out, c);
    }
  }
  out += q;
  return out;
}

std::string html_escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string to_repr(const Value& v) {
  RecursionGuard guard;
  switch (v.kind) {
    case Kind::kUndefined: return "Undefined";
    case Kind::kNone: return "None";
    case Kind::kBool: return v.flag ? "True" : "False";
    case Kind::kInt: return std::to_string(v.i);
    case Kind::kFloat: return float_repr(v.f);
    case Kind::kString: return v.flag ? "Markup(" + str_repr(v.s) + ")" : str_repr(v.s);
    case Kind::kList: {
      if (const SeqTag* t = seq_tag(v)) {
        if (t->type == SeqTag::kRange) {
          std::string r = "range(" + std::to_string(t->start) + ", " + std::to_string(t->stop);
          if (t->step != 1) r += ", " + std::to_string(t->step);
          return r + ")";
        }
        Value plain = Value::make_list(v.items());
        return type_name(v) + "(" + to_repr(plain) + ")";
      }
      std::string out = v.flag ? "(" : "[";
      const auto& items = v.items();
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += ", ";
        out += to_repr(items[k]);
      }
      if (v.flag && items.size() == 1) out += ",";
      out += v.flag ? ")" : "]";
      return out;
    }
    case Kind::kDict: {
      std::string out = "{";
      bool first = true;
      for (const auto& kv : v.entries().items) {
        if (!first) out += ", ";
        first = false;
        out += to_repr(kv.first) + ": " + to_repr(kv.second);
      }
      return out + "}";
    }
    case Kind::kIterator:
      return "<" + type_name(v) + " object>";
    case Kind::kCallable: return "<function>";
    case Kind::kNamespace: {
      // Python's dict repr prints a dict it is already printing as {...}.
      auto* ns = static_cast<const NamespaceObj*>(v.obj.get());
      if (std::find(t_repr_stack.begin(), t_repr_stack.end(), ns) != t_repr_stack.end()) return "<Namespace {...}>";
      t_repr_stack.push_back(ns);
      std::string out = "<Namespace {";
      try {
        bool first = true;
        for (const auto& kv : ns->attrs.items) {
          if (!first) out += ", ";
          first = false;
          out += to_repr(kv.first) + ": " + to_repr(kv.second);
        }
      } catch (...) {
        t_repr_stack.pop_back();
        throw;
      }
      t_repr_stack.pop_back();
      return out + "}>";
    }
    case Kind::kLoop: return "<LoopContext>";
  }
  return "";
}

std::string to_str(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined: return "";
    case Kind::kString: return v.s;
    default: return to_repr(v);
  }
}

bool equal(const Value& a, const Value& b) {
  RecursionGuard guard;
  if (a.is_number() && b.is_number()) {
    if (a.kind == Kind::kFloat || b.kind == Kind::kFloat) return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::kUndefined:
    case Kind::kNone: return true;
    case Kind::kString: return a.s == b.s;
    case Kind::kList: {
      if (a.flag != b.flag) return false;
      {
        const SeqTag *ta = seq_tag(a), *tb = seq_tag(b);
        if ((ta ? int(ta->type) : -1) != (tb ? int(tb->type) : -1)) return false;
        if (ta && ta->type == SeqTag::kDictValues) return a.list == b.list;  // identity, as Python
        if (ta && (ta->type == SeqTag::kDictKeys || ta->type == SeqTag::kDictItems)) {
          if (a.items().size() != b.items().size()) return false;  // set equality
          for (const auto& x : a.items()) {
            bool found = false;
            for (const auto& y : b.items())
              if (equal(x, y)) { found = true; break; }
            if (!found) return false;
          }
          return true;
        }
      }
      const auto &x = a.items(), &y = b.items();
      if (x.size() != y.size()) return false;
      for (size_t k = 0; k < x.size(); ++k)
        if (!equal(x[k], y[k])) return false;
      return true;
    }
    case Kind::kDict: {
      const auto& x = a.entries().items;
      const auto& y = b.entries();
      if (x.size() != y.items.size()) return false;
      for (const auto& kv : x) {
        const Value* other = y.find(kv.first);
        if (!other || !equal(kv.second, *other)) return false;
      }
      return true;
    }
    default: return a.obj == b.obj;  // identity
  }
}

bool less(const Value& a, const Value& b, const char* op) {
  RecursionGuard guard;
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  if (a.is_number() && b.is_number()) {
    if (a.kind == Kind::kFloat || b.kind == Kind::kFloat) return a.as_double() < b.as_double();
    return a.as_int() < b.as_int();
  }
  if (a.is_string() && b.is_string()) return a.s < b.s;  // UTF-8 byte order == code point order
  if (a.is_list() && b.is_list() && a.flag == b.flag && !seq_tag(a) && !seq_tag(b)) {
    const auto &x = a.items(), &y = b.items();
    for (size_t k = 0; k < x.size() && k < y.size(); ++k) {
      if (equal(x[k], y[k])) continue;
      return less(x[k], y[k], op);
    }
    return x.size() < y.size();
  }
  fail(std::string("TypeError: '") + op + "' not supported between instances of '" + type_name(a) +
       "' and '" + type_name(b) + "'");
}

size_t py_len(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined: return 0;
    case Kind::kString: return utf8_length(v.s);
    case Kind::kList: return v.list->size();
    case Kind::kDict: return v.dict->items.size();
    default: fail("TypeError: object of type '" + type_name(v) + "' has no len()");
  }
}

ValueList iterate(const Value& v) {
  if (v.kind == Kind::kList) charge(v.list->size() * kElementCost);
  if (v.kind == Kind::kString) charge(v.s.size() * kElementCost);
  switch (v.kind) {
    case Kind::kUndefined: return {};
    case Kind::kList: return *v.list;
    case Kind::kDict: {
      ValueList out;
      out.reserve(v.dict->items.size());
      for (const auto& kv : v.dict->items) out.push_back(kv.first);
      return out;
    }
    case Kind::kString: {
      ValueList out;
      for (char32_t c : utf8_decode(v.s)) {
        std::string ch;
        utf8_append(ch, c);
        out.push_back(Value::string(std::move(ch)));
      }
      return out;
    }
    case Kind::kIterator: {
      auto* it = static_cast<IteratorObj*>(v.obj.get());
      ValueList out;
      Value item;
      while (it->next(item)) {
        charge(kElementCost);
        out.push_back(std::move(item));
      }
      return out;
    }
    default: fail("TypeError: '" + type_name(v) + "' object is not iterable");
  }
}

template <class J>
static Value from_json_impl(const J& j) {
  RecursionGuard guard;
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::none();
    case nlohmann::json::value_t::boolean: return Value::boolean(j.template get<bool>());
    case nlohmann::json::value_t::number_integer: return Value::integer(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      uint64_t u = j.template get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return Value::real(static_cast<double>(u));
      return Value::integer(static_cast<int64_t>(u));
    }
    case nlohmann::json::value_t::number_float: return Value::real(j.template get<double>());
    case nlohmann::json::value_t::string: return Value::string(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      ValueList items;
      items.reserve(j.size());
      for (const auto& e : j) items.push_back(from_json_impl(e));
      return Value::make_list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      DictData d;
      d.items.reserve(j.size());
      for (auto it = j.begin(); it != j.end(); ++it)
        d.items.emplace_back(Value::string(it.key()), from_json_impl(it.value()));
      return Value::make_dict(std::move(d));
    }
    default: return Value::none();  // binary / discarded: not produced by JSON text
  }
}

Value from_json(const nlohmann::ordered_json& j) { return from_json_impl(j); }
Value from_json(const nlohmann::json& j) { return from_json_impl(j); }

static void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  bool ascii = true;
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) { ascii = false; break; }
  auto put_u = [&](unsigned x) {
    char b[16];
    std::snprintf(b, sizeof(b), "\\u%04x", x);
    out += b;
  };
  auto put_ascii = [&](char32_t c) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) put_u(c);
        else out += static_cast<char>(c);
    }
  };
  if (ascii) {
    for (char c : s) put_ascii(static_cast<unsigned char>(c));
  } else {
    for (char32_t c : utf8_decode(s)) {
      if (c < 0x80) {
        put_ascii(c);
      } else if (!ensure_ascii) {
        utf8_append(out, c);
      } else if (c < 0x10000) {
        put_u(c);
      } else {
        char32_t v = c - 0x10000;
        put_u(0xD800 + (v >> 10));
        put_u(0xDC00 + (v & 0x3FF));
      }
    }
  }
  out += '"';
}

static std::string json_float(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  return float_repr(d);
}

static void json_dump(std::string& out, const Value& v, const JsonOptions& o, int level) {
  RecursionGuard guard;
  auto newline = [&](int lvl) {
    out += '\n';
    for (int k = 0; k < lvl; ++k) out += o.indent;
  };
  switch (v.kind) {
    case Kind::kNone: out += "null"; return;
    case Kind::kBool: out += v.flag ? "true" : "false"; return;
    case Kind::kInt: out += std::to_string(v.i); return;
    case Kind::kFloat: out += json_float(v.f); return;
    case Kind::kString: json_string(out, v.s, o.ensure_ascii); return;
    case Kind::kList: {
      if (seq_tag(v)) fail("TypeError: Object of type " + type_name(v) + " is not JSON serializable");
      const auto& items = v.items();
      if (items.empty()) { out += "[]"; return; }
      out += '[';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += o.item_sep;
        if (o.has_indent) newline(level + 1);
        json_dump(out, items[k], o, level + 1);
      }
      if (o.has_indent) newline(level);
      out += ']';
      return;
    }
    case Kind::kDict: {
      const auto& items = v.entries().items;
      if (items.empty()) { out += "{}"; return; }
      std::vector<std::pair<std::string, const Value*>> kvs;
      kvs.reserve(items.size());
      for (const auto& kv : items) {
        std::string key;
        switch (kv.first.kind) {
          case Kind::kString: key = kv.first.s; break;
          case Kind::kInt: key = std::to_string(kv.first.i); break;
          case Kind::kFloat: key = json_float(kv.first.f); break;
          case Kind::kBool: key = kv.first.flag ? "true" : "false"; break;
          case Kind::kNone: key = "null"; break;
          default:
            fail("TypeError: keys must be str, int, float, bool or None, not " + type_name(kv.first));
        }
        kvs.emplace_back(std::move(key), &kv.second);
      }
      if (o.sort_keys)
        std::stable_sort(kvs.begin(), kvs.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      for (size_t k = 0; k < kvs.size(); ++k) {
        if (k) out += o.item_sep;
        if (o.has_indent) newline(level + 1);
        json_string(out, kvs[k].first, o.ensure_ascii);
        out += o.key_sep;
        json_dump(out, *kvs[k].second, o, level + 1);
      }
      if (o.has_indent) newline(level);
      out += '}';
      return;
    }
    default:
      fail("TypeError: Object of type " + type_name(v) + " is not JSON serializable");
  }
}

std::string to_json(const Value& v, const JsonOptions& opts) {
  std::string out;
  json_dump(out, v, opts, 0);
  return out;
}

}  // namespace kiln::chat::jinja
