// Lexer and recursive-descent parser, following jinja2 3.1's lexer.py/parser.py closely so that
// whitespace control (trim_blocks, lstrip_blocks, -/+ modifiers), operator precedence and the
// places where jinja2 accepts or rejects syntax match.
#include <cstring>
#include <string_view>

#include "chat/jinja_ast.h"

namespace kiln::chat::jinja {
namespace {

constexpr int kMaxParseDepth = 200;  // nesting of expressions/blocks: bounds the parser's stack

enum class Tok : uint8_t { kData, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok type;
  int line;
  std::string text;  // data text, name, operator, or raw literal
  Value value;       // string/int/float literals
};

std::string describe(const Token& t) {
  switch (t.type) {
    case Tok::kData: return "template data";
    case Tok::kVarBegin: return "begin of print statement";
    case Tok::kVarEnd: return "end of print statement";
    case Tok::kBlockBegin: return "begin of statement block";
    case Tok::kBlockEnd: return "end of statement block";
    case Tok::kName: return t.text;
    case Tok::kString: return "string";
    case Tok::kInt: return "integer";
    case Tok::kFloat: return "float";
    case Tok::kOp: return t.text;
    case Tok::kEof: return "end of template";
  }
  return "?";
}

// Length of the UTF-8 whitespace character at s[i] (Python's str.isspace), 0 if none.
size_t space_len(std::string_view s, size_t i) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return py_isspace(c) ? 1 : 0;
  size_t len = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
  if (i + len > s.size()) return 0;
  auto cps = utf8_decode(s.substr(i, len));
  return cps.size() == 1 && py_isspace(cps[0]) ? len : 0;
}

bool all_space(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    size_t l = space_len(s, i);
    if (!l) return false;
    i += l;
  }
  return true;
}

std::string_view rstrip_space(std::string_view s) {
  // Decode from the front (UTF-8 can't be walked backwards safely here) and keep the last
  // non-space end.
  size_t end = 0;
  for (size_t i = 0; i < s.size();) {
    size_t l = space_len(s, i);
    if (l) {
      i += l;
    } else {
      unsigned char c = static_cast<unsigned char>(s[i]);
      size_t len = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
      i = std::min(s.size(), i + len);
      end = i;
    }
  }
  return s.substr(0, end);
}

size_t skip_space(std::string_view s, size_t i) {
  while (i < s.size()) {
    size_t l = space_len(s, i);
    if (!l) break;
    i += l;
  }
  return i;
}

int count_newlines(std::string_view s, size_t from, size_t to) {
  int n = 0;
  for (size_t i = from; i < to; ++i) n += s[i] == '\n';
  return n;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_name_start(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool is_name_char(char c) { return is_name_start(c) || is_digit(c); }

// Python's "unicode-escape" decoding of a string literal body (jinja2 does exactly this).
std::string unescape(std::string_view body, int line) {
  std::string out;
  out.reserve(body.size());
  for (size_t i = 0; i < body.size(); ++i) {
    char c = body[i];
    if (c != '\\' || i + 1 >= body.size()) {
      out += c;
      continue;
    }
    char e = body[++i];
    auto hex = [&](int n) -> char32_t {
      char32_t v = 0;
      for (int k = 1; k <= n; ++k) {
        if (i + k >= body.size()) fail("SyntaxError: truncated escape in string literal", line);
        char h = body[i + k];
        int d = is_digit(h) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
        if (d < 0) fail("SyntaxError: truncated escape in string literal", line);
        v = v * 16 + d;
      }
      i += n;
      return v;
    };
    switch (e) {
      case '\n': break;  // line continuation
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case 'x': utf8_append(out, hex(2)); break;
      case 'u': utf8_append(out, hex(4)); break;
      case 'U': {
        char32_t v = hex(8);
        if (v > 0x10FFFF) fail("SyntaxError: illegal Unicode character in string literal", line);
        utf8_append(out, v);
        break;
      }
      default:
        if (e >= '0' && e <= '7') {
          char32_t v = e - '0';
          for (int k = 0; k < 2 && i + 1 < body.size() && body[i + 1] >= '0' && body[i + 1] <= '7'; ++k)
            v = v * 8 + (body[++i] - '0');
          utf8_append(out, v);
        } else {
          out += '\\';  // unknown escapes stay as written
          out += e;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(std::string_view src) : s_(src) {}

  std::vector<Token> run() {
    size_t n = s_.size();
    while (pos_ < n) {
      size_t p = find_tag(pos_);
      if (p == std::string_view::npos) {
        emit_data(s_.substr(pos_));
        line_ += count_newlines(s_, pos_, n);
        pos_ = n;
        break;
      }
      char kind = s_[p + 1];
      char sign = (p + 2 < n && (s_[p + 2] == '-' || s_[p + 2] == '+')) ? s_[p + 2] : 0;
      std::string_view text = s_.substr(pos_, p - pos_);
      int text_newlines = count_newlines(s_, pos_, p);
      size_t raw_end = kind == '%' ? match_raw_begin(p) : 0;
      // Whitespace control of the text before the tag (jinja2's OptionalLStrip).
      if (sign == '-') {
        text = rstrip_space(text);
      } else if (sign != '+' && kind != '{') {
        size_t nl = text.rfind('\n');
        size_t l_pos = nl == std::string_view::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting_) && l_pos < text.size() && all_space(text.substr(l_pos)))
          text = text.substr(0, l_pos);
      }
      emit_data(text);
      line_ += text_newlines;
      if (raw_end) {
        lex_raw(p, raw_end);
        continue;
      }
      pos_ = p + 2 + (sign ? 1 : 0);
      if (kind == '#' && pos_ >= n) break;  // "{#" ending the source: jinja2's lexer just stops
      if (kind == '#') lex_comment();
      else lex_tag(kind == '{');
    }
    toks_.push_back(Token{Tok::kEof, line_, "", {}});
    return std::move(toks_);
  }

 private:
  size_t find_tag(size_t from) const {
    for (size_t i = from; i + 1 < s_.size(); ++i) {
      if (s_[i] == '{' && (s_[i + 1] == '{' || s_[i + 1] == '%' || s_[i + 1] == '#')) return i;
    }
    return std::string_view::npos;
  }

  void emit_data(std::string_view text) {
    if (!text.empty()) toks_.push_back(Token{Tok::kData, line_, std::string(text), {}});
  }

  // `{%[-+]?\s*raw\s*(-%}\s*|%})` at p: returns the end position or 0.
  size_t match_raw_begin(size_t p) const {
    size_t i = p + 2;
    if (i < s_.size() && (s_[i] == '-' || s_[i] == '+')) ++i;
    i = skip_space(s_, i);
    if (s_.compare(i, 3, "raw") != 0) return 0;
    i = skip_space(s_, i + 3);
    if (s_.compare(i, 3, "-%}") == 0) return skip_space(s_, i + 3);
    if (s_.compare(i, 2, "%}") == 0) return i + 2;
    return 0;
  }

  void lex_raw(size_t begin, size_t content_start) {
    line_ += count_newlines(s_, begin, content_start);
    if (content_start >= s_.size()) {  // nothing after {% raw %}: jinja2's lexer just stops
      pos_ = content_start;
      return;
    }
    line_starting_ = s_[content_start - 1] == '\n';
    // Find `{%[-+]?\s*endraw\s*(+%}|-%}\s*|%}\n?)`.
    for (size_t p = content_start; p + 1 < s_.size(); ++p) {
      if (s_[p] != '{' || s_[p + 1] != '%') continue;
      size_t i = p + 2;
      char sign = 0;
      if (i < s_.size() && (s_[i] == '-' || s_[i] == '+')) sign = s_[i++];
      i = skip_space(s_, i);
      if (s_.compare(i, 6, "endraw") != 0) continue;
      i = skip_space(s_, i + 6);
      size_t end;
      if (s_.compare(i, 3, "+%}") == 0) end = i + 3;
      else if (s_.compare(i, 3, "-%}") == 0) end = skip_space(s_, i + 3);
      else if (s_.compare(i, 2, "%}") == 0) end = i + 2 + (i + 2 < s_.size() && s_[i + 2] == '\n');
      else continue;
      std::string_view text = s_.substr(content_start, p - content_start);
      if (sign == '-') {
        text = rstrip_space(text);
      } else if (sign != '+') {
        size_t nl = text.rfind('\n');
        size_t l_pos = nl == std::string_view::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting_) && l_pos < text.size() && all_space(text.substr(l_pos)))
          text = text.substr(0, l_pos);
      }
      emit_data(text);
      line_ += count_newlines(s_, content_start, end);
      line_starting_ = s_[end - 1] == '\n';
      pos_ = end;
      return;
    }
    fail("TemplateSyntaxError: Missing end of raw directive", line_);
  }

  void lex_comment() {
    // (.*?)(\+#}|-#}\s*|#}\n?)
    size_t start = pos_;
    for (size_t p = pos_; p < s_.size(); ++p) {
      size_t end = 0;
      if (s_.compare(p, 3, "+#}") == 0) end = p + 3;
      else if (s_.compare(p, 3, "-#}") == 0) end = skip_space(s_, p + 3);
      else if (s_.compare(p, 2, "#}") == 0) end = p + 2 + (p + 2 < s_.size() && s_[p + 2] == '\n');
      if (!end) continue;
      line_ += count_newlines(s_, start, end);
      line_starting_ = s_[end - 1] == '\n';
      pos_ = end;
      return;
    }
    fail("TemplateSyntaxError: Missing end of comment tag", line_);
  }

  void lex_tag(bool variable) {
    toks_.push_back(Token{variable ? Tok::kVarBegin : Tok::kBlockBegin, line_, "", {}});
    line_starting_ = false;
    std::vector<char> balance;
    size_t n = s_.size();
    while (true) {
      if (pos_ >= n) {
        fail(std::string("TemplateSyntaxError: unexpected end of template, missing '") +
                 (variable ? "}}" : "%}") + "'",
             line_);
      }
      if (balance.empty()) {
        size_t end = 0;
        if (variable) {
          if (s_.compare(pos_, 3, "-}}") == 0) end = skip_space(s_, pos_ + 3);
          else if (s_.compare(pos_, 2, "}}") == 0) end = pos_ + 2;
        } else {
          if (s_.compare(pos_, 3, "+%}") == 0) end = pos_ + 3;
          else if (s_.compare(pos_, 3, "-%}") == 0) end = skip_space(s_, pos_ + 3);
          else if (s_.compare(pos_, 2, "%}") == 0) end = pos_ + 2 + (pos_ + 2 < n && s_[pos_ + 2] == '\n');
        }
        if (end) {
          toks_.push_back(Token{variable ? Tok::kVarEnd : Tok::kBlockEnd, line_, "", {}});
          line_ += count_newlines(s_, pos_, end);
          line_starting_ = s_[end - 1] == '\n';
          pos_ = end;
          return;
        }
      }
      if (size_t l = space_len(s_, pos_)) {
        line_ += s_[pos_] == '\n';
        pos_ += l;
        continue;
      }
      char c = s_[pos_];
      if (is_digit(c)) {
        lex_number();
        continue;
      }
      if (is_name_start(c)) {
        size_t e = pos_;
        while (e < n && is_name_char(s_[e])) ++e;
        toks_.push_back(Token{Tok::kName, line_, std::string(s_.substr(pos_, e - pos_)), {}});
        pos_ = e;
        continue;
      }
      if (c == '\'' || c == '"') {
        size_t e = pos_ + 1;
        while (e < n && s_[e] != c) e += s_[e] == '\\' ? 2 : 1;
        if (e >= n) fail("TemplateSyntaxError: unexpected char '" + std::string(1, c) + "' (unterminated string)", line_);
        std::string body(s_.substr(pos_ + 1, e - pos_ - 1));
        toks_.push_back(Token{Tok::kString, line_, body, Value::string(unescape(body, line_))});
        line_ += count_newlines(s_, pos_, e);
        pos_ = e + 1;
        continue;
      }
      static const char* kOps[] = {"//", "**", "==", "!=", ">=", "<=", "+", "-", "/", "*", "%", "~", "[", "]",
                                   "(", ")", "{", "}", ">", "<", "=", ".", ":", "|", ",", ";"};
      const char* op = nullptr;
      for (const char* o : kOps)
        if (s_.compare(pos_, std::strlen(o), o) == 0) { op = o; break; }
      if (!op) fail("TemplateSyntaxError: unexpected char '" + std::string(1, c) + "'", line_);
      std::string ops(op);
      if (ops == "(" || ops == "[" || ops == "{") {
        balance.push_back(ops[0] == '(' ? ')' : ops[0] == '[' ? ']' : '}');
      } else if (ops == ")" || ops == "]" || ops == "}") {
        if (balance.empty()) fail("TemplateSyntaxError: unexpected '" + ops + "'", line_);
        if (balance.back() != ops[0])
          fail("TemplateSyntaxError: unexpected '" + ops + "', expected '" + std::string(1, balance.back()) + "'", line_);
        balance.pop_back();
      }
      toks_.push_back(Token{Tok::kOp, line_, ops, {}});
      pos_ += ops.size();
    }
  }

  void lex_number() {
    size_t n = s_.size(), i = pos_;
    auto digits = [&](size_t& k) {
      size_t st = k;
      while (k < n && (is_digit(s_[k]) || (s_[k] == '_' && k + 1 < n && is_digit(s_[k + 1]) && k > st))) ++k;
      return k > st;
    };
    // Prefixed integers.
    if (s_[i] == '0' && i + 1 < n && std::strchr("bBoOxX", s_[i + 1])) {
      int base = (s_[i + 1] | 32) == 'b' ? 2 : (s_[i + 1] | 32) == 'o' ? 8 : 16;
      size_t k = i + 2;
      int64_t v = 0;
      bool any = false;
      while (k < n) {
        char c = s_[k];
        if (c == '_') { ++k; continue; }
        int d = is_digit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : 99;
        if (d >= base) break;
        if (__builtin_mul_overflow(v, base, &v) || __builtin_add_overflow(v, d, &v))
          fail("TemplateSyntaxError: integer literal too large", line_);
        any = true;
        ++k;
      }
      if (any) {
        toks_.push_back(Token{Tok::kInt, line_, std::string(s_.substr(pos_, k - pos_)), Value::integer(v)});
        pos_ = k;
        return;
      }
    }
    size_t k = i;
    digits(k);
    bool is_float = false;
    if (k + 1 < n && s_[k] == '.' && is_digit(s_[k + 1])) {
      ++k;
      digits(k);
      is_float = true;
    }
    if (k < n && (s_[k] == 'e' || s_[k] == 'E')) {
      size_t m = k + 1;
      if (m < n && (s_[m] == '+' || s_[m] == '-')) ++m;
      if (m < n && is_digit(s_[m])) {
        k = m;
        digits(k);
        is_float = true;
      }
    }
    if (!is_float && s_[i] == '0') {
      // jinja2's integer_re: a decimal literal starting with 0 is only zeros ("01" lexes as 0, 1).
      k = i + 1;
      while (k < n && (s_[k] == '0' || (s_[k] == '_' && k + 1 < n && s_[k + 1] == '0'))) ++k;
    }
    std::string lit;
    for (size_t q = i; q < k; ++q)
      if (s_[q] != '_') lit += s_[q];
    Token t{is_float ? Tok::kFloat : Tok::kInt, line_, std::string(s_.substr(i, k - i)), {}};
    if (is_float) {
      t.value = Value::real(std::strtod(lit.c_str(), nullptr));
    } else {
      errno = 0;
      long long v = std::strtoll(lit.c_str(), nullptr, 10);
      if (errno == ERANGE) fail("TemplateSyntaxError: integer literal too large", line_);
      t.value = Value::integer(v);
    }
    toks_.push_back(std::move(t));
    pos_ = k;
  }

  std::string_view s_;
  size_t pos_ = 0;
  int line_ = 1;
  bool line_starting_ = true;
  std::vector<Token> toks_;
};

// ---------------------------------------------------------------------------------------------

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  std::vector<NodePtr> parse() {
    std::vector<NodePtr> body = subparse({});
    return body;
  }

 private:
  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& pp) : p(pp) {
      if (++p.depth_ > kMaxParseDepth) fail("TemplateSyntaxError: template nests too deeply", p.cur().line);
    }
    ~DepthGuard() { --p.depth_; }
  };

  const Token& cur() const { return t_[i_]; }
  const Token& look() const { return t_[std::min(i_ + 1, t_.size() - 1)]; }
  void next() {
    if (i_ + 1 < t_.size()) ++i_;
  }
  bool is_op(const char* op) const { return cur().type == Tok::kOp && cur().text == op; }
  bool is_name(const char* name) const { return cur().type == Tok::kName && cur().text == name; }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    next();
    return true;
  }
  bool skip_name(const char* name) {
    if (!is_name(name)) return false;
    next();
    return true;
  }
  [[noreturn]] void unexpected(const std::string& expected) const {
    if (cur().type == Tok::kEof)
      fail("TemplateSyntaxError: unexpected end of template, expected " + expected, cur().line);
    fail("TemplateSyntaxError: expected " + expected + ", got '" + describe(cur()) + "'", cur().line);
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) unexpected(std::string("'") + op + "'");
  }
  void expect_name(const char* name) {
    if (!skip_name(name)) unexpected(std::string("'") + name + "'");
  }
  std::string expect_any_name() {
    if (cur().type != Tok::kName) unexpected("a name");
    std::string n = cur().text;
    next();
    return n;
  }
  void expect_block_end() {
    if (cur().type != Tok::kBlockEnd) unexpected("end of statement block");
    next();
  }

  NodePtr node(NodeKind k, int line) { return std::make_unique<Node>(k, line); }

  // Parses template data and tags until a block tag whose name is in `ends` (left unconsumed, the
  // stream positioned on that name).
  std::vector<NodePtr> subparse(const std::vector<const char*>& ends, const char* opener = nullptr, int open_line = 0) {
    DepthGuard g(*this);
    std::vector<NodePtr> body;
    while (true) {
      const Token& t = cur();
      switch (t.type) {
        case Tok::kData: {
          auto n = node(NodeKind::kData, t.line);
          n->name = t.text;
          body.push_back(std::move(n));
          next();
          break;
        }
        case Tok::kVarBegin: {
          int line = t.line;
          next();
          auto n = node(NodeKind::kOutput, line);
          n->a = parse_tuple(false, true, {}, false);
          if (cur().type != Tok::kVarEnd) unexpected("end of print statement");
          next();
          body.push_back(std::move(n));
          break;
        }
        case Tok::kBlockBegin: {
          next();
          if (cur().type == Tok::kName)
            for (const char* e : ends)
              if (cur().text == e) return body;
          auto st = parse_statement(ends, opener);
          if (st) body.push_back(std::move(st));
          expect_block_end();
          break;
        }
        case Tok::kEof: {
          if (!ends.empty()) {
            std::string want;
            for (size_t k = 0; k < ends.size(); ++k) want += (k ? " or '" : "'") + std::string(ends[k]) + "'";
            fail("TemplateSyntaxError: Unexpected end of template. Jinja was looking for the following tags: " +
                     want + ". The innermost block that needs to be closed is '" + opener + "' (line " +
                     std::to_string(open_line) + ").",
                 t.line);
          }
          return body;
        }
        default:
          fail("TemplateSyntaxError: unexpected '" + describe(t) + "'", t.line);
      }
    }
  }

  // parse_statements: block_end, body until one of `ends`; with drop_needle the end name is
  // consumed.
  std::vector<NodePtr> parse_statements(const std::vector<const char*>& ends, const char* opener, int open_line,
                                        bool drop_needle) {
    expect_block_end();
    auto body = subparse(ends, opener, open_line);
    if (drop_needle) next();
    return body;
  }

  NodePtr parse_statement(const std::vector<const char*>& ends, const char* opener) {
    DepthGuard g(*this);
    if (cur().type != Tok::kName) unexpected("a tag name");
    const std::string tag = cur().text;
    int line = cur().line;
    if (tag == "if") return parse_if();
    if (tag == "for") return parse_for();
    if (tag == "set") return parse_set();
    if (tag == "macro") return parse_macro();
    if (tag == "call") return parse_call_block();
    if (tag == "filter") return parse_filter_block();
    if (tag == "with") return parse_with();
    if (tag == "generation") {
      next();
      auto n = node(NodeKind::kGeneration, line);
      int saved = loop_depth_;
      loop_depth_ = 0;  // its body is a caller() macro in jinja2: break/continue can't cross it
      n->body = parse_statements({"endgeneration"}, "generation", line, true);
      loop_depth_ = saved;
      return n;
    }
    if (tag == "block") {  // standalone templates render blocks in place
      next();
      expect_any_name();
      auto n = node(NodeKind::kWith, line);
      n->body = parse_statements({"endblock"}, "block", line, true);
      if (cur().type == Tok::kName) next();  // {% endblock name %}
      return n;
    }
    if (tag == "print") {
      next();
      auto n = node(NodeKind::kOutput, line);
      n->a = parse_tuple(false, true, {}, false);
      return n;
    }
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) fail("TemplateSyntaxError: '" + tag + "' outside of a loop", line);
      next();
      return node(tag == "break" ? NodeKind::kBreak : NodeKind::kContinue, line);
    }
    std::string msg = "TemplateSyntaxError: Encountered unknown tag '" + tag + "'.";
    if (!ends.empty()) {
      msg += " Jinja was looking for the following tags: ";
      for (size_t k = 0; k < ends.size(); ++k) msg += (k ? " or '" : "'") + std::string(ends[k]) + "'";
      msg += ". The innermost block that needs to be closed is '" + std::string(opener ? opener : "") + "'.";
    }
    fail(msg, line);
  }

  NodePtr parse_if() {
    int line = cur().line;
    next();
    auto result = node(NodeKind::kIf, line);
    Node* n = result.get();
    while (true) {
      n->a = parse_tuple(false, false, {}, false);
      n->body = parse_statements({"elif", "else", "endif"}, "if", line, false);
      std::string which = cur().text;
      next();
      if (which == "elif") {
        auto e = node(NodeKind::kIf, cur().line);
        Node* raw = e.get();
        n->orelse.push_back(std::move(e));
        n = raw;
        continue;
      }
      if (which == "else") n->orelse = parse_statements({"endif"}, "if", line, true);
      break;
    }
    return result;
  }

  NodePtr parse_for() {
    int line = cur().line;
    next();
    auto n = node(NodeKind::kFor, line);
    n->target = parse_assign_target(true, false, {"in"});
    expect_name("in");
    n->a = parse_tuple(false, false, {"recursive"}, false);
    if (skip_name("if")) n->b = parse_expression(true);
    n->flag = skip_name("recursive");
    ++loop_depth_;
    n->body = parse_statements({"endfor", "else"}, "for", line, false);
    --loop_depth_;
    std::string which = cur().text;
    next();
    if (which == "else") n->orelse = parse_statements({"endfor"}, "for", line, true);
    return n;
  }

  NodePtr parse_set() {
    int line = cur().line;
    next();
    auto target = parse_assign_target(true, true, {});
    if (skip_op("=")) {
      auto n = node(NodeKind::kSet, line);
      n->target = std::move(target);
      n->a = parse_tuple(false, true, {}, false);
      return n;
    }
    auto n = node(NodeKind::kSetBlock, line);
    n->target = std::move(target);
    if (is_op("|")) n->a = parse_filter(nullptr, false);
    n->body = parse_statements({"endset"}, "set", line, true);
    return n;
  }

  void parse_signature(Node& n) {
    expect_op("(");
    bool have_default = false;
    while (!is_op(")")) {
      if (!n.children.empty()) expect_op(",");
      auto p = node(NodeKind::kName, cur().line);
      p->name = expect_any_name();
      if (skip_op("=")) {
        p->a = parse_expression(true);
        have_default = true;
      } else if (have_default) {
        fail("TemplateSyntaxError: non-default argument follows default argument", p->line);
      }
      n.children.push_back(std::move(p));
    }
    expect_op(")");
  }

  static void scan_uses(const Node* n, Node& owner) {
    if (!n) return;
    if (n->kind == NodeKind::kName) {
      if (n->name == "varargs") owner.uses_varargs = true;
      if (n->name == "kwargs") owner.uses_kwargs = true;
      if (n->name == "caller") owner.uses_caller = true;
    }
    // Nested macros and call blocks have their own varargs/kwargs/caller.
    if (n != &owner && (n->kind == NodeKind::kMacro || n->kind == NodeKind::kCallBlock)) {
      for (const auto& c : n->children) scan_uses(c->a.get(), owner);
      if (n->kind == NodeKind::kCallBlock) scan_uses(n->a.get(), owner);
      return;
    }
    scan_uses(n->a.get(), owner);
    scan_uses(n->b.get(), owner);
    scan_uses(n->c.get(), owner);
    scan_uses(n->target.get(), owner);
    scan_uses(n->dyn_args.get(), owner);
    scan_uses(n->dyn_kwargs.get(), owner);
    for (const auto& c : n->children) scan_uses(c.get(), owner);
    for (const auto& kv : n->kwargs) scan_uses(kv.second.get(), owner);
    for (const auto& c : n->body) scan_uses(c.get(), owner);
    for (const auto& c : n->orelse) scan_uses(c.get(), owner);
  }

  NodePtr parse_macro() {
    int line = cur().line;
    next();
    auto n = node(NodeKind::kMacro, line);
    n->name = expect_any_name();
    parse_signature(*n);
    int saved = loop_depth_;
    loop_depth_ = 0;
    n->body = parse_statements({"endmacro"}, "macro", line, true);
    loop_depth_ = saved;
    scan_uses(n.get(), *n);
    return n;
  }

  NodePtr parse_call_block() {
    int line = cur().line;
    next();
    auto n = node(NodeKind::kCallBlock, line);
    if (is_op("(")) parse_signature(*n);
    n->a = parse_expression(true);
    if (n->a->kind != NodeKind::kCall) fail("TemplateSyntaxError: expected call", line);
    int saved = loop_depth_;
    loop_depth_ = 0;
    n->body = parse_statements({"endcall"}, "call", line, true);
    loop_depth_ = saved;
    // The caller's body is the macro here: its varargs/kwargs.
    for (const auto& c : n->body) scan_uses(c.get(), *n);
    n->uses_caller = false;
    return n;
  }

  NodePtr parse_filter_block() {
    int line = cur().line;
    next();
    auto n = node(NodeKind::kFilterBlock, line);
    n->a = parse_filter(nullptr, true);
    n->body = parse_statements({"endfilter"}, "filter", line, true);
    return n;
  }

  NodePtr parse_with() {
    int line = cur().line;
    next();
    auto n = node(NodeKind::kWith, line);
    while (cur().type != Tok::kBlockEnd) {
      if (!n->children.empty()) expect_op(",");
      auto s = node(NodeKind::kSet, cur().line);
      s->target = parse_assign_target(true, false, {});
      expect_op("=");
      s->a = parse_expression(true);
      n->children.push_back(std::move(s));
    }
    n->body = parse_statements({"endwith"}, "with", line, true);
    return n;
  }

  // Assignment targets: a name, `ns.attr` (with_namespace) or a tuple of those.
  NodePtr parse_assign_target(bool with_tuple, bool with_namespace, const std::vector<const char*>& extra_end) {
    NodePtr target;
    if (with_tuple) {
      target = parse_tuple(true, true, extra_end, false, with_namespace);
    } else {
      target = parse_primary(with_namespace);
    }
    auto check = [&](const Node& t) {
      if (t.kind == NodeKind::kName) {
        if (t.name == "true" || t.name == "false" || t.name == "none" || t.name == "True" || t.name == "False" ||
            t.name == "None")
          fail("TemplateSyntaxError: can't assign to '" + t.name + "'", t.line);
        return;
      }
      if (t.kind == NodeKind::kGetattr && with_namespace && t.a && t.a->kind == NodeKind::kName) return;
      fail("TemplateSyntaxError: can't assign to this expression", t.line);
    };
    if (target->kind == NodeKind::kTupleLit) {
      for (const auto& c : target->children) check(*c);
    } else {
      check(*target);
    }
    return target;
  }

  // jinja2 3.1 passes extra_end_rules to test_any() as one tuple argument, so they never match:
  // only the closing tokens end a tuple (`{% for in in xs %}` names its variable `in`).
  bool is_tuple_end(const std::vector<const char*>& extra_end) const {
    (void)extra_end;
    return cur().type == Tok::kVarEnd || cur().type == Tok::kBlockEnd || is_op(")");
  }

  NodePtr parse_tuple(bool simplified, bool with_condexpr, const std::vector<const char*>& extra_end,
                      bool explicit_parens, bool with_namespace = false) {
    DepthGuard g(*this);
    int line = cur().line;
    std::vector<NodePtr> args;
    bool is_tuple = false;
    while (true) {
      if (!args.empty()) expect_op(",");
      if (is_tuple_end(extra_end)) break;
      if (simplified) args.push_back(parse_primary(with_namespace));
      else args.push_back(parse_expression(with_condexpr));
      if (is_op(",")) is_tuple = true;
      else break;
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parens) unexpected("an expression");
    }
    auto n = node(NodeKind::kTupleLit, line);
    n->children = std::move(args);
    return n;
  }

  NodePtr parse_expression(bool with_condexpr) {
    DepthGuard g(*this);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  NodePtr parse_condexpr() {
    int line = cur().line;
    NodePtr expr1 = parse_or();
    while (skip_name("if")) {
      auto n = node(NodeKind::kCondExpr, line);
      n->b = parse_or();  // condition
      if (skip_name("else")) n->c = parse_condexpr();
      n->a = std::move(expr1);
      expr1 = std::move(n);
      line = cur().line;
    }
    return expr1;
  }

  NodePtr parse_or() {
    int line = cur().line;
    NodePtr left = parse_and();
    while (skip_name("or")) {
      auto n = node(NodeKind::kOr, line);
      n->a = std::move(left);
      n->b = parse_and();
      left = std::move(n);
      line = cur().line;
    }
    return left;
  }

  NodePtr parse_and() {
    int line = cur().line;
    NodePtr left = parse_not();
    while (skip_name("and")) {
      auto n = node(NodeKind::kAnd, line);
      n->a = std::move(left);
      n->b = parse_not();
      left = std::move(n);
      line = cur().line;
    }
    return left;
  }

  NodePtr parse_not() {
    DepthGuard g(*this);
    if (is_name("not")) {
      int line = cur().line;
      next();
      auto n = node(NodeKind::kNot, line);
      n->a = parse_not();
      return n;
    }
    return parse_compare();
  }

  NodePtr parse_compare() {
    int line = cur().line;
    NodePtr expr = parse_math1();
    std::vector<std::string> ops;
    std::vector<NodePtr> operands;
    while (true) {
      if (cur().type == Tok::kOp && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                     cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        ops.push_back(cur().text);
        next();
      } else if (is_name("in")) {
        ops.push_back("in");
        next();
      } else if (is_name("not") && look().type == Tok::kName && look().text == "in") {
        ops.push_back("notin");
        next();
        next();
      } else {
        break;
      }
      operands.push_back(parse_math1());
    }
    if (ops.empty()) return expr;
    auto n = node(NodeKind::kCompare, line);
    n->a = std::move(expr);
    n->ops = std::move(ops);
    n->children = std::move(operands);
    return n;
  }

  NodePtr binary(const char* op, NodePtr l, NodePtr r, int line) {
    auto n = node(NodeKind::kBinary, line);
    n->name = op;
    n->a = std::move(l);
    n->b = std::move(r);
    return n;
  }

  NodePtr parse_math1() {
    int line = cur().line;
    NodePtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      std::string op = cur().text;
      next();
      left = binary(op.c_str(), std::move(left), parse_concat(), line);
      line = cur().line;
    }
    return left;
  }

  NodePtr parse_concat() {
    int line = cur().line;
    NodePtr first = parse_math2();
    if (!is_op("~")) return first;
    auto n = node(NodeKind::kConcat, line);
    n->children.push_back(std::move(first));
    while (skip_op("~")) n->children.push_back(parse_math2());
    return n;
  }

  NodePtr parse_math2() {
    int line = cur().line;
    NodePtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      std::string op = cur().text;
      next();
      left = binary(op.c_str(), std::move(left), parse_pow(), line);
      line = cur().line;
    }
    return left;
  }

  NodePtr parse_pow() {
    int line = cur().line;
    NodePtr left = parse_unary(true);
    while (skip_op("**")) {
      left = binary("**", std::move(left), parse_unary(true), line);
      line = cur().line;
    }
    return left;
  }

  NodePtr parse_unary(bool with_filter) {
    DepthGuard g(*this);
    int line = cur().line;
    NodePtr n;
    if (is_op("-")) {
      next();
      n = node(NodeKind::kNeg, line);
      n->a = parse_unary(false);
    } else if (is_op("+")) {
      next();
      n = node(NodeKind::kPos, line);
      n->a = parse_unary(false);
    } else {
      n = parse_primary(false);
    }
    n = parse_postfix(std::move(n));
    if (with_filter) n = parse_filter_expr(std::move(n));
    return n;
  }

  NodePtr parse_primary(bool with_namespace) {
    DepthGuard g(*this);
    const Token& t = cur();
    int line = t.line;
    if (t.type == Tok::kName) {
      std::string name = t.text;
      next();
      if (name == "true" || name == "True" || name == "false" || name == "False") {
        auto n = node(NodeKind::kConst, line);
        n->value = Value::boolean(name == "true" || name == "True");
        return n;
      }
      if (name == "none" || name == "None") {
        auto n = node(NodeKind::kConst, line);
        n->value = Value::none();
        return n;
      }
      auto n = node(NodeKind::kName, line);
      n->name = name;
      if (with_namespace && is_op(".")) {
        next();
        auto g2 = node(NodeKind::kGetattr, line);
        g2->name = expect_any_name();
        g2->a = std::move(n);
        return g2;
      }
      return n;
    }
    if (t.type == Tok::kString) {
      std::string s = t.value.s;
      next();
      while (cur().type == Tok::kString) {
        s += cur().value.s;
        next();
      }
      auto n = node(NodeKind::kConst, line);
      n->value = Value::string(std::move(s));
      return n;
    }
    if (t.type == Tok::kInt || t.type == Tok::kFloat) {
      auto n = node(NodeKind::kConst, line);
      n->value = t.value;
      next();
      return n;
    }
    if (is_op("(")) {
      next();
      NodePtr n = parse_tuple(false, true, {}, true);
      expect_op(")");
      return n;
    }
    if (is_op("[")) {
      next();
      auto n = node(NodeKind::kListLit, line);
      while (!is_op("]")) {
        if (!n->children.empty()) expect_op(",");
        if (is_op("]")) break;
        n->children.push_back(parse_expression(true));
      }
      expect_op("]");
      return n;
    }
    if (is_op("{")) {
      next();
      auto n = node(NodeKind::kDictLit, line);
      while (!is_op("}")) {
        if (!n->children.empty()) expect_op(",");
        if (is_op("}")) break;
        n->children.push_back(parse_expression(true));
        expect_op(":");
        n->children.push_back(parse_expression(true));
      }
      expect_op("}");
      return n;
    }
    if (t.type == Tok::kEof) unexpected("an expression");
    fail("TemplateSyntaxError: unexpected '" + describe(t) + "'", line);
  }

  NodePtr parse_postfix(NodePtr n) {
    while (true) {
      if (is_op(".") || is_op("[")) n = parse_subscript(std::move(n));
      else if (is_op("(")) n = parse_call(std::move(n));
      else break;
    }
    return n;
  }

  NodePtr parse_filter_expr(NodePtr n) {
    while (true) {
      if (is_op("|")) n = parse_filter(std::move(n), false);
      else if (is_name("is")) n = parse_test(std::move(n));
      else if (is_op("(")) n = parse_call(std::move(n));
      else break;
    }
    return n;
  }

  NodePtr parse_subscript(NodePtr base) {
    DepthGuard g(*this);
    int line = cur().line;
    if (skip_op(".")) {
      const Token& t = cur();
      if (t.type == Tok::kName) {
        auto n = node(NodeKind::kGetattr, line);
        n->name = t.text;
        n->a = std::move(base);
        next();
        return n;
      }
      if (t.type != Tok::kInt) fail("TemplateSyntaxError: expected name or number", t.line);
      auto n = node(NodeKind::kGetitem, line);
      n->a = std::move(base);
      n->b = node(NodeKind::kConst, t.line);
      n->b->value = t.value;
      next();
      return n;
    }
    expect_op("[");
    std::vector<NodePtr> args;
    while (!is_op("]")) {
      if (!args.empty()) expect_op(",");
      args.push_back(parse_subscribed());
    }
    expect_op("]");
    auto n = node(NodeKind::kGetitem, line);
    n->a = std::move(base);
    if (args.size() == 1) {
      n->b = std::move(args[0]);
    } else {
      n->b = node(NodeKind::kTupleLit, line);
      n->b->children = std::move(args);
    }
    return n;
  }

  NodePtr parse_subscribed() {
    int line = cur().line;
    NodePtr start;
    if (is_op(":")) {
      next();
    } else {
      NodePtr e = parse_expression(true);
      if (!is_op(":")) return e;
      next();
      start = std::move(e);
    }
    auto n = node(NodeKind::kSlice, line);
    n->a = std::move(start);
    if (!is_op(":") && !is_op("]") && !is_op(",")) n->b = parse_expression(true);
    if (skip_op(":")) {
      if (!is_op("]") && !is_op(",")) n->c = parse_expression(true);
    }
    return n;
  }

  void parse_call_args(Node& n) {
    int line = cur().line;
    expect_op("(");
    bool require_comma = false;
    auto ensure = [&](bool ok) {
      if (!ok) fail("TemplateSyntaxError: invalid syntax for function call expression", line);
    };
    while (!is_op(")")) {
      if (require_comma) {
        expect_op(",");
        if (is_op(")")) break;
      }
      if (is_op("*")) {
        ensure(!n.dyn_args && !n.dyn_kwargs);
        next();
        n.dyn_args = parse_expression(true);
      } else if (is_op("**")) {
        ensure(!n.dyn_kwargs);
        next();
        n.dyn_kwargs = parse_expression(true);
      } else if (cur().type == Tok::kName && look().type == Tok::kOp && look().text == "=") {
        ensure(!n.dyn_kwargs);
        std::string key = cur().text;
        for (const auto& kv : n.kwargs)
          if (kv.first == key) fail("TemplateSyntaxError: keyword argument repeated: " + key, cur().line);
        next();
        next();
        n.kwargs.emplace_back(key, parse_expression(true));
      } else {
        ensure(!n.dyn_args && !n.dyn_kwargs && n.kwargs.empty());
        n.children.push_back(parse_expression(true));
      }
      require_comma = true;
    }
    expect_op(")");
  }

  NodePtr parse_call(NodePtr base) {
    DepthGuard g(*this);
    auto n = node(NodeKind::kCall, cur().line);
    n->a = std::move(base);
    parse_call_args(*n);
    return n;
  }

  NodePtr parse_filter(NodePtr base, bool start_inline) {
    DepthGuard g(*this);
    while (is_op("|") || start_inline) {
      if (!start_inline) next();
      start_inline = false;
      int line = cur().line;
      std::string name = expect_any_name();
      while (skip_op(".")) name += "." + expect_any_name();
      auto n = node(NodeKind::kFilter, line);
      n->name = name;
      n->a = std::move(base);
      if (is_op("(")) parse_call_args(*n);
      base = std::move(n);
    }
    return base;
  }

  NodePtr parse_test(NodePtr base) {
    DepthGuard g(*this);
    int line = cur().line;
    next();  // is
    bool negated = skip_name("not");
    std::string name = expect_any_name();
    while (skip_op(".")) name += "." + expect_any_name();
    auto n = node(NodeKind::kTest, line);
    n->name = name;
    n->a = std::move(base);
    const Token& t = cur();
    if (is_op("(")) {
      parse_call_args(*n);
    } else if ((t.type == Tok::kName || t.type == Tok::kString || t.type == Tok::kInt || t.type == Tok::kFloat ||
                is_op("[") || is_op("{")) &&
               !(t.type == Tok::kName && (t.text == "else" || t.text == "or" || t.text == "and"))) {
      if (is_name("is")) fail("TemplateSyntaxError: You cannot chain multiple tests with is", t.line);
      n->children.push_back(parse_postfix(parse_primary(false)));
    }
    if (negated) {
      auto no = node(NodeKind::kNot, line);
      no->a = std::move(n);
      return no;
    }
    return n;
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
};

// jinja2 normalizes every newline sequence to "\n" and drops one trailing newline
// (keep_trailing_newline=False).
std::string normalize_source(const std::string& src) {
  std::string out;
  out.reserve(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] == '\r') {
      out += '\n';
      if (i + 1 < src.size() && src[i + 1] == '\n') ++i;
    } else {
      out += src[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// jinja2's code generator rejects unknown filters and tests at compile time, except inside
// "soft" frames (the blocks and conditions of {% if %}, inline if-expressions), where the error
// waits until the filter is called. Frames of loops, macros, call/set/filter blocks are not soft.
void check_names(const Node* n, bool soft) {
  if (!n) return;
  auto all = [&](const std::vector<NodePtr>& v, bool sf) {
    for (const auto& c : v) check_names(c.get(), sf);
  };
  switch (n->kind) {
    case NodeKind::kFilter:
    case NodeKind::kTest:
      if (!soft && !(n->kind == NodeKind::kFilter ? filter_exists(n->name) : test_exists(n->name)))
        fail(std::string("TemplateAssertionError: No ") + (n->kind == NodeKind::kFilter ? "filter" : "test") +
                 " named '" + n->name + "'.",
             n->line);
      break;
    case NodeKind::kIf:
      check_names(n->a.get(), true);
      all(n->body, true);
      all(n->orelse, true);
      return;
    case NodeKind::kCondExpr:
      check_names(n->a.get(), true);
      check_names(n->b.get(), true);
      check_names(n->c.get(), true);
      return;
    case NodeKind::kFor:
      check_names(n->target.get(), soft);
      check_names(n->a.get(), soft);
      check_names(n->b.get(), false);
      all(n->body, false);
      all(n->orelse, false);
      return;
    case NodeKind::kMacro:
    case NodeKind::kSetBlock:
    case NodeKind::kFilterBlock:
    case NodeKind::kGeneration:
      for (const auto& c : n->children) check_names(c->a.get(), false);
      check_names(n->a.get(), false);
      all(n->body, false);
      return;
    case NodeKind::kCallBlock:
      for (const auto& c : n->children) check_names(c->a.get(), false);
      check_names(n->a.get(), soft);
      all(n->body, false);
      return;
    case NodeKind::kWith:
      for (const auto& c : n->children) check_names(c->a.get(), soft);
      all(n->body, false);
      return;
    default: break;
  }
  check_names(n->a.get(), soft);
  check_names(n->b.get(), soft);
  check_names(n->c.get(), soft);
  check_names(n->target.get(), soft);
  check_names(n->dyn_args.get(), soft);
  check_names(n->dyn_kwargs.get(), soft);
  all(n->children, soft);
  for (const auto& kv : n->kwargs) check_names(kv.second.get(), soft);
  all(n->body, soft);
  all(n->orelse, soft);
}

}  // namespace

std::vector<NodePtr> parse_template(const std::string& source) {
  std::string src = normalize_source(source);
  Lexer lexer(src);
  Parser parser(lexer.run());
  std::vector<NodePtr> body = parser.parse();
  for (const auto& n : body) check_names(n.get(), false);
  return body;
}

}  // namespace kiln::chat::jinja
