// The tree-walking renderer and the builtins (filters, tests, methods, globals) it dispatches to.
// Internal to src/chat. One Renderer per render() call: it owns every scope of that render, so
// nothing is shared between concurrent renders of one parsed template.
#pragma once
#include <deque>
#include <string>
#include <utility>
#include <vector>

#include "chat/chat_template.h"
#include "chat/jinja_ast.h"

namespace kiln::chat::jinja {

struct CallArgs {
  ValueList pos;
  std::vector<std::pair<std::string, Value>> kw;
};

class Renderer;

struct Callable : Object {
  std::string name;
  virtual Value call(Renderer& r, CallArgs& args, int line) = 0;
};

// Reads a builtin's arguments the way Python binds them: positional index or keyword name.
class ArgReader {
 public:
  ArgReader(CallArgs& args, std::string fname) : a_(args), fname_(std::move(fname)) {}
  // The parameter at positional index `idx` (counting after the filter's input) or named `name`.
  Value get(size_t idx, const char* name, Value def = Value::undefined());
  bool has(size_t idx, const char* name) const;
  // Raises TypeError for keyword arguments nobody asked for, and for too many positionals.
  void finish(size_t max_positional);

 private:
  CallArgs& a_;
  std::string fname_;
  std::vector<std::string> used_;
};

struct Scope {
  Scope* parent = nullptr;
  std::vector<std::pair<std::string, Value>> vars;
  Value* find(const std::string& name) {
    for (auto& kv : vars)
      if (kv.first == name) return &kv.second;
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    if (Value* p = find(name)) *p = std::move(v);
    else vars.emplace_back(name, std::move(v));
  }
};

class Renderer {
 public:
  Renderer(const Value& context, const RenderLimits& limits);
  ~Renderer();
  std::string render(const std::vector<NodePtr>& body);

  // Used by builtins.
  Value call_value(const Value& fn, CallArgs& args, int line);
  Value apply_filter(const std::string& name, const Value& input, CallArgs& args, int line);
  bool apply_test(const std::string& name, const Value& input, CallArgs& args, int line);
  Value getattr(const Value& obj, const std::string& name);
  Value getitem(const Value& obj, const Value& key);
  // A string of `bytes` was built: charge it and check the output limit.
  void check_size(size_t bytes);
  // Namespaces can reference themselves; the renderer empties them all when it ends.
  void track_namespace(std::shared_ptr<NamespaceObj> ns) { namespaces_.push_back(std::move(ns)); }
  // The text being built reached `total` bytes after appending `appended`.
  void check_output(size_t total, size_t appended);
  void count_iterations(size_t n);
  const RenderLimits& limits() const { return limits_; }

  enum class Flow { kNormal, kBreak, kContinue };
  Flow exec_block(const std::vector<NodePtr>& body, Scope* s, std::string& out);
  Scope* new_scope(Scope* parent);
  Value eval(const Node& n, Scope* s);
  // Renders a for loop over `items` (also the recursive `loop(...)` call).
  void run_for(const Node& n, ValueList items, Scope* s, std::string& out, int depth);

  int macro_depth = 0;
  bool const_mode_ = false;  // fold_constants: names and calls are not constant
  void fold(NodePtr& n, Scope* scope);

 private:
  Flow exec(const Node& n, Scope* s, std::string& out);
  Flow exec_node(const Node& n, Scope* s, std::string& out);
  void exec_output(const Node& n, Scope* s, std::string& out);
  void exec_for(const Node& n, Scope* s, std::string& out);
  void exec_set(const Node& n, Scope* s);
  void exec_filtered(const Node& n, Scope* s, std::string& out);
  void exec_macro(const Node& n, Scope* s, std::string& out);
  Flow exec_with(const Node& n, Scope* s, std::string& out);
  Value eval_node(const Node& n, Scope* s);
  Value eval_literal(const Node& n, Scope* s);
  Value eval_getitem(const Node& n, Scope* s);
  Value eval_call(const Node& n, Scope* s);
  Value eval_unary(const Node& n, Scope* s);
  Value eval_binop(const Node& n, Scope* s);
  Value eval_chain(const Node& n, Scope* s);
  Value eval_logic(const Node& n, Scope* s);
  Value lookup(const std::string& name, Scope* s);
  void assign(const Node& target, const Value& v, Scope* s);
  Value eval_binary(const std::string& op, const Value& a, const Value& b);
  bool eval_compare(const std::string& op, const Value& a, const Value& b);
  void build_args(const Node& n, Scope* s, CallArgs& args);

  Value context_;
  DictData globals_;
  RenderLimits limits_;
  std::deque<Scope> scopes_;
  size_t iterations_ = 0;
  int eval_depth_ = 0;
  size_t out_bytes_hint_ = 0;
  WorkBudget budget_;
  std::vector<std::shared_ptr<NamespaceObj>> namespaces_;
};

// Replaces constant expressions by their values, as jinja2's optimizer does at compile time.
void fold_constants(std::vector<NodePtr>& body);

// Builtins (jinja_builtins.cpp).
using FilterFn = Value (*)(Renderer& r, const Value& input, CallArgs& args, int line);
using TestFn = bool (*)(Renderer& r, const Value& input, CallArgs& args, int line);
FilterFn find_filter(const std::string& name);
TestFn find_test(const std::string& name);
// A bound method of a builtin type (str.strip, dict.items, ...), or undefined if the type has no
// such attribute. Mutating methods of lists/dicts come back as the sandbox's unsafe undefined.
Value find_method(const Value& self, const std::string& name);
void add_globals(DictData& globals);
Value make_builtin(std::string name, Value (*fn)(Renderer&, const Value& self, CallArgs&, int), Value self = Value());
Value python_mod_format(const std::string& fmt, const Value& args, bool markup = false);
Value slice_value(const Value& obj, const Value& start, const Value& stop, const Value& step);

}  // namespace kiln::chat::jinja
