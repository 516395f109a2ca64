// jinja2's filters and tests, Python's str/dict/list methods, and the globals of transformers'
// chat-template environment, each with the Python behaviour templates observe (argument names and
// order, return types, generators vs lists, errors).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <optional>
#include <unordered_map>

#include "chat/jinja_render.h"

namespace kiln::chat::jinja {

// ---------------------------------------------------------------------------------------------
// Argument binding

Value ArgReader::get(size_t idx, const char* name, Value def) {
  bool by_pos = idx < a_.pos.size();
  for (auto& kv : a_.kw)
    if (kv.first == name) {
      if (by_pos) fail("TypeError: " + fname_ + "() got multiple values for argument '" + name + "'");
      used_.push_back(name);
      return kv.second;
    }
  if (by_pos) return a_.pos[idx];
  return def;
}

bool ArgReader::has(size_t idx, const char* name) const {
  if (idx < a_.pos.size()) return true;
  for (auto& kv : a_.kw)
    if (kv.first == name) return true;
  return false;
}

void ArgReader::finish(size_t max_positional) {
  if (a_.pos.size() > max_positional)
    fail("TypeError: " + fname_ + "() takes at most " + std::to_string(max_positional) + " argument(s) (" +
         std::to_string(a_.pos.size()) + " given)");
  for (auto& kv : a_.kw)
    if (std::find(used_.begin(), used_.end(), kv.first) == used_.end())
      fail("TypeError: " + fname_ + "() got an unexpected keyword argument '" + kv.first + "'");
}

namespace {

struct BuiltinFn : Callable {
  Value self;
  Value (*fn)(Renderer&, const Value& self, CallArgs&, int) = nullptr;
  Value call(Renderer& r, CallArgs& args, int line) override { return fn(r, self, args, line); }
};

Value make_generator(std::function<bool(Value&)> next_fn, std::string type = "generator") {
  auto it = std::make_shared<IteratorObj>();
  it->next_fn = std::move(next_fn);
  it->type_name = std::move(type);
  Value v;
  v.kind = Kind::kIterator;
  v.obj = std::move(it);
  return v;
}

// An iterator over items computed already (reversed(list), ...).
Value make_iterator(ValueList items, std::string type = "generator") {
  auto state = std::make_shared<std::pair<ValueList, size_t>>(std::move(items), 0);
  return make_generator(
      [state](Value& out) {
        if (state->second >= state->first.size()) return false;
        out = state->first[state->second++];
        return true;
      },
      std::move(type));
}

// Python's iter(value) inside a generator body: pulls lazily from a generator, else walks a copy.
struct Source {
  Value gen;
  ValueList items;
  size_t i = 0;
  explicit Source(const Value& v) {
    if (v.kind == Kind::kIterator) gen = v;
    else items = iterate(v);
  }
  bool next(Value& out) {
    if (gen.kind == Kind::kIterator) return static_cast<IteratorObj*>(gen.obj.get())->next(out);
    if (i >= items.size()) return false;
    out = items[i++];
    return true;
  }
};

// A generator whose body starts with `start` (run at the first pull: Python runs nothing before)
// and then yields `step(item)` results for the items of `input` that `step` accepts.
struct GenState {
  bool started = false;
  bool empty = false;
  std::optional<Source> src;
};

Value security_undefined(const Value& obj, const std::string& attr) {
  Value v = Value::undefined(attr);
  auto* info = static_cast<UndefInfo*>(v.obj.get());
  info->hint = "access to attribute '" + attr + "' of '" + type_name(obj) + "' object is unsafe.";
  info->security = true;
  return v;
}

// sorted(reverse=...) takes an int-like value only.
bool need_flag(const Value& v) {
  if (v.kind == Kind::kBool || v.kind == Kind::kInt) return v.as_int() != 0;
  fail("TypeError: '" + type_name(v) + "' object cannot be interpreted as an integer");
}

int64_t need_int(const Value& v, const char* what) {
  if (v.kind == Kind::kInt || v.kind == Kind::kBool) return v.as_int();
  if (v.is_undefined()) fail_undefined(v);
  fail(std::string("TypeError: ") + what + ": '" + type_name(v) + "' object cannot be interpreted as an integer");
}

std::string need_str(const Value& v, const char* what) {
  if (v.is_string()) return v.s;
  if (v.is_undefined()) fail_undefined(v);
  fail(std::string("TypeError: ") + what + " must be str, not " + type_name(v));
}

bool is_ascii(const std::string& s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

// Python str.strip/lstrip/rstrip.
std::string py_strip(const std::string& s, const Value& chars, bool left, bool right) {
  std::vector<char32_t> set;
  bool ws = chars.is_none();
  if (!ws) {
    if (!chars.is_string()) fail("TypeError: strip arg must be None or str");
    set = utf8_decode(chars.s);
  }
  auto strip_it = [&](char32_t c) {
    return ws ? py_isspace(c) : std::find(set.begin(), set.end(), c) != set.end();
  };
  auto cps = utf8_decode(s);
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_it(cps[b])) ++b;
  if (right)
    while (e > b && strip_it(cps[e - 1])) --e;
  return utf8_encode(std::vector<char32_t>(cps.begin() + static_cast<std::ptrdiff_t>(b), cps.begin() + static_cast<std::ptrdiff_t>(e)));
}

std::string py_replace(const std::string& s, const std::string& old, const std::string& rep, int64_t count) {
  if (count < 0) count = INT64_MAX;
  std::string out;
  if (old.empty()) {
    auto cps = utf8_decode(s);
    int64_t done = 0;
    for (size_t k = 0; k <= cps.size(); ++k) {
      if (done < count) {
        out += rep;
        ++done;
      }
      if (k < cps.size()) utf8_append(out, cps[k]);
    }
    return out;
  }
  size_t pos = 0;
  int64_t done = 0;
  while (done < count) {
    size_t f = s.find(old, pos);
    if (f == std::string::npos) break;
    out.append(s, pos, f - pos);
    out += rep;
    pos = f + old.size();
    ++done;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

ValueList py_split(const std::string& s, const Value& sep, int64_t maxsplit) {
  ValueList out;
  if (!sep.is_none() && !sep.is_string()) fail("TypeError: must be str or None, not " + type_name(sep));
  if (sep.is_none()) {
    auto cps = utf8_decode(s);
    size_t i = 0, n = cps.size();
    int64_t splits = 0;
    while (true) {
      while (i < n && py_isspace(cps[i])) ++i;
      if (i >= n) break;
      if (maxsplit >= 0 && splits >= maxsplit) {
        size_t e = n;
        while (e > i && py_isspace(cps[e - 1])) --e;
        out.push_back(Value::string(utf8_encode(std::vector<char32_t>(cps.begin() + static_cast<std::ptrdiff_t>(i), cps.begin() + static_cast<std::ptrdiff_t>(e)))));
        break;
      }
      size_t j = i;
      while (j < n && !py_isspace(cps[j])) ++j;
      out.push_back(Value::string(utf8_encode(std::vector<char32_t>(cps.begin() + static_cast<std::ptrdiff_t>(i), cps.begin() + static_cast<std::ptrdiff_t>(j)))));
      ++splits;
      i = j;
    }
    return out;
  }
  std::string sp = need_str(sep, "separator");
  if (sp.empty()) fail("ValueError: empty separator");
  size_t pos = 0;
  int64_t splits = 0;
  while (maxsplit < 0 || splits < maxsplit) {
    size_t f = s.find(sp, pos);
    if (f == std::string::npos) break;
    out.push_back(Value::string(s.substr(pos, f - pos)));
    pos = f + sp.size();
    ++splits;
  }
  out.push_back(Value::string(s.substr(pos)));
  return out;
}

ValueList py_rsplit(const std::string& s, const Value& sep, int64_t maxsplit) {
  if (maxsplit < 0) return py_split(s, sep, maxsplit);
  ValueList out;
  if (!sep.is_none() && !sep.is_string()) fail("TypeError: must be str or None, not " + type_name(sep));
  if (sep.is_none()) {
    auto cps = utf8_decode(s);
    int64_t i = static_cast<int64_t>(cps.size());
    int64_t splits = 0;
    while (true) {
      while (i > 0 && py_isspace(cps[static_cast<size_t>(i - 1)])) --i;
      if (i <= 0) break;
      if (splits >= maxsplit) {
        size_t b = 0;
        while (b < static_cast<size_t>(i) && py_isspace(cps[b])) ++b;
        out.push_back(Value::string(utf8_encode(std::vector<char32_t>(cps.begin() + static_cast<std::ptrdiff_t>(b), cps.begin() + i))));
        break;
      }
      int64_t j = i;
      while (j > 0 && !py_isspace(cps[static_cast<size_t>(j - 1)])) --j;
      out.push_back(Value::string(utf8_encode(std::vector<char32_t>(cps.begin() + j, cps.begin() + i))));
      ++splits;
      i = j;
    }
    std::reverse(out.begin(), out.end());
    return out;
  }
  std::string sp = need_str(sep, "separator");
  if (sp.empty()) fail("ValueError: empty separator");
  size_t end = s.size();
  int64_t splits = 0;
  while (splits < maxsplit) {
    if (end < sp.size()) break;
    size_t f = s.rfind(sp, end - sp.size());
    if (f == std::string::npos) break;
    out.push_back(Value::string(s.substr(f + sp.size(), end - f - sp.size())));
    end = f;
    ++splits;
  }
  out.push_back(Value::string(s.substr(0, end)));
  std::reverse(out.begin(), out.end());
  return out;
}

ValueList py_splitlines(const std::string& s, bool keepends) {
  ValueList out;
  auto cps = utf8_decode(s);
  size_t start = 0, i = 0, n = cps.size();
  auto is_break = [](char32_t c) {
    return c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D || c == 0x1E || c == 0x85 ||
           c == 0x2028 || c == 0x2029;
  };
  while (i < n) {
    if (is_break(cps[i])) {
      size_t eol = i;
      size_t next = i + 1;
      if (cps[i] == '\r' && next < n && cps[next] == '\n') ++next;
      size_t end = keepends ? next : eol;
      out.push_back(Value::string(utf8_encode(std::vector<char32_t>(cps.begin() + static_cast<std::ptrdiff_t>(start), cps.begin() + static_cast<std::ptrdiff_t>(end)))));
      start = i = next;
    } else {
      ++i;
    }
  }
  if (start < n)
    out.push_back(Value::string(utf8_encode(std::vector<char32_t>(cps.begin() + static_cast<std::ptrdiff_t>(start), cps.end()))));
  return out;
}

std::string py_capitalize(const std::string& s) {
  auto cps = utf8_decode(s);
  std::string out;
  for (size_t k = 0; k < cps.size(); ++k) {
    if (k == 0 && cps[k] == 0xDF) { out += "Ss"; continue; }
    utf8_append(out, k == 0 ? py_upper(cps[k]) : py_lower(cps[k]));
  }
  return out;
}

bool is_cased(char32_t c) { return py_upper(c) != c || py_lower(c) != c || c == 0xDF; }

// Python str.title(): a cased character starts a word unless it follows another cased one.
std::string py_title(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (char32_t c : utf8_decode(s)) {
    if (is_cased(c)) {
      utf8_append(out, prev_cased ? py_lower(c) : py_upper(c));
      prev_cased = true;
    } else {
      utf8_append(out, c);
      prev_cased = false;
    }
  }
  return out;
}

// jinja2's do_title: not str.title(); words begin after runs of [-\s({\[<].
std::string jinja_title(const std::string& s) {
  std::string out;
  bool at_start = true;
  for (char32_t c : utf8_decode(s)) {
    bool sep = c == '-' || py_isspace(c) || c == '(' || c == '{' || c == '[' || c == '<';
    if (sep) {
      utf8_append(out, c);
      at_start = true;
    } else {
      utf8_append(out, at_start ? py_upper(c) : py_lower(c));
      at_start = false;
    }
  }
  return out;
}

// Python float(str): optional sign, digits with single underscores, inf/nan, surrounding spaces.
bool parse_py_float(const std::string& raw, double& out) {
  std::string s = py_strip(raw, Value::none(), true, true);
  if (s.empty()) return false;
  std::string t;
  size_t i = 0;
  if (s[0] == '+' || s[0] == '-') t += s[i++];
  std::string rest = str_lower(s.substr(i));
  if (rest == "inf" || rest == "infinity" || rest == "nan") {
    out = std::strtod((t + rest).c_str(), nullptr);
    return true;
  }
  bool digits = false, dot = false, exp = false;
  char prev = 0;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (c >= '0' && c <= '9') { digits = true; t += c; }
    else if (c == '_') {
      if (!(prev >= '0' && prev <= '9') || i + 1 >= s.size() || !(s[i + 1] >= '0' && s[i + 1] <= '9')) return false;
    } else if (c == '.' && !dot && !exp) { dot = true; t += c; }
    else if ((c == 'e' || c == 'E') && digits && !exp) {
      exp = true;
      t += c;
      if (i + 1 < s.size() && (s[i + 1] == '+' || s[i + 1] == '-')) t += s[++i];
      if (i + 1 >= s.size()) return false;
      digits = false;
    } else return false;
    prev = c;
  }
  if (!digits) return false;
  out = std::strtod(t.c_str(), nullptr);
  return true;
}

// Python int(str, 10).
bool parse_py_int(const std::string& raw, int64_t& out) {
  std::string s = py_strip(raw, Value::none(), true, true);
  if (s.empty()) return false;
  size_t i = 0;
  bool neg = false;
  if (s[0] == '+' || s[0] == '-') neg = s[i++] == '-';
  if (i >= s.size()) return false;
  int64_t v = 0;
  char prev = 0;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (c == '_') {
      if (!(prev >= '0' && prev <= '9') || i + 1 >= s.size()) return false;
      prev = c;
      continue;
    }
    if (c < '0' || c > '9') return false;
    if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, c - '0', &v))
      fail("OverflowError: integer too large");
    prev = c;
  }
  if (prev == '_') return false;
  out = neg ? -v : v;
  return true;
}

// markupsafe: string methods of a Markup return Markup.
Value keep_markup(const Value& in, std::string s) {
  return in.is_markup() ? Value::markup(std::move(s)) : Value::string(std::move(s));
}

Value lower_if_str(const Value& v) { return v.is_string() ? Value::string(str_lower(v.s)) : v; }

// jinja2's make_attrgetter: "a.b.0" walks getitem (dict key first, then attribute).
Value get_attr_path(Renderer& r, const Value& item, const Value& attribute, const Value& def = Value::none()) {
  if (attribute.is_none() || attribute.is_undefined()) return item;
  std::vector<Value> parts;
  if (attribute.is_string()) {
    size_t pos = 0;
    while (true) {
      size_t dot = attribute.s.find('.', pos);
      std::string part = attribute.s.substr(pos, dot == std::string::npos ? std::string::npos : dot - pos);
      bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
      if (digits) parts.push_back(Value::integer(std::strtoll(part.c_str(), nullptr, 10)));
      else parts.push_back(Value::string(part));
      if (dot == std::string::npos) break;
      pos = dot + 1;
    }
  } else {
    parts.push_back(attribute);
  }
  Value cur = item;
  for (const auto& p : parts) {
    cur = r.getitem(cur, p);
    if (!def.is_none() && cur.is_undefined()) cur = def;
  }
  return cur;
}

// Python's sorted(): stable, `reverse` keeps the order of equal elements.
void py_sort(std::vector<std::pair<Value, Value>>& keyed, bool reverse) {
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    return reverse ? less(y.first, x.first) : less(x.first, y.first);
  });
}

// ---------------------------------------------------------------------------------------------
// Python formatting: %-format and format-spec.

struct Spec {
  char fill = ' ';
  char align = 0;
  char sign = '-';
  bool alt = false;
  bool zero = false;
  int width = -1;
  int precision = -1;
  char type = 0;
};

std::string pad(std::string body, const Spec& sp, char default_align) {
  size_t len = utf8_length(body);
  if (sp.width < 0 || static_cast<int>(len) >= sp.width) return body;
  size_t n = static_cast<size_t>(sp.width) - len;
  char align = sp.align ? sp.align : default_align;
  std::string fill;
  utf8_append(fill, static_cast<unsigned char>(sp.fill));
  auto rep = [&](size_t k) {
    std::string r;
    for (size_t q = 0; q < k; ++q) r += fill;
    return r;
  };
  if (align == '<') return body + rep(n);
  if (align == '^') return rep(n / 2) + body + rep(n - n / 2);
  if (align == '=') {
    size_t signlen = (!body.empty() && (body[0] == '-' || body[0] == '+' || body[0] == ' ')) ? 1 : 0;
    return body.substr(0, signlen) + rep(n) + body.substr(signlen);
  }
  return rep(n) + body;
}

std::string format_number(const Value& v, Spec sp) {
  char type = sp.type;
  if (v.kind == Kind::kFloat || type == 'f' || type == 'F' || type == 'e' || type == 'E' || type == 'g' ||
      type == 'G' || type == '%') {
    double d = v.as_double();
    std::string body;
    if (!type) {
      if (sp.precision < 0) body = float_repr(d);
      else {
        char buf[1024];
        std::snprintf(buf, sizeof(buf), "%.*g", std::min(sp.precision == 0 ? 1 : sp.precision, 300), d);
        body = buf;
      }
    } else {
      int prec = sp.precision < 0 ? 6 : sp.precision;
      char fmt[16];
      char t = type == '%' ? 'f' : type;
      std::snprintf(fmt, sizeof(fmt), "%%%s.*%c", sp.alt ? "#" : "", t);
      char buf[1024];
      std::snprintf(buf, sizeof(buf), fmt, std::min(prec, 300), type == '%' ? d * 100 : d);
      body = buf;
      if (type == '%') body += '%';
    }
    if (sp.sign == '+' && d >= 0 && !std::signbit(d)) body = "+" + body;
    if (sp.sign == ' ' && d >= 0 && !std::signbit(d)) body = " " + body;
    if (sp.zero && !sp.align) { sp.fill = '0'; sp.align = '='; }
    return pad(body, sp, '>');
  }
  int64_t x = v.as_int();
  std::string body;
  uint64_t mag = x < 0 ? 0 - static_cast<uint64_t>(x) : static_cast<uint64_t>(x);
  char buf[80];
  switch (type) {
    case 'x': std::snprintf(buf, sizeof(buf), "%llx", static_cast<unsigned long long>(mag)); body = std::string(sp.alt ? "0x" : "") + buf; break;
    case 'X': std::snprintf(buf, sizeof(buf), "%llX", static_cast<unsigned long long>(mag)); body = std::string(sp.alt ? "0X" : "") + buf; break;
    case 'o': std::snprintf(buf, sizeof(buf), "%llo", static_cast<unsigned long long>(mag)); body = std::string(sp.alt ? "0o" : "") + buf; break;
    case 'b': {
      std::string b;
      uint64_t m = mag;
      do { b += static_cast<char>('0' + (m & 1)); m >>= 1; } while (m);
      std::reverse(b.begin(), b.end());
      body = std::string(sp.alt ? "0b" : "") + b;
      break;
    }
    case 'c': {
      std::string c;
      utf8_append(c, static_cast<char32_t>(x));
      return pad(c, sp, '<');
    }
    default: std::snprintf(buf, sizeof(buf), "%llu", static_cast<unsigned long long>(mag)); body = buf;
  }
  if (x < 0) body = "-" + body;
  else if (sp.sign == '+') body = "+" + body;
  else if (sp.sign == ' ') body = " " + body;
  if (sp.zero && !sp.align) { sp.fill = '0'; sp.align = '='; }
  return pad(body, sp, '>');
}

// format(value, spec) for str.format.
std::string format_spec(const Value& v, const std::string& spec) {
  if (spec.empty()) return to_str(v);
  Spec sp;
  size_t i = 0;
  auto is_align = [](char c) { return c == '<' || c == '>' || c == '^' || c == '='; };
  if (spec.size() >= 2 && is_align(spec[1])) { sp.fill = spec[0]; sp.align = spec[1]; i = 2; }
  else if (is_align(spec[0])) { sp.align = spec[0]; i = 1; }
  if (i < spec.size() && (spec[i] == '+' || spec[i] == '-' || spec[i] == ' ')) sp.sign = spec[i++];
  if (i < spec.size() && spec[i] == '#') { sp.alt = true; ++i; }
  if (i < spec.size() && spec[i] == '0') { sp.zero = true; ++i; }
  while (i < spec.size() && spec[i] >= '0' && spec[i] <= '9') sp.width = std::min(1000000, (sp.width < 0 ? 0 : sp.width * 10) + (spec[i++] - '0'));
  if (i < spec.size() && spec[i] == '.') {
    ++i;
    sp.precision = 0;
    while (i < spec.size() && spec[i] >= '0' && spec[i] <= '9') sp.precision = std::min(1000000, sp.precision * 10 + (spec[i++] - '0'));
  }
  if (i < spec.size()) sp.type = spec[i++];
  if (i != spec.size()) fail("ValueError: Invalid format specifier '" + spec + "'");
  if (sp.width > 10000) fail("ValueError: format width too large");
  if (sp.precision > 10000) fail("ValueError: format precision too large");
  if (sp.zero && !sp.align) {  // "0" flag: fill with zeros, default alignment of the type
    sp.fill = '0';
    sp.align = (v.is_string() || !v.is_number()) ? '<' : '=';
  }
  if (v.is_string() || (!v.is_number())) {
    if (sp.type && sp.type != 's') fail(std::string("ValueError: Unknown format code '") + sp.type + "' for object of type '" + type_name(v) + "'");
    std::string s = to_str(v);
    if (sp.precision >= 0) {
      auto cps = utf8_decode(s);
      if (cps.size() > static_cast<size_t>(sp.precision)) cps.resize(static_cast<size_t>(sp.precision));
      s = utf8_encode(cps);
    }
    return pad(s, sp, '<');
  }
  if (sp.type == 's') fail("ValueError: Unknown format code 's' for object of type '" + type_name(v) + "'");
  if (v.kind != Kind::kFloat && !sp.type && sp.precision < 0) sp.type = 'd';
  if (v.kind == Kind::kFloat && (sp.type == 'd' || sp.type == 'x' || sp.type == 'X' || sp.type == 'o' || sp.type == 'b' || sp.type == 'c'))
    fail(std::string("ValueError: Unknown format code '") + sp.type + "' for object of type 'float'");
  return format_number(v, sp);
}

std::string str_format(Renderer& r, const std::string& fmt, CallArgs& args) {
  std::string out;
  size_t auto_idx = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    char c = fmt[i];
    if (c == '}') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}') { out += '}'; ++i; continue; }
      fail("ValueError: Single '}' encountered in format string");
    }
    if (c != '{') { out += c; continue; }
    if (i + 1 < fmt.size() && fmt[i + 1] == '{') { out += '{'; ++i; continue; }
    size_t close = fmt.find('}', i);
    if (close == std::string::npos) fail("ValueError: Single '{' encountered in format string");
    std::string field = fmt.substr(i + 1, close - i - 1);
    i = close;
    std::string spec;
    size_t colon = field.find(':');
    if (colon != std::string::npos) { spec = field.substr(colon + 1); field = field.substr(0, colon); }
    char conv = 0;
    size_t bang = field.find('!');
    if (bang != std::string::npos) { conv = bang + 1 < field.size() ? field[bang + 1] : 0; field = field.substr(0, bang); }
    // field: name_or_index(.attr|[key])*
    size_t e = 0;
    while (e < field.size() && field[e] != '.' && field[e] != '[') ++e;
    std::string head = field.substr(0, e);
    Value v;
    if (head.empty()) {
      if (auto_idx >= args.pos.size()) fail("IndexError: Replacement index " + std::to_string(auto_idx) + " out of range for positional args tuple");
      v = args.pos[auto_idx++];
    } else if (std::all_of(head.begin(), head.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) {
      size_t idx = std::strtoull(head.c_str(), nullptr, 10);
      if (idx >= args.pos.size()) fail("IndexError: Replacement index " + head + " out of range for positional args tuple");
      v = args.pos[idx];
    } else {
      bool found = false;
      for (auto& kv : args.kw)
        if (kv.first == head) { v = kv.second; found = true; }
      if (!found) fail("KeyError: '" + head + "'");
    }
    while (e < field.size()) {
      if (field[e] == '.') {
        size_t s2 = ++e;
        while (e < field.size() && field[e] != '.' && field[e] != '[') ++e;
        v = r.getattr(v, field.substr(s2, e - s2));
      } else {
        size_t s2 = ++e;
        size_t cl = field.find(']', s2);
        if (cl == std::string::npos) fail("ValueError: Missing ']' in format string");
        std::string key = field.substr(s2, cl - s2);
        bool digits = !key.empty() && std::all_of(key.begin(), key.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
        v = r.getitem(v, digits ? Value::integer(std::strtoll(key.c_str(), nullptr, 10)) : Value::string(key));
        e = cl + 1;
      }
    }
    if (conv == 'r' || conv == 'a') v = Value::string(to_repr(v));
    else if (conv == 's') v = Value::string(to_str(v));
    std::string piece = format_spec(v, spec);
    out += piece;
    r.check_output(out.size(), piece.size());
  }
  return out;
}

}  // namespace

Value python_mod_format(const std::string& fmt, const Value& args, bool markup) {
  ValueList pos;
  const DictData* mapping = nullptr;
  if (args.is_list() && args.flag) pos = args.items();
  else if (args.is_dict()) { mapping = &args.entries(); pos.push_back(args); }
  else pos.push_back(args);
  size_t next = 0;
  bool used_mapping = false;
  std::string out;
  auto take = [&]() -> Value {
    if (next >= pos.size()) fail("TypeError: not enough arguments for format string");
    return pos[next++];
  };
  for (size_t i = 0; i < fmt.size(); ++i) {
    char c = fmt[i];
    if (c != '%') { out += c; continue; }
    if (++i >= fmt.size()) fail("ValueError: incomplete format");
    if (fmt[i] == '%') {
      out += '%';
      continue;
    }
    Value v;
    bool have_v = false;
    if (fmt[i] == '(') {
      size_t close = fmt.find(')', i);
      if (close == std::string::npos) fail("ValueError: incomplete format key");
      if (!mapping) fail("TypeError: format requires a mapping");
      std::string key = fmt.substr(i + 1, close - i - 1);
      const Value* found = mapping->find(std::string_view(key));
      if (!found) fail("KeyError: '" + key + "'");
      v = *found;
      have_v = true;
      used_mapping = true;
      i = close + 1;
    }
    Spec sp;
    sp.align = '>';
    for (; i < fmt.size(); ++i) {
      char f = fmt[i];
      if (f == '-') sp.align = '<';
      else if (f == '+') sp.sign = '+';
      else if (f == ' ') { if (sp.sign != '+') sp.sign = ' '; }
      else if (f == '#') sp.alt = true;
      else if (f == '0') sp.zero = true;
      else break;
    }
    if (i < fmt.size() && fmt[i] == '*') { sp.width = static_cast<int>(std::clamp<int64_t>(need_int(take(), "* wants int"), -1000000, 1000000)); ++i; }
    else while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') sp.width = std::min(1000000, (sp.width < 0 ? 0 : sp.width * 10) + (fmt[i++] - '0'));
    if (i < fmt.size() && fmt[i] == '.') {
      ++i;
      sp.precision = 0;
      if (i < fmt.size() && fmt[i] == '*') { sp.precision = static_cast<int>(std::clamp<int64_t>(need_int(take(), "* wants int"), 0, 1000000)); ++i; }
      else while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') sp.precision = std::min(1000000, sp.precision * 10 + (fmt[i++] - '0'));
    }
    while (i < fmt.size() && (fmt[i] == 'l' || fmt[i] == 'h' || fmt[i] == 'L')) ++i;
    if (i >= fmt.size()) fail("ValueError: incomplete format");
    if (sp.width > 10000) fail("ValueError: width too big");
    if (sp.precision > 10000) fail("ValueError: precision too big");
    char t = fmt[i];
    if (t == '%') fail("ValueError: unsupported format character '%' (0x25)");
    if (!have_v) v = take();
    if (sp.zero && sp.align == '>') { sp.fill = '0'; sp.align = '='; }
    switch (t) {
      case 's':
      case 'r':
      case 'a': {
        std::string s = t == 's' ? to_str(v) : to_repr(v);
        if (markup && !(t == 's' && v.is_markup())) s = html_escape(s);  // Markup % args escapes them
        if (sp.precision >= 0) {
          auto cps = utf8_decode(s);
          if (cps.size() > static_cast<size_t>(sp.precision)) cps.resize(static_cast<size_t>(sp.precision));
          s = utf8_encode(cps);
        }
        Spec p2 = sp;
        p2.fill = ' ';
        if (p2.align == '=') p2.align = '>';
        out += pad(s, p2, '>');
        break;
      }
      case 'd': case 'i': case 'u': case 'x': case 'X': case 'o': case 'c': {
        if (v.is_undefined()) fail_undefined(v);
        if (!v.is_number()) fail(std::string("TypeError: %") + t + " format: a real number is required, not " + type_name(v));
        Value iv = v.kind == Kind::kFloat ? Value::integer(static_cast<int64_t>(std::trunc(v.f))) : Value::integer(v.as_int());
        Spec p2 = sp;
        p2.type = (t == 'i' || t == 'u') ? 'd' : t;
        if (p2.precision >= 0) {  // %.3d pads with zeros to the precision
          std::string digits = std::to_string(iv.i < 0 ? -iv.i : iv.i);
          if (static_cast<int>(digits.size()) < p2.precision)
            digits = std::string(static_cast<size_t>(p2.precision) - digits.size(), '0') + digits;
          std::string body = (iv.i < 0 ? "-" : (p2.sign == '+' ? "+" : p2.sign == ' ' ? " " : "")) + digits;
          out += pad(body, p2, '>');
        } else {
          out += format_number(iv, p2);
        }
        break;
      }
      case 'f': case 'F': case 'e': case 'E': case 'g': case 'G': {
        if (v.is_undefined()) fail_undefined(v);
        if (!v.is_number()) fail("TypeError: must be real number, not " + type_name(v));
        Spec p2 = sp;
        p2.type = t;
        if (p2.align == '=' && !sp.zero) p2.align = '>';
        out += format_number(Value::real(v.as_double()), p2);
        break;
      }
      default: fail(std::string("ValueError: unsupported format character '") + t + "'");
    }
  }
  if (next < pos.size() && !used_mapping && !mapping) fail("TypeError: not all arguments converted during string formatting");
  return markup ? Value::markup(std::move(out)) : Value::string(std::move(out));
}

Value slice_value(const Value& obj, const Value& start_v, const Value& stop_v, const Value& step_v) {
  auto idx = [](const Value& v, const char* what) -> std::optional<int64_t> {
    if (v.is_none()) return std::nullopt;
    if (v.kind == Kind::kInt || v.kind == Kind::kBool) return v.as_int();
    if (v.is_undefined()) fail_undefined(v);
    (void)what;
    fail("TypeError: slice indices must be integers or None or have an __index__ method");
  };
  auto start = idx(start_v, "start"), stop = idx(stop_v, "stop"), stepo = idx(step_v, "step");
  int64_t step = stepo.value_or(1);
  // Slices bypass jinja2's environment.getitem: a plain Python subscript, errors and all.
  const SeqTag* tag = seq_tag(obj);
  if (obj.is_dict()) fail("TypeError: unhashable type: 'slice'");
  if ((!obj.is_list() && !obj.is_string()) || (tag && tag->type != SeqTag::kRange))
    fail("TypeError: '" + type_name(obj) + "' object is not subscriptable");
  if (step == 0) fail("ValueError: slice step cannot be zero");
  std::vector<char32_t> cps;
  int64_t n;
  bool ascii = obj.is_string() && is_ascii(obj.s);
  if (obj.is_list()) n = static_cast<int64_t>(obj.items().size());
  else if (ascii) n = static_cast<int64_t>(obj.s.size());
  else { cps = utf8_decode(obj.s); n = static_cast<int64_t>(cps.size()); }
  // CPython's PySlice_AdjustIndices.
  int64_t lo, hi;
  auto adjust = [&](std::optional<int64_t> v, int64_t def) {
    if (!v) return def;
    int64_t x = *v;
    if (x < 0) {
      x += n;
      if (x < 0) x = step < 0 ? -1 : 0;
    } else if (x >= n) {
      x = step < 0 ? n - 1 : n;
    }
    return x;
  };
  lo = adjust(start, step < 0 ? n - 1 : 0);
  hi = adjust(stop, step < 0 ? -1 : n);
  std::vector<int64_t> picks;
  if (step > 0) for (int64_t k = lo; k < hi; k += step) picks.push_back(k);
  else for (int64_t k = lo; k > hi; k += step) picks.push_back(k);
  if (tag) {  // a slice of a range is a range
    int64_t r_start = tag->start + lo * tag->step;
    int64_t r_step = tag->step * step;
    int64_t r_stop = tag->start + hi * tag->step;
    Value r = make_range(r_start, r_stop, r_step);
    return r;
  }
  if (obj.is_list()) {
    ValueList out;
    out.reserve(picks.size());
    for (int64_t k : picks) out.push_back(obj.items()[static_cast<size_t>(k)]);
    return Value::make_list(std::move(out), obj.flag);
  }
  std::string out;
  if (ascii) {
    if (step == 1) return keep_markup(obj, lo < hi ? obj.s.substr(static_cast<size_t>(lo), static_cast<size_t>(hi - lo)) : "");
    for (int64_t k : picks) out += obj.s[static_cast<size_t>(k)];
  } else {
    for (int64_t k : picks) utf8_append(out, cps[static_cast<size_t>(k)]);
  }
  return keep_markup(obj, std::move(out));
}

namespace {

// ---------------------------------------------------------------------------------------------
// Filters

#define FILTER(fname) Value filter_##fname(Renderer& r, const Value& in, CallArgs& args, int line)

FILTER(abs) {
  ArgReader a(args, "abs");
  a.finish(0);
  if (in.kind == Kind::kFloat) return Value::real(std::fabs(in.f));
  if (in.kind == Kind::kInt || in.kind == Kind::kBool) {
    if (in.as_int() == INT64_MIN) fail("OverflowError: integer result out of range");
    return Value::integer(std::llabs(in.as_int()));
  }
  fail("TypeError: bad operand type for abs(): '" + type_name(in) + "'");
}

FILTER(attr) {
  ArgReader a(args, "attr");
  if (!a.has(0, "name")) fail("TypeError: do_attr() missing 1 required positional argument: 'name'");
  Value name = a.get(0, "name");
  a.finish(1);
  // jinja2's do_attr: the attribute only, never an item of a mapping.
  std::string n = to_str(name);
  if (in.is_undefined()) fail_undefined(in);
  if (in.kind == Kind::kNamespace || in.kind == Kind::kLoop) return r.getattr(in, n);
  Value m = find_method(in, n);
  if (!m.is_undefined() || (m.obj && static_cast<UndefInfo*>(m.obj.get())->security)) return m;
  return Value::undefined_attr(in, Value::string(n));
}

FILTER(batch) {
  CallArgs saved = args;
  Value input = in;
  auto st = std::make_shared<GenState>();
  return make_generator([st, saved, input](Value& out) mutable {
    if (!st->started) {
      st->started = true;
      ArgReader a(saved, "batch");
      int64_t n = need_int(a.get(0, "linecount"), "batch");
      Value fill = a.get(1, "fill_with", Value::none());
      a.finish(2);
      ValueList all, tmp;
      for (auto& item : iterate(input)) {
        if (static_cast<int64_t>(tmp.size()) == n) {
          all.push_back(Value::make_list(std::move(tmp)));
          tmp.clear();
        }
        tmp.push_back(item);
      }
      if (!tmp.empty()) {
        if (!fill.is_none())
          while (static_cast<int64_t>(tmp.size()) < n) tmp.push_back(fill);
        all.push_back(Value::make_list(std::move(tmp)));
      }
      st->src.emplace(Value::make_list(std::move(all)));
    }
    return st->src->next(out);
  });
}

FILTER(capitalize) {
  ArgReader a(args, "capitalize");
  a.finish(0);
  return keep_markup(in, py_capitalize(to_str(in)));
}

FILTER(center) {
  ArgReader a(args, "center");
  int64_t width = need_int(a.get(0, "width", Value::integer(80)), "center");
  a.finish(1);
  Spec sp;
  sp.width = static_cast<int>(std::min<int64_t>(width, 100000));
  sp.align = '^';
  // Python's str.center puts the extra space on the right when the padding is odd and the
  // string length is even... it uses left = pad/2 + (pad & width & 1).
  std::string s = to_str(in);
  int64_t len = static_cast<int64_t>(utf8_length(s));
  if (width <= len) return Value::string(s);
  int64_t padn = width - len;
  int64_t left = padn / 2 + (padn & width & 1);
  return Value::string(std::string(static_cast<size_t>(left), ' ') + s + std::string(static_cast<size_t>(padn - left), ' '));
}

FILTER(default) {
  ArgReader a(args, "default");
  Value def = a.get(0, "default_value", Value::string(""));
  Value boolean = a.get(1, "boolean", Value::boolean(false));
  a.finish(2);
  if (in.is_undefined() || (truthy(boolean) && !truthy(in))) return def;
  return in;
}

FILTER(dictsort) {
  ArgReader a(args, "dictsort");
  bool cs = truthy(a.get(0, "case_sensitive", Value::boolean(false)));
  Value by = a.get(1, "by", Value::string("key"));
  bool reverse = need_flag(a.get(2, "reverse", Value::boolean(false)));
  a.finish(3);
  size_t pos;
  if (by.is_string() && by.s == "key") pos = 0;
  else if (by.is_string() && by.s == "value") pos = 1;
  else fail("FilterArgumentError: You can only sort by either \"key\" or \"value\"");
  if (!in.is_dict()) fail("AttributeError: '" + type_name(in) + "' object has no attribute 'items'");
  std::vector<std::pair<Value, Value>> keyed;
  for (const auto& kv : in.entries().items) {
    Value item = Value::make_list({kv.first, kv.second}, true);
    Value key = pos == 0 ? kv.first : kv.second;
    keyed.emplace_back(cs ? key : lower_if_str(key), item);
  }
  py_sort(keyed, reverse);
  ValueList out;
  for (auto& k : keyed) out.push_back(k.second);
  return Value::make_list(std::move(out));
}

FILTER(escape) {
  ArgReader a(args, "escape");
  a.finish(0);
  if (in.is_markup()) return in;
  return Value::markup(html_escape(to_str(in)));
}

FILTER(forceescape) {
  ArgReader a(args, "forceescape");
  a.finish(0);
  return Value::markup(html_escape(to_str(in)));
}

FILTER(first) {
  ArgReader a(args, "first");
  a.finish(0);
  if (in.kind == Kind::kIterator) {
    Value v;
    if (static_cast<IteratorObj*>(in.obj.get())->next(v)) return v;
    return Value::undefined("", "No first item, sequence was empty.");
  }
  if (in.is_list()) {
    if (in.items().empty()) return Value::undefined("", "No first item, sequence was empty.");
    return in.items()[0];
  }
  ValueList items = iterate(in);
  if (items.empty()) return Value::undefined("", "No first item, sequence was empty.");
  return items[0];
}

FILTER(last) {
  ArgReader a(args, "last");
  a.finish(0);
  if (in.kind == Kind::kIterator) fail("TypeError: '" + type_name(in) + "' object is not reversible");
  ValueList items = iterate(in);
  if (items.empty()) return Value::undefined("", "No last item, sequence was empty.");
  return items.back();
}

FILTER(float) {
  ArgReader a(args, "float");
  Value def = a.get(0, "default", Value::real(0.0));
  a.finish(1);
  if (in.is_undefined()) fail_undefined(in);
  if (in.is_number()) return Value::real(in.as_double());
  if (in.is_string()) {
    double d;
    if (parse_py_float(in.s, d)) return Value::real(d);
  }
  return def;
}

FILTER(format) {
  if (!args.pos.empty() && !args.kw.empty())
    fail("FilterArgumentError: can't handle positional and keyword arguments at the same time");
  if (!args.kw.empty()) {
    DictData d;
    for (auto& kv : args.kw) d.set(Value::string(kv.first), kv.second);
    return python_mod_format(to_str(in), Value::make_dict(std::move(d)), in.is_markup());
  }
  return python_mod_format(to_str(in), Value::make_list(args.pos, true), in.is_markup());
}

FILTER(indent) {
  ArgReader a(args, "indent");
  Value width = a.get(0, "width", Value::integer(4));
  bool first = truthy(a.get(1, "first", Value::boolean(false)));
  bool blank = truthy(a.get(2, "blank", Value::boolean(false)));
  a.finish(3);
  std::string ind;
  if (width.is_string()) ind = width.s;
  else {
    int64_t w = need_int(width, "indent");
    if (w > 0) {
      r.check_size(static_cast<size_t>(std::min<int64_t>(w, INT32_MAX)));
      ind = std::string(static_cast<size_t>(w), ' ');
    }
  }
  // do_indent does `s += "\n"` on the value itself: only strings get through.
  if (in.is_undefined()) fail_undefined(in);
  if (in.is_list() && !in.flag && !seq_tag(in)) fail("AttributeError: 'list' object has no attribute 'splitlines'");
  if (!in.is_string()) fail("TypeError: unsupported operand type(s) for +=: '" + type_name(in) + "' and 'str'");
  std::string s = in.s + "\n";
  ValueList lines = py_splitlines(s, false);
  std::string rv;
  if (blank) {
    for (size_t k = 0; k < lines.size(); ++k) {
      if (k) rv += "\n" + ind;
      rv += lines[k].s;
    }
  } else {
    rv = lines.empty() ? "" : lines[0].s;
    if (lines.size() > 1) {
      rv += "\n";
      for (size_t k = 1; k < lines.size(); ++k) {
        if (k > 1) rv += "\n";
        if (!lines[k].s.empty()) rv += ind;
        rv += lines[k].s;
      }
    }
  }
  if (first) rv = ind + rv;
  r.check_size(rv.size());
  return Value::string(std::move(rv));
}

FILTER(int) {
  ArgReader a(args, "int");
  Value def = a.get(0, "default", Value::integer(0));
  Value base = a.get(1, "base", Value::integer(10));
  a.finish(2);
  if (in.is_undefined()) fail_undefined(in);
  if (in.kind == Kind::kInt || in.kind == Kind::kBool) return Value::integer(in.as_int());
  if (in.kind == Kind::kFloat) {
    if (std::isnan(in.f)) return def;
    if (std::isinf(in.f)) fail("OverflowError: cannot convert float infinity to integer");
    if (std::fabs(in.f) >= 9.2e18) fail("OverflowError: integer too large");
    return Value::integer(static_cast<int64_t>(std::trunc(in.f)));
  }
  if (in.is_string() && (base.kind == Kind::kInt || base.kind == Kind::kBool)) {
    int64_t b = base.as_int();
    if (b == 10) {
      int64_t v;
      if (parse_py_int(in.s, v)) return Value::integer(v);
    } else {
      std::string s = py_strip(in.s, Value::none(), true, true);
      char* end = nullptr;
      errno = 0;
      long long v = std::strtoll(s.c_str(), &end, static_cast<int>(b));
      if (b >= 2 && b <= 36 && !s.empty() && end && *end == 0 && errno == 0) return Value::integer(v);
    }
  }
  if (in.is_string()) {
    double d;
    if (parse_py_float(in.s, d)) {
      if (std::isnan(d)) return def;
      if (std::isinf(d)) fail("OverflowError: cannot convert float infinity to integer");
      if (std::fabs(d) >= 9.2e18) fail("OverflowError: integer too large");
      return Value::integer(static_cast<int64_t>(std::trunc(d)));
    }
  }
  return def;
}

FILTER(items) {
  ArgReader a(args, "items");
  a.finish(0);
  Value input = in;
  auto st = std::make_shared<GenState>();
  return make_generator([st, input](Value& out) {
    if (!st->started) {
      st->started = true;
      if (input.is_undefined()) return false;
      if (!input.is_dict()) fail("TypeError: Can only get item pairs from a mapping.");
      ValueList pairs;
      for (const auto& kv : input.entries().items) pairs.push_back(Value::make_list({kv.first, kv.second}, true));
      st->src.emplace(Value::make_list(std::move(pairs)));
    }
    return st->src && st->src->next(out);
  });
}

FILTER(join) {
  ArgReader a(args, "join");
  Value d = a.get(0, "d", Value::string(""));
  Value attribute = a.get(1, "attribute", Value::none());
  a.finish(2);
  std::string sep = to_str(d);
  std::string out;
  bool firstv = true;
  for (auto& item : iterate(in)) {
    if (!firstv) out += sep;
    firstv = false;
    size_t before = out.size();
    out += to_str(attribute.is_none() ? item : get_attr_path(r, item, attribute));
    r.check_output(out.size(), out.size() - before + sep.size());
  }
  return Value::string(std::move(out));
}

FILTER(length) {
  ArgReader a(args, "length");
  a.finish(0);
  return Value::integer(static_cast<int64_t>(py_len(in)));
}

FILTER(list) {
  ArgReader a(args, "list");
  a.finish(0);
  return Value::make_list(iterate(in));
}

FILTER(lower) {
  ArgReader a(args, "lower");
  a.finish(0);
  return keep_markup(in, str_lower(to_str(in)));
}

FILTER(upper) {
  ArgReader a(args, "upper");
  a.finish(0);
  return keep_markup(in, str_upper(to_str(in)));
}

FILTER(map) {
  CallArgs saved = args;
  Value input = in;
  Renderer* rp = &r;
  auto st = std::make_shared<GenState>();
  auto by_attr = std::make_shared<bool>(false);
  auto attribute = std::make_shared<Value>(Value::none());
  auto def = std::make_shared<Value>(Value::none());
  return make_generator([=](Value& out) {
    if (!st->started) {
      st->started = true;
      if (!truthy(input)) return false;
      // jinja2's prepare_map, run with the generator's body.
      *by_attr = saved.pos.empty();
      if (*by_attr) {
        bool have = false;
        for (auto& kv : saved.kw) {
          if (kv.first == "attribute") { *attribute = kv.second; have = true; }
          else if (kv.first == "default") *def = kv.second;
          else fail("FilterArgumentError: Unexpected keyword argument '" + kv.first + "'");
        }
        if (!have) fail("FilterArgumentError: map requires a filter argument");
      } else if (!saved.pos[0].is_string()) {
        fail("TypeError: filter name must be a string");
      }
      st->src.emplace(input);
    }
    Value item;
    if (!st->src->next(item)) return false;
    if (*by_attr) {
      out = get_attr_path(*rp, item, *attribute, *def);
    } else {
      CallArgs sub;
      sub.pos.assign(saved.pos.begin() + 1, saved.pos.end());
      sub.kw = saved.kw;
      out = rp->apply_filter(saved.pos[0].s, item, sub, line);
    }
    return true;
  });
}

Value select_or_reject(Renderer& r, const Value& in, CallArgs& args, int line, bool select, bool lookup_attr) {
  CallArgs saved = args;
  Value input = in;
  Renderer* rp = &r;
  auto st = std::make_shared<GenState>();
  return make_generator([=](Value& out) {
    if (!st->started) {
      st->started = true;
      if (!truthy(input)) return false;
      if (lookup_attr && saved.pos.empty()) fail("FilterArgumentError: Missing parameter for attribute name");
      size_t off = lookup_attr ? 1 : 0;
      if (saved.pos.size() > off && !saved.pos[off].is_string()) fail("TypeError: test name must be a string");
      st->src.emplace(input);
    }
    size_t off = lookup_attr ? 1 : 0;
    Value item;
    while (st->src->next(item)) {
      Value v = lookup_attr ? get_attr_path(*rp, item, saved.pos[0]) : item;
      bool ok;
      if (saved.pos.size() > off) {
        CallArgs sub;
        sub.pos.assign(saved.pos.begin() + static_cast<std::ptrdiff_t>(off) + 1, saved.pos.end());
        sub.kw = saved.kw;
        ok = rp->apply_test(saved.pos[off].s, v, sub, line);
      } else {
        ok = truthy(v);
      }
      if (ok == select) {
        out = item;
        return true;
      }
    }
    return false;
  });
}

FILTER(select) { return select_or_reject(r, in, args, line, true, false); }
FILTER(reject) { return select_or_reject(r, in, args, line, false, false); }
FILTER(selectattr) { return select_or_reject(r, in, args, line, true, true); }
FILTER(rejectattr) { return select_or_reject(r, in, args, line, false, true); }

Value min_max(Renderer& r, const Value& in, CallArgs& args, bool is_max) {
  ArgReader a(args, is_max ? "max" : "min");
  bool cs = truthy(a.get(0, "case_sensitive", Value::boolean(false)));
  Value attribute = a.get(1, "attribute", Value::none());
  a.finish(2);
  ValueList items = iterate(in);
  if (items.empty()) return Value::undefined("", "No aggregated item, sequence was empty.");
  size_t best = 0;
  auto key = [&](const Value& v) {
    Value k = get_attr_path(r, v, attribute);
    return cs ? k : lower_if_str(k);
  };
  Value best_key = key(items[0]);
  for (size_t k = 1; k < items.size(); ++k) {
    Value kk = key(items[k]);
    if (is_max ? less(best_key, kk) : less(kk, best_key)) {
      best = k;
      best_key = kk;
    }
  }
  return items[best];
}

FILTER(max) { return min_max(r, in, args, true); }
FILTER(min) { return min_max(r, in, args, false); }

// pprint.pformat sorts dict keys (its line wrapping of long values is not reproduced).
Value sorted_dicts(const Value& v) {
  RecursionGuard guard;
  if (v.is_dict()) {
    std::vector<std::pair<Value, Value>> kv(v.entries().items.begin(), v.entries().items.end());
    std::stable_sort(kv.begin(), kv.end(), [](const auto& x, const auto& y) { return less(x.first, y.first); });
    DictData d;
    for (auto& e : kv) d.items.emplace_back(e.first, sorted_dicts(e.second));
    return Value::make_dict(std::move(d));
  }
  if (v.is_list() && !seq_tag(v)) {
    ValueList items;
    for (const auto& e : v.items()) items.push_back(sorted_dicts(e));
    return Value::make_list(std::move(items), v.flag);
  }
  return v;
}

FILTER(pprint) {
  ArgReader a(args, "pprint");
  a.finish(0);
  return Value::string(to_repr(sorted_dicts(in)));
}

FILTER(replace) {
  ArgReader a(args, "replace");
  Value old = a.get(0, "old");
  Value rep = a.get(1, "new");
  Value count = a.get(2, "count", Value::none());
  a.finish(3);
  if (!a.has(0, "old") || !a.has(1, "new")) fail("TypeError: do_replace() missing required arguments 'old' and 'new'");
  int64_t c = count.is_none() ? -1 : need_int(count, "replace");
  std::string res = py_replace(to_str(in), to_str(old), to_str(rep), c);
  r.check_size(res.size());
  return Value::string(std::move(res));
}

FILTER(reverse) {
  ArgReader a(args, "reverse");
  a.finish(0);
  if (in.is_string()) return slice_value(in, Value::none(), Value::none(), Value::integer(-1));
  if (in.is_list() || in.is_dict() || in.is_undefined()) {
    ValueList items = iterate(in);
    std::reverse(items.begin(), items.end());
    return make_iterator(std::move(items), in.is_dict() ? "dict_reversekeyiterator" : "list_reverseiterator");
  }
  ValueList items = iterate(in);  // not reversible: jinja2 falls back to a reversed list
  std::reverse(items.begin(), items.end());
  return Value::make_list(std::move(items));
}

FILTER(round) {
  ArgReader a(args, "round");
  int64_t precision = need_int(a.get(0, "precision", Value::integer(0)), "round");
  Value method = a.get(1, "method", Value::string("common"));
  a.finish(2);
  if (!method.is_string() || (method.s != "common" && method.s != "ceil" && method.s != "floor"))
    fail("FilterArgumentError: method must be common, ceil or floor");
  if (in.is_undefined()) fail("TypeError: type Undefined doesn't define __round__ method");
  if (!in.is_number()) fail("TypeError: type " + type_name(in) + " doesn't define __round__ method");
  if (method.s == "common") {
    if (in.kind != Kind::kFloat) {
      if (precision >= 0) return Value::integer(in.as_int());
      double p = std::pow(10.0, static_cast<double>(-precision));
      double y = static_cast<double>(in.as_int()) / p;
      return Value::integer(static_cast<int64_t>(std::nearbyint(y) * p));
    }
    double x = in.f;
    if (!std::isfinite(x)) return Value::real(x);
    if (precision > 300) return Value::real(x);
    if (precision >= 0) {
      char buf[1024];
      std::snprintf(buf, sizeof(buf), "%.*f", static_cast<int>(precision), x);
      return Value::real(std::strtod(buf, nullptr));
    }
    double p = std::pow(10.0, static_cast<double>(-precision));
    return Value::real(std::nearbyint(x / p) * p);
  }
  double p = std::pow(10.0, static_cast<double>(precision));
  double v = in.as_double() * p;
  v = method.s == "ceil" ? std::ceil(v) : std::floor(v);
  return Value::real(v / p);
}

FILTER(safe) {
  ArgReader a(args, "safe");
  a.finish(0);
  return in.is_markup() ? in : Value::markup(to_str(in));
}

FILTER(sort) {
  ArgReader a(args, "sort");
  bool reverse = need_flag(a.get(0, "reverse", Value::boolean(false)));
  bool cs = truthy(a.get(1, "case_sensitive", Value::boolean(false)));
  Value attribute = a.get(2, "attribute", Value::none());
  a.finish(3);
  std::vector<Value> attrs;
  if (attribute.is_string() && attribute.s.find(',') != std::string::npos) {
    for (auto& part : py_split(attribute.s, Value::string(","), -1)) attrs.push_back(part);
  } else {
    attrs.push_back(attribute);
  }
  std::vector<std::pair<Value, Value>> keyed;
  for (auto& item : iterate(in)) {
    ValueList key;
    for (auto& at : attrs) {
      Value k = get_attr_path(r, item, at);
      key.push_back(cs ? k : lower_if_str(k));
    }
    // jinja2's make_multi_attrgetter: the key is always a list, so equal (even undefined)
    // keys compare by == and never reach <.
    keyed.emplace_back(Value::make_list(std::move(key)), item);
  }
  py_sort(keyed, reverse);
  ValueList out;
  for (auto& k : keyed) out.push_back(k.second);
  return Value::make_list(std::move(out));
}

FILTER(string) {
  ArgReader a(args, "string");
  a.finish(0);
  return in.is_markup() ? in : Value::string(to_str(in));
}

FILTER(sum) {
  ArgReader a(args, "sum");
  Value attribute = a.get(0, "attribute", Value::none());
  Value acc = a.get(1, "start", Value::integer(0));
  a.finish(2);
  if (acc.is_string()) fail("TypeError: sum() can't sum strings [use ''.join(seq) instead]");
  for (auto& item : iterate(in)) {
    Value v = get_attr_path(r, item, attribute);
    if (v.is_undefined()) fail_undefined(v);
    bool ok_num = acc.is_number() && v.is_number();
    bool ok_list = acc.is_list() && v.is_list() && acc.flag == v.flag;
    if (!ok_num && !ok_list)
      fail("TypeError: unsupported operand type(s) for +: '" + type_name(acc) + "' and '" + type_name(v) + "'");
    if (ok_list) {
      ValueList l = acc.items();
      l.insert(l.end(), v.items().begin(), v.items().end());
      acc = Value::make_list(std::move(l), acc.flag);
    } else if (acc.kind == Kind::kFloat || v.kind == Kind::kFloat) {
      acc = Value::real(acc.as_double() + v.as_double());
    } else {
      int64_t s;
      if (__builtin_add_overflow(acc.as_int(), v.as_int(), &s)) fail("OverflowError: integer result out of range");
      acc = Value::integer(s);
    }
  }
  return acc;
}

FILTER(title) {
  ArgReader a(args, "title");
  a.finish(0);
  return Value::string(jinja_title(to_str(in)));
}

// transformers' override: json.dumps(x, ensure_ascii=False, indent=None, separators=None,
// sort_keys=False), no HTML escaping.
FILTER(tojson) {
  ArgReader a(args, "tojson");
  JsonOptions o;
  o.ensure_ascii = truthy(a.get(0, "ensure_ascii", Value::boolean(false)));
  Value indent = a.get(1, "indent", Value::none());
  Value seps = a.get(2, "separators", Value::none());
  o.sort_keys = truthy(a.get(3, "sort_keys", Value::boolean(false)));
  a.finish(4);
  if (!indent.is_none()) {
    o.has_indent = true;
    if (indent.is_string()) o.indent = indent.s;
    else {
      int64_t w = need_int(indent, "indent");
      if (w > 0) o.indent = std::string(static_cast<size_t>(std::min<int64_t>(w, 10000)), ' ');
    }
    o.item_sep = ",";
  }
  if (!seps.is_none()) {
    ValueList s = iterate(seps);
    if (s.size() != 2) fail("ValueError: separators must be a (item_separator, key_separator) pair");
    o.item_sep = need_str(s[0], "separator");
    o.key_sep = need_str(s[1], "separator");
  }
  std::string out = to_json(in, o);
  r.check_size(out.size());
  return Value::string(std::move(out));
}

FILTER(trim) {
  ArgReader a(args, "trim");
  Value chars = a.get(0, "chars", Value::none());
  a.finish(1);
  return keep_markup(in, py_strip(to_str(in), chars, true, true));
}

FILTER(truncate) {
  ArgReader a(args, "truncate");
  int64_t length = need_int(a.get(0, "length", Value::integer(255)), "truncate");
  bool killwords = truthy(a.get(1, "killwords", Value::boolean(false)));
  std::string end = to_str(a.get(2, "end", Value::string("...")));
  int64_t leeway = need_int(a.get(3, "leeway", Value::integer(5)), "truncate");
  a.finish(4);
  int64_t end_len = static_cast<int64_t>(utf8_length(end));
  if (!in.is_string()) {  // do_truncate measures the value itself with len()
    if (length < end_len) fail("AssertionError: expected length >= " + std::to_string(end_len));
    if (static_cast<int64_t>(py_len(in)) <= length + leeway) return in;
    fail("AttributeError: '" + type_name(in) + "' object has no attribute 'rsplit'");
  }
  std::string s = in.s;
  if (length < end_len) fail("AssertionError: expected length >= " + std::to_string(end_len) + ", got " + std::to_string(length));
  if (leeway < 0) fail("AssertionError: expected leeway >= 0, got " + std::to_string(leeway));
  auto cps = utf8_decode(s);
  if (static_cast<int64_t>(cps.size()) <= length + leeway) return Value::string(s);
  std::vector<char32_t> head(cps.begin(), cps.begin() + (length - end_len));
  std::string h = utf8_encode(head);
  if (killwords) return Value::string(h + end);
  size_t sp = h.rfind(' ');
  if (sp != std::string::npos) h = h.substr(0, sp);
  return Value::string(h + end);
}

FILTER(unique) {
  CallArgs saved = args;
  Value input = in;
  Renderer* rp = &r;
  auto st = std::make_shared<GenState>();
  auto seen = std::make_shared<ValueList>();
  auto cs = std::make_shared<bool>(false);
  auto attribute = std::make_shared<Value>(Value::none());
  return make_generator([=](Value& out) {
    if (!st->started) {
      st->started = true;
      CallArgs copy = saved;
      ArgReader a(copy, "unique");
      *cs = truthy(a.get(0, "case_sensitive", Value::boolean(false)));
      *attribute = a.get(1, "attribute", Value::none());
      a.finish(2);
      st->src.emplace(input);
    }
    Value item;
    while (st->src->next(item)) {
      Value k = get_attr_path(*rp, item, *attribute);
      if (!*cs) k = lower_if_str(k);
      if ((k.kind == Kind::kList && !k.flag) || k.kind == Kind::kDict) fail("TypeError: unhashable type: '" + type_name(k) + "'");
      bool dup = false;
      for (auto& sv : *seen)
        if (equal(sv, k)) { dup = true; break; }
      if (!dup) {
        seen->push_back(k);
        out = item;
        return true;
      }
    }
    return false;
  });
}

FILTER(wordcount) {
  ArgReader a(args, "wordcount");
  a.finish(0);
  int64_t n = 0;
  bool in_word = false;
  for (char32_t c : utf8_decode(to_str(in))) {
    bool w = c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
             (c >= 0xAA && !py_isspace(c) && c != 0xD7 && c != 0xF7 && !(c >= 0x2000 && c <= 0x2BFF) &&
              !(c >= 0x3000 && c <= 0x303F));
    if (w && !in_word) ++n;
    in_word = w;
  }
  return Value::integer(n);
}

#undef FILTER

const std::unordered_map<std::string, FilterFn>& filter_table() {
  static const std::unordered_map<std::string, FilterFn> table = {
      {"abs", filter_abs},
      {"attr", filter_attr},
      {"batch", filter_batch},
      {"capitalize", filter_capitalize},
      {"center", filter_center},
      {"count", filter_length},
      {"d", filter_default},
      {"default", filter_default},
      {"dictsort", filter_dictsort},
      {"e", filter_escape},
      {"escape", filter_escape},
      {"first", filter_first},
      {"float", filter_float},
      {"forceescape", filter_forceescape},
      {"format", filter_format},
      {"indent", filter_indent},
      {"int", filter_int},
      {"items", filter_items},
      {"join", filter_join},
      {"last", filter_last},
      {"length", filter_length},
      {"list", filter_list},
      {"lower", filter_lower},
      {"map", filter_map},
      {"max", filter_max},
      {"min", filter_min},
      {"pprint", filter_pprint},
      {"reject", filter_reject},
      {"rejectattr", filter_rejectattr},
      {"replace", filter_replace},
      {"reverse", filter_reverse},
      {"round", filter_round},
      {"safe", filter_safe},
      {"select", filter_select},
      {"selectattr", filter_selectattr},
      {"sort", filter_sort},
      {"string", filter_string},
      {"sum", filter_sum},
      {"title", filter_title},
      {"tojson", filter_tojson},
      {"trim", filter_trim},
      {"truncate", filter_truncate},
      {"unique", filter_unique},
      {"upper", filter_upper},
      {"wordcount", filter_wordcount},
  };
  return table;
}

// ---------------------------------------------------------------------------------------------
// Tests

#define TEST(tname) bool test_##tname(Renderer& r, const Value& in, CallArgs& args, int line)

Value one_arg(CallArgs& args, const char* name) {
  ArgReader a(args, name);
  Value v = a.get(0, "other");
  a.finish(1);
  if (!a.has(0, "other")) fail(std::string("TypeError: test '") + name + "' takes one argument");
  return v;
}

TEST(boolean) { return in.kind == Kind::kBool; }
TEST(callable) { return in.kind == Kind::kCallable || in.is_undefined(); }
TEST(defined) { return !in.is_undefined(); }
TEST(undefined) { return in.is_undefined(); }
TEST(none) { return in.is_none(); }
TEST(false) { return in.kind == Kind::kBool && !in.flag; }
TEST(true) { return in.kind == Kind::kBool && in.flag; }
TEST(integer) { return in.kind == Kind::kInt; }
TEST(float) { return in.kind == Kind::kFloat; }
TEST(number) { return in.is_number(); }
TEST(string) { return in.is_string(); }
TEST(mapping) { return in.is_dict(); }
TEST(iterable) {
  switch (in.kind) {
    case Kind::kUndefined: case Kind::kString: case Kind::kList: case Kind::kDict: case Kind::kIterator: return true;
    default: return false;
  }
}
TEST(sequence) {
  switch (in.kind) {
    case Kind::kUndefined: case Kind::kString: case Kind::kList: case Kind::kDict: return true;
    default: return false;
  }
}
TEST(escaped) { return false; }
TEST(eq) { return equal(in, one_arg(args, "eq")); }
TEST(ne) { return !equal(in, one_arg(args, "ne")); }
TEST(lt) { return less(in, one_arg(args, "lt"), "<"); }
TEST(gt) { return less(one_arg(args, "gt"), in, ">"); }
TEST(le) { Value o = one_arg(args, "le"); return less(in, o, "<=") || equal(in, o); }
TEST(ge) { Value o = one_arg(args, "ge"); return less(o, in, ">=") || equal(in, o); }
TEST(in) {
  ArgReader a(args, "in");
  if (!a.has(0, "seq")) fail("TypeError: test_in() missing 1 required positional argument: 'seq'");
  Value seq = a.get(0, "seq");
  a.finish(1);
  switch (seq.kind) {
    case Kind::kString:
      if (!in.is_string()) fail("TypeError: 'in <string>' requires string as left operand, not " + type_name(in));
      return seq.s.find(in.s) != std::string::npos;
    case Kind::kDict: return seq.entries().find(in) != nullptr;
    case Kind::kUndefined: return false;
    case Kind::kList:
      for (auto& v : seq.items())
        if (equal(v, in)) return true;
      return false;
    default:
      for (auto& v : iterate(seq))
        if (equal(v, in)) return true;
      return false;
  }
}
TEST(sameas) {
  Value o = one_arg(args, "sameas");
  if (in.kind != o.kind) return false;
  switch (in.kind) {
    case Kind::kNone: case Kind::kUndefined: return in.kind == Kind::kNone || in.obj == o.obj;
    case Kind::kBool: return in.flag == o.flag;
    case Kind::kInt: return in.i == o.i && in.i >= -5 && in.i <= 256;  // CPython's small-int cache
    case Kind::kList: return in.list == o.list;
    case Kind::kDict: return in.dict == o.dict;
    case Kind::kString: return in.s == o.s && in.s.size() <= 1;
    default: return in.obj == o.obj;
  }
}
int64_t need_num_mod(const Value& v, int64_t m) {
  if (v.is_undefined()) fail_undefined(v);
  if (v.kind == Kind::kFloat) {  // Python float %: 2.5 % 2 == 0.5 is neither even nor odd
    double r = std::fmod(v.f, static_cast<double>(m));
    if (r < 0) r += static_cast<double>(m);
    return r == 0 ? 0 : r == 1 ? 1 : -1;
  }
  if (!v.is_number()) fail("TypeError: unsupported operand type(s) for %: '" + type_name(v) + "' and 'int'");
  int64_t x = v.as_int() % m;
  if (x < 0) x += m < 0 ? 0 : m;
  return x;
}
TEST(even) { return need_num_mod(in, 2) == 0; }
TEST(odd) { return need_num_mod(in, 2) == 1; }
TEST(divisibleby) {
  ArgReader a(args, "divisibleby");
  Value num = a.get(0, "num");
  a.finish(1);
  if (in.is_undefined()) fail_undefined(in);
  if (!in.is_number() || !num.is_number()) fail("TypeError: unsupported operand type(s) for %");
  if (num.as_double() == 0) fail("ZeroDivisionError: integer division or modulo by zero");
  if (in.kind == Kind::kFloat || num.kind == Kind::kFloat) return std::fmod(in.as_double(), num.as_double()) == 0;
  return in.as_int() % num.as_int() == 0;
}
TEST(lower) {
  bool cased = false;
  for (char32_t c : utf8_decode(to_str(in))) {
    if (py_is_cased_upper(c)) return false;
    if (py_is_cased_lower(c)) cased = true;
  }
  return cased;
}
TEST(upper) {
  bool cased = false;
  for (char32_t c : utf8_decode(to_str(in))) {
    if (py_is_cased_lower(c)) return false;
    if (py_is_cased_upper(c)) cased = true;
  }
  return cased;
}
TEST(filter) { return in.is_string() && find_filter(in.s) != nullptr; }
TEST(test) { return in.is_string() && find_test(in.s) != nullptr; }

#undef TEST

const std::unordered_map<std::string, TestFn>& test_table() {
  static const std::unordered_map<std::string, TestFn> table = {
      {"boolean", test_boolean}, {"callable", test_callable}, {"defined", test_defined},
      {"divisibleby", test_divisibleby}, {"eq", test_eq}, {"equalto", test_eq}, {"==", test_eq},
      {"escaped", test_escaped}, {"even", test_even}, {"false", test_false}, {"filter", test_filter},
      {"float", test_float}, {"ge", test_ge}, {">=", test_ge}, {"gt", test_gt}, {">", test_gt},
      {"greaterthan", test_gt}, {"in", test_in}, {"integer", test_integer}, {"iterable", test_iterable},
      {"le", test_le}, {"<=", test_le}, {"lessthan", test_lt}, {"lower", test_lower}, {"lt", test_lt},
      {"<", test_lt}, {"mapping", test_mapping}, {"ne", test_ne}, {"!=", test_ne}, {"none", test_none},
      {"number", test_number}, {"odd", test_odd}, {"sameas", test_sameas}, {"sequence", test_sequence},
      {"string", test_string}, {"test", test_test}, {"true", test_true}, {"undefined", test_undefined},
      {"upper", test_upper},
  };
  return table;
}

// ---------------------------------------------------------------------------------------------
// Methods of builtin types

struct MethodFn : Callable {
  Value self;
  std::string method;
  Value call(Renderer& r, CallArgs& args, int line) override;
};

size_t cp_index_of_byte(const std::string& s, size_t byte_pos) {
  size_t n = 0;
  for (size_t i = 0; i < byte_pos && i < s.size(); ++i)
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) ++n;
  return n;
}

bool starts_or_ends(const std::string& s, const Value& what, bool start, const char* fname) {
  auto one = [&](const Value& p) {
    if (!p.is_string())
      fail(std::string("TypeError: ") + fname + " first arg must be str or a tuple of str, not " + type_name(p));
    if (p.s.size() > s.size()) return false;
    return start ? s.compare(0, p.s.size(), p.s) == 0 : s.compare(s.size() - p.s.size(), p.s.size(), p.s) == 0;
  };
  if (what.is_list() && what.flag) {
    for (auto& p : what.items())
      if (one(p)) return true;
    return false;
  }
  return one(what);
}

Value str_method(Renderer& r, const std::string& s, const std::string& m, CallArgs& args) {
  ArgReader a(args, m);
  auto chars_arg = [&]() { Value c = a.get(0, "chars", Value::none()); a.finish(1); return c; };
  if (m == "strip") return Value::string(py_strip(s, chars_arg(), true, true));
  if (m == "lstrip") return Value::string(py_strip(s, chars_arg(), true, false));
  if (m == "rstrip") return Value::string(py_strip(s, chars_arg(), false, true));
  if (m == "upper") { a.finish(0); return Value::string(str_upper(s)); }
  if (m == "lower") { a.finish(0); return Value::string(str_lower(s)); }
  if (m == "title") { a.finish(0); return Value::string(py_title(s)); }
  if (m == "capitalize") { a.finish(0); return Value::string(py_capitalize(s)); }
  if (m == "swapcase") {
    a.finish(0);
    std::string out;
    for (char32_t c : utf8_decode(s)) utf8_append(out, py_is_cased_upper(c) ? py_lower(c) : py_upper(c));
    return Value::string(out);
  }
  if (m == "split" || m == "rsplit") {
    Value sep = a.get(0, "sep", Value::none());
    int64_t maxsplit = need_int(a.get(1, "maxsplit", Value::integer(-1)), m.c_str());
    a.finish(2);
    return Value::make_list(m == "split" ? py_split(s, sep, maxsplit) : py_rsplit(s, sep, maxsplit));
  }
  if (m == "splitlines") {
    bool keep = truthy(a.get(0, "keepends", Value::boolean(false)));
    a.finish(1);
    return Value::make_list(py_splitlines(s, keep));
  }
  if (m == "startswith" || m == "endswith") {
    Value p = a.get(0, "prefix");
    a.finish(1);
    return Value::boolean(starts_or_ends(s, p, m == "startswith", m.c_str()));
  }
  if (m == "replace") {
    Value old = a.get(0, "old"), rep = a.get(1, "new");
    int64_t count = need_int(a.get(2, "count", Value::integer(-1)), "replace");
    a.finish(3);
    std::string res = py_replace(s, need_str(old, "replace() argument 1"), need_str(rep, "replace() argument 2"), count);
    r.check_size(res.size());
    return Value::string(std::move(res));
  }
  if (m == "find" || m == "rfind" || m == "index" || m == "rindex" || m == "count") {
    std::string sub = need_str(a.get(0, "sub"), m.c_str());
    a.finish(1);
    if (m == "count") {
      if (sub.empty()) return Value::integer(static_cast<int64_t>(utf8_length(s) + 1));
      int64_t n = 0;
      for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
      return Value::integer(n);
    }
    size_t p = (m == "find" || m == "index") ? s.find(sub) : s.rfind(sub);
    if (p == std::string::npos) {
      if (m == "index" || m == "rindex") fail("ValueError: substring not found");
      return Value::integer(-1);
    }
    return Value::integer(static_cast<int64_t>(cp_index_of_byte(s, p)));
  }
  if (m == "join") {
    if (!a.has(0, "iterable")) fail("TypeError: str.join() takes exactly one argument (0 given)");
    Value seq = a.get(0, "iterable");
    a.finish(1);
    std::string out;
    bool first = true;
    for (auto& item : iterate(seq)) {
      if (!item.is_string()) fail("TypeError: sequence item: expected str instance, " + type_name(item) + " found");
      if (!first) out += s;
      first = false;
      out += item.s;
      r.check_output(out.size(), item.s.size() + s.size());
    }
    return Value::string(std::move(out));
  }
  if (m == "format") return Value::string(str_format(r, s, args));
  if (m == "removeprefix" || m == "removesuffix") {
    std::string p = need_str(a.get(0, "prefix"), m.c_str());
    a.finish(1);
    if (m == "removeprefix") return Value::string(s.compare(0, p.size(), p) == 0 ? s.substr(p.size()) : s);
    if (p.size() <= s.size() && s.compare(s.size() - p.size(), p.size(), p) == 0) return Value::string(s.substr(0, s.size() - p.size()));
    return Value::string(s);
  }
  if (m == "partition" || m == "rpartition") {
    std::string sep = need_str(a.get(0, "sep"), m.c_str());
    a.finish(1);
    if (sep.empty()) fail("ValueError: empty separator");
    size_t p = m == "partition" ? s.find(sep) : s.rfind(sep);
    if (p == std::string::npos) {
      if (m == "partition") return Value::make_list({Value::string(s), Value::string(""), Value::string("")}, true);
      return Value::make_list({Value::string(""), Value::string(""), Value::string(s)}, true);
    }
    return Value::make_list({Value::string(s.substr(0, p)), Value::string(sep), Value::string(s.substr(p + sep.size()))}, true);
  }
  if (m == "center" || m == "ljust" || m == "rjust" || m == "zfill") {
    int64_t width = need_int(a.get(0, "width"), m.c_str());
    std::string fill = " ";
    if (m != "zfill") fill = to_str(a.get(1, "fillchar", Value::string(" ")));
    a.finish(m == "zfill" ? 1 : 2);
    if (utf8_length(fill) != 1) fail("TypeError: The fill character must be exactly one character long");
    int64_t len = static_cast<int64_t>(utf8_length(s));
    if (width <= len) return Value::string(s);
    r.check_size(static_cast<size_t>(std::min<int64_t>(width, INT32_MAX)));
    int64_t padn = width - len;
    auto rep = [&](int64_t k) { std::string o; for (int64_t q = 0; q < k; ++q) o += fill; return o; };
    if (m == "ljust") return Value::string(s + rep(padn));
    if (m == "rjust") return Value::string(rep(padn) + s);
    if (m == "zfill") {
      if (!s.empty() && (s[0] == '-' || s[0] == '+')) return Value::string(s.substr(0, 1) + std::string(static_cast<size_t>(padn), '0') + s.substr(1));
      return Value::string(std::string(static_cast<size_t>(padn), '0') + s);
    }
    int64_t left = padn / 2 + (padn & width & 1);
    return Value::string(rep(left) + s + rep(padn - left));
  }
  auto all_of = [&](auto pred) {
    auto cps = utf8_decode(s);
    if (cps.empty()) return Value::boolean(false);
    for (char32_t c : cps)
      if (!pred(c)) return Value::boolean(false);
    return Value::boolean(true);
  };
  if (m == "isdigit" || m == "isnumeric" || m == "isdecimal") { a.finish(0); return all_of([](char32_t c) { return c >= '0' && c <= '9'; }); }
  if (m == "isalpha") { a.finish(0); return all_of([](char32_t c) { return is_cased(c) || c >= 0x3040; }); }
  if (m == "isalnum") { a.finish(0); return all_of([](char32_t c) { return is_cased(c) || (c >= '0' && c <= '9') || c >= 0x3040; }); }
  if (m == "isspace") { a.finish(0); return all_of(py_isspace); }
  if (m == "islower" || m == "isupper") {
    a.finish(0);
    bool cased = false;
    for (char32_t c : utf8_decode(s)) {
      if (m == "islower" ? py_is_cased_upper(c) : py_is_cased_lower(c)) return Value::boolean(false);
      if (m == "islower" ? py_is_cased_lower(c) : py_is_cased_upper(c)) cased = true;
    }
    return Value::boolean(cased);
  }
  if (m == "encode") fail("SecurityError: str.encode is not available in templates");
  fail("AttributeError: 'str' object has no attribute '" + m + "'");
}

Value MethodFn::call(Renderer& r, CallArgs& args, int line) {
  (void)line;
  if (self.is_string()) {
    if (!self.is_markup()) return str_method(r, self.s, method, args);
    // Markup's methods escape their string arguments and return Markup (lists of Markup).
    for (auto& v : args.pos)
      if (v.is_string() && !v.is_markup()) v = Value::markup(html_escape(v.s));
    for (auto& kv : args.kw)
      if (kv.second.is_string() && !kv.second.is_markup()) kv.second = Value::markup(html_escape(kv.second.s));
    if (method == "join" && !args.pos.empty()) {
      ValueList items;
      for (auto& v : iterate(args.pos[0]))
        items.push_back(v.is_string() && !v.is_markup() ? Value::markup(html_escape(v.s)) : v);
      args.pos[0] = Value::make_list(std::move(items));
    }
    Value res = str_method(r, self.s, method, args);
    if (res.is_string()) res.flag = true;
    if (res.is_list()) {
      ValueList items = res.items();
      for (auto& v : items)
        if (v.is_string()) v.flag = true;
      res = Value::make_list(std::move(items), res.flag);
    }
    return res;
  }
  ArgReader a(args, method);
  if (self.is_dict()) {
    const auto& d = self.entries();
    if (method == "items" || method == "keys" || method == "values") {
      a.finish(0);
      ValueList out;
      for (const auto& kv : d.items) {
        if (method == "items") out.push_back(Value::make_list({kv.first, kv.second}, true));
        else out.push_back(method == "keys" ? kv.first : kv.second);
      }
      return make_view(std::move(out), method == "items"  ? SeqTag::kDictItems
                                       : method == "keys" ? SeqTag::kDictKeys
                                                          : SeqTag::kDictValues);
    }
    if (method == "get") {
      Value key = a.get(0, "key");
      Value def = a.get(1, "default", Value::none());
      a.finish(2);
      if (!a.has(0, "key")) fail("TypeError: get expected at least 1 argument, got 0");
      if ((key.kind == Kind::kList && !key.flag) || key.kind == Kind::kDict) fail("TypeError: unhashable type: '" + type_name(key) + "'");
      const Value* v = d.find(key);
      return v ? *v : def;
    }
    if (method == "copy") { a.finish(0); return self; }
  }
  if (self.is_list() && (!seq_tag(self) || seq_tag(self)->type == SeqTag::kRange)) {
    if (method == "count") {
      Value x = a.get(0, "value");
      a.finish(1);
      int64_t n = 0;
      for (auto& v : self.items()) n += equal(v, x);
      return Value::integer(n);
    }
    if (method == "index") {
      Value x = a.get(0, "value");
      a.finish(1);
      for (size_t k = 0; k < self.items().size(); ++k)
        if (equal(self.items()[k], x)) return Value::integer(static_cast<int64_t>(k));
      fail("ValueError: " + to_repr(x) + " is not in list");
    }
    if (method == "copy") { a.finish(0); return self; }
  }
  if (self.kind == Kind::kFloat && method == "is_integer") {
    a.finish(0);
    return Value::boolean(std::isfinite(self.f) && self.f == std::floor(self.f));
  }
  fail("AttributeError: '" + type_name(self) + "' object has no attribute '" + method + "'");
}

bool has_method(const Value& self, const std::string& name) {
  static const char* kStr[] = {"strip", "lstrip", "rstrip", "upper", "lower", "title", "capitalize", "swapcase",
                               "split", "rsplit", "splitlines", "startswith", "endswith", "replace", "find",
                               "rfind", "index", "rindex", "count", "join", "format", "removeprefix",
                               "removesuffix", "partition", "rpartition", "center", "ljust", "rjust", "zfill",
                               "isdigit", "isnumeric", "isdecimal", "isalpha", "isalnum", "isspace", "islower",
                               "isupper", "encode"};
  static const char* kDict[] = {"items", "keys", "values", "get", "copy"};
  static const char* kList[] = {"count", "index", "copy"};
  auto in = [&](auto& arr) {
    for (const char* m : arr)
      if (name == m) return true;
    return false;
  };
  switch (self.kind) {
    case Kind::kString: return in(kStr);
    case Kind::kDict: return in(kDict);
    case Kind::kList:
      if (const SeqTag* t = seq_tag(self)) return t->type == SeqTag::kRange && name != "copy" && in(kList);
      return in(kList);
    case Kind::kFloat: return name == "is_integer";
    default: return false;
  }
}

bool is_mutating(const Value& self, const std::string& name) {
  static const char* kDict[] = {"clear", "pop", "popitem", "setdefault", "update"};
  static const char* kList[] = {"append", "clear", "pop", "reverse", "insert", "sort", "extend", "remove"};
  if (self.is_dict()) {
    for (const char* m : kDict)
      if (name == m) return true;
  } else if (self.is_list() && !self.flag && !seq_tag(self)) {
    for (const char* m : kList)
      if (name == m) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Globals

Value global_range(Renderer& r, const Value&, CallArgs& args, int) {
  if (!args.kw.empty()) fail("TypeError: range() takes no keyword arguments");
  if (args.pos.empty() || args.pos.size() > 3) fail("TypeError: range expected 1 to 3 arguments");
  int64_t start = 0, stop, step = 1;
  if (args.pos.size() == 1) stop = need_int(args.pos[0], "range");
  else {
    start = need_int(args.pos[0], "range");
    stop = need_int(args.pos[1], "range");
    if (args.pos.size() == 3) step = need_int(args.pos[2], "range");
  }
  if (step == 0) fail("ValueError: range() arg 3 must not be zero");
  int64_t n = 0;
  if (step > 0 && stop > start) n = (stop - start + step - 1) / step;
  if (step < 0 && stop < start) n = (start - stop - step - 1) / (-step);
  if (n > 100000) fail("OverflowError: Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
  (void)r;
  return make_range(start, stop, step);
}

void fill_dict(DictData& d, CallArgs& args, const char* fname) {
  if (args.pos.size() > 1) fail(std::string("TypeError: ") + fname + " expected at most 1 argument");
  if (!args.pos.empty()) {
    const Value& src = args.pos[0];
    if (src.is_undefined()) fail_undefined(src);  // dict() looks up .keys on it
    if (src.is_dict()) {
      for (auto& kv : src.entries().items) d.set(kv.first, kv.second);
    } else {
      for (auto& pair : iterate(src)) {
        ValueList kv = iterate(pair);
        if (kv.size() != 2) fail("ValueError: dictionary update sequence element has length " + std::to_string(kv.size()) + "; 2 is required");
        d.set(kv[0], kv[1]);
      }
    }
  }
  for (auto& kv : args.kw) d.set(Value::string(kv.first), kv.second);
}

Value global_dict(Renderer&, const Value&, CallArgs& args, int) {
  DictData d;
  fill_dict(d, args, "dict");
  return Value::make_dict(std::move(d));
}

Value global_namespace(Renderer& r, const Value&, CallArgs& args, int) {
  auto ns = std::make_shared<NamespaceObj>();
  r.track_namespace(ns);
  fill_dict(ns->attrs, args, "namespace");
  Value v;
  v.kind = Kind::kNamespace;
  v.obj = ns;
  return v;
}

Value global_raise_exception(Renderer&, const Value&, CallArgs& args, int) {
  std::string msg = args.pos.empty() ? "" : to_str(args.pos[0]);
  fail("TemplateError: " + msg);
}

Value global_strftime_now(Renderer&, const Value&, CallArgs& args, int) {
  if (args.pos.size() != 1 || !args.pos[0].is_string()) fail("TypeError: strftime_now() takes one string argument");
  return Value::string(strftime_now(args.pos[0].s));
}

struct JoinerFn : Callable {
  std::string sep;
  bool used = false;
  Value call(Renderer&, CallArgs&, int) override {
    if (!used) {
      used = true;
      return Value::string("");
    }
    return Value::string(sep);
  }
};

Value global_joiner(Renderer&, const Value&, CallArgs& args, int) {
  ArgReader a(args, "joiner");
  Value sep = a.get(0, "sep", Value::string(", "));
  a.finish(1);
  auto fn = std::make_shared<JoinerFn>();
  fn->sep = to_str(sep);
  fn->name = "joiner";
  Value v;
  v.kind = Kind::kCallable;
  v.obj = fn;
  return v;
}

}  // namespace

Value make_builtin(std::string name, Value (*fn)(Renderer&, const Value& self, CallArgs&, int), Value self) {
  auto b = std::make_shared<BuiltinFn>();
  b->name = std::move(name);
  b->fn = fn;
  b->self = std::move(self);
  Value v;
  v.kind = Kind::kCallable;
  v.obj = std::move(b);
  return v;
}

void add_globals(DictData& g) {
  g.set(Value::string("range"), make_builtin("range", global_range));
  g.set(Value::string("dict"), make_builtin("dict", global_dict));
  g.set(Value::string("namespace"), make_builtin("namespace", global_namespace));
  g.set(Value::string("joiner"), make_builtin("joiner", global_joiner));
  g.set(Value::string("raise_exception"), make_builtin("raise_exception", global_raise_exception));
  g.set(Value::string("strftime_now"), make_builtin("strftime_now", global_strftime_now));
}

Value find_method(const Value& self, const std::string& name) {
  if (is_mutating(self, name)) return security_undefined(self, name);
  if (!has_method(self, name)) return Value::undefined_attr(self, Value::string(name));
  auto m = std::make_shared<MethodFn>();
  m->self = self;
  m->method = name;
  m->name = name;
  Value v;
  v.kind = Kind::kCallable;
  v.obj = std::move(m);
  return v;
}

FilterFn find_filter(const std::string& name) {
  const auto& t = filter_table();
  auto it = t.find(name);
  return it == t.end() ? nullptr : it->second;
}

TestFn find_test(const std::string& name) {
  const auto& t = test_table();
  auto it = t.find(name);
  return it == t.end() ? nullptr : it->second;
}

bool filter_exists(const std::string& name) { return find_filter(name) != nullptr; }
bool test_exists(const std::string& name) { return find_test(name) != nullptr; }

}  // namespace kiln::chat::jinja

namespace kiln::chat {

std::string strftime_now(const std::string& format) {
  std::tm tm{};
  const char* pinned = std::getenv("KILN_DATE_OVERRIDE");
  bool ok = false;
  if (pinned && *pinned) {
    int y = 0, mo = 0, d = 0, h = 0, mi = 0, s = 0;
    int n = std::sscanf(pinned, "%d-%d-%d %d:%d:%d", &y, &mo, &d, &h, &mi, &s);
    if (n >= 3) {
      tm.tm_year = y - 1900;
      tm.tm_mon = mo - 1;
      tm.tm_mday = d;
      tm.tm_hour = h;
      tm.tm_min = mi;
      tm.tm_sec = s;
      tm.tm_isdst = -1;
      std::time_t t = timegm(&tm);  // normalizes and fills tm_wday/tm_yday
      gmtime_r(&t, &tm);
      ok = true;
    }
  }
  if (!ok) {
    std::time_t now = std::time(nullptr);
    localtime_r(&now, &tm);
  }
  if (format.empty()) return "";
  std::string buf(format.size() * 8 + 64, '\0');
  size_t n = std::strftime(buf.data(), buf.size(), format.c_str(), &tm);
  if (n == 0) {
    buf.resize(format.size() * 64 + 256);
    n = std::strftime(buf.data(), buf.size(), format.c_str(), &tm);
  }
  buf.resize(n);
  return buf;
}

}  // namespace kiln::chat
