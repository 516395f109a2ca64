// The evaluator: jinja2's runtime semantics (scoping, Undefined, loop objects, macros, call
// blocks) under transformers' ImmutableSandboxedEnvironment.
#include "chat/jinja_render.h"

#include <cmath>

namespace kiln::chat::jinja {
namespace {

constexpr int kMaxEvalDepth = 1500;  // C++ frames of eval/exec: bounds stack use on any input

struct EvalDepth {
  int& d;
  EvalDepth(int& depth, int line) : d(depth) {
    if (++d > kMaxEvalDepth) fail("RecursionError: maximum recursion depth exceeded", line);
  }
  ~EvalDepth() { --d; }
};

struct LoopObj : Object {
  ValueList items_store;
  const ValueList* items = &items_store;
  size_t index0 = 0;
  int depth0 = 0;
  const Node* node = nullptr;  // for recursive loop(...)
  Scope* scope = nullptr;
  bool has_changed = false;
  Value last_changed;
};

struct MacroFn : Callable {
  const Node* node = nullptr;   // kMacro, or kCallBlock for caller()
  Scope* closure = nullptr;
  bool is_caller = false;
  Value call(Renderer& r, CallArgs& args, int line) override {
    const auto& params = node->children;
    if (r.macro_depth >= r.limits().max_depth)
      fail("RecursionError: macro calls nest deeper than " + std::to_string(r.limits().max_depth), line);
    Scope* s = r.new_scope(closure);
    size_t npos = std::min(args.pos.size(), params.size());
    std::vector<bool> given(params.size(), false);
    std::vector<Value> vals(params.size());
    for (size_t k = 0; k < npos; ++k) {
      vals[k] = args.pos[k];
      given[k] = true;
    }
    std::vector<std::pair<std::string, Value>> rest_kw;
    Value caller;
    bool have_caller = false;
    for (auto& kv : args.kw) {
      bool matched = false;
      for (size_t k = npos; k < params.size(); ++k)
        if (params[k]->name == kv.first) {
          vals[k] = kv.second;
          given[k] = true;
          matched = true;
          break;
        }
      if (matched) continue;
      if (kv.first == "caller" && node->uses_caller && !is_caller) {
        caller = kv.second;
        have_caller = true;
        continue;
      }
      rest_kw.push_back(kv);
    }
    if (!rest_kw.empty() && !node->uses_kwargs) {
      if (rest_kw[0].first == "caller")
        fail("TypeError: macro '" + name + "' was invoked with two values for the special caller argument.", line);
      fail("TypeError: macro '" + name + "' takes no keyword argument '" + rest_kw[0].first + "'", line);
    }
    if (args.pos.size() > params.size() && !node->uses_varargs)
      fail("TypeError: macro '" + name + "' takes not more than " + std::to_string(params.size()) + " argument(s)",
           line);
    // Defaults are evaluated inside the macro's scope, left to right, so they can use earlier
    // parameters.
    for (size_t k = 0; k < params.size(); ++k) {
      if (!given[k]) {
        if (params[k]->a) vals[k] = r.eval(*params[k]->a, s);
        else vals[k] = Value::undefined(params[k]->name, "parameter '" + params[k]->name + "' was not provided");
      }
      s->set(params[k]->name, vals[k]);
    }
    if (node->uses_caller && !is_caller)
      s->set("caller", have_caller ? caller : Value::undefined("caller", "No caller defined"));
    if (node->uses_kwargs) {
      DictData d;
      for (auto& kv : rest_kw) d.set(Value::string(kv.first), kv.second);
      s->set("kwargs", Value::make_dict(std::move(d)));
    }
    if (node->uses_varargs) {
      ValueList extra;
      for (size_t k = params.size(); k < args.pos.size(); ++k) extra.push_back(args.pos[k]);
      s->set("varargs", Value::make_list(std::move(extra), true));
    }
    std::string out;
    ++r.macro_depth;
    try {
      r.exec_block(node->body, s, out);
    } catch (...) {
      --r.macro_depth;
      throw;
    }
    --r.macro_depth;
    return Value::string(std::move(out));
  }
};

struct LoopCallFn : Callable {
  std::shared_ptr<LoopObj> loop;
  Value call(Renderer& r, CallArgs& args, int line) override {
    if (args.pos.size() != 1 || !args.kw.empty()) fail("TypeError: loop() takes exactly one argument", line);
    if (r.macro_depth >= r.limits().max_depth)
      fail("RecursionError: recursive loops nest deeper than " + std::to_string(r.limits().max_depth), line);
    std::string out;
    ++r.macro_depth;
    try {
      r.run_for(*loop->node, iterate(args.pos[0]), loop->scope, out, loop->depth0 + 1);
    } catch (...) {
      --r.macro_depth;
      throw;
    }
    --r.macro_depth;
    return Value::string(std::move(out));
  }
};

struct LoopMethodFn : Callable {
  std::shared_ptr<LoopObj> loop;
  bool is_cycle = true;
  Value call(Renderer& r, CallArgs& args, int line) override {
    if (is_cycle) {
      if (args.pos.empty()) fail("TypeError: no items for cycling given", line);
      return args.pos[loop->index0 % args.pos.size()];
    }
    Value v = Value::make_list(args.pos);
    if (!loop->has_changed || !equal(v, loop->last_changed)) {
      loop->has_changed = true;
      loop->last_changed = v;
      return Value::boolean(true);
    }
    return Value::boolean(false);
  }
};

Value loop_attr(const std::shared_ptr<LoopObj>& loop, const std::string& name) {
  size_t len = loop->items->size();
  size_t i = loop->index0;
  if (name == "index") return Value::integer(static_cast<int64_t>(i + 1));
  if (name == "index0") return Value::integer(static_cast<int64_t>(i));
  if (name == "revindex") return Value::integer(static_cast<int64_t>(len - i));
  if (name == "revindex0") return Value::integer(static_cast<int64_t>(len - i - 1));
  if (name == "first") return Value::boolean(i == 0);
  if (name == "last") return Value::boolean(i + 1 == len);
  if (name == "length") return Value::integer(static_cast<int64_t>(len));
  if (name == "depth") return Value::integer(loop->depth0 + 1);
  if (name == "depth0") return Value::integer(loop->depth0);
  if (name == "previtem")
    return i > 0 ? (*loop->items)[i - 1] : Value::undefined("previtem", "there is no previous item");
  if (name == "nextitem")
    return i + 1 < len ? (*loop->items)[i + 1] : Value::undefined("nextitem", "there is no next item");
  if (name == "cycle" || name == "changed") {
    auto fn = std::make_shared<LoopMethodFn>();
    fn->loop = loop;
    fn->is_cycle = name == "cycle";
    fn->name = "loop." + name;
    Value v;
    v.kind = Kind::kCallable;
    v.obj = fn;
    return v;
  }
  Value owner;
  owner.kind = Kind::kLoop;
  return Value::undefined_attr(owner, Value::string(name));
}

}  // namespace

Renderer::Renderer(const Value& context, const RenderLimits& limits) : context_(context), limits_(limits) {
  add_globals(globals_);
  budget_.limit = limits.max_work;
}

Renderer::~Renderer() {
  // Break reference cycles through namespaces ({% set ns.me = ns %}) so everything is freed,
  // one level at a time (no deep recursive destruction).
  for (auto& ns : namespaces_) {
    std::vector<std::pair<Value, Value>> items;
    items.swap(ns->attrs.items);
  }
}

Scope* Renderer::new_scope(Scope* parent) {
  scopes_.emplace_back();
  scopes_.back().parent = parent;
  return &scopes_.back();
}

void Renderer::check_size(size_t bytes) {
  charge(bytes);
  if (bytes > limits_.max_output_bytes)
    fail("MemoryError: rendered text exceeds the limit of " + std::to_string(limits_.max_output_bytes) + " bytes");
}

void Renderer::check_output(size_t total, size_t appended) {
  charge(appended);
  if (total > limits_.max_output_bytes)
    fail("MemoryError: rendered text exceeds the limit of " + std::to_string(limits_.max_output_bytes) + " bytes");
}

void Renderer::count_iterations(size_t n) {
  iterations_ += n;
  if (iterations_ > limits_.max_loop_iterations)
    fail("RuntimeError: more than " + std::to_string(limits_.max_loop_iterations) + " loop iterations in one render");
}

std::string Renderer::render(const std::vector<NodePtr>& body) {
  struct BudgetScope {
    explicit BudgetScope(WorkBudget* b) { set_work_budget(b); }
    ~BudgetScope() { set_work_budget(nullptr); }
  } budget_scope(&budget_);
  Scope* root = new_scope(nullptr);
  std::string out;
  exec_block(body, root, out);
  return out;
}

namespace {
struct Impossible {};  // constant folding gave up (jinja2's nodes.Impossible)
}  // namespace

Value Renderer::lookup(const std::string& name, Scope* s) {
  if (const_mode_) throw Impossible{};
  for (Scope* p = s; p; p = p->parent)
    if (Value* v = p->find(name)) return *v;
  if (context_.is_dict())
    if (const Value* v = context_.entries().find(std::string_view(name))) return *v;
  if (const Value* v = globals_.find(std::string_view(name))) return *v;
  return Value::undefined(name);
}

Renderer::Flow Renderer::exec_block(const std::vector<NodePtr>& body, Scope* s, std::string& out) {
  for (const auto& n : body) {
    Flow f = exec(*n, s, out);
    if (f != Flow::kNormal) return f;
  }
  return Flow::kNormal;
}

void Renderer::assign(const Node& target, const Value& v, Scope* s) {
  if (target.kind == NodeKind::kName) {
    s->set(target.name, v);
    return;
  }
  if (target.kind == NodeKind::kGetattr) {  // {% set ns.attr = v %}
    Value ns = lookup(target.a->name, s);
    if (ns.kind != Kind::kNamespace)
      fail("TemplateRuntimeError: cannot assign attribute on non-namespace object", target.line);
    static_cast<NamespaceObj*>(ns.obj.get())->attrs.set(Value::string(target.name), v);
    return;
  }
  // Tuple unpacking.
  ValueList items = iterate(v);
  const auto& names = target.children;
  if (items.size() > names.size())
    fail("ValueError: too many values to unpack (expected " + std::to_string(names.size()) + ")", target.line);
  if (items.size() < names.size())
    fail("ValueError: not enough values to unpack (expected " + std::to_string(names.size()) + ", got " +
             std::to_string(items.size()) + ")",
         target.line);
  for (size_t k = 0; k < names.size(); ++k) assign(*names[k], items[k], s);
}

void Renderer::run_for(const Node& n, ValueList items, Scope* s, std::string& out, int depth) {
  Scope* ls = new_scope(s);
  if (n.b) {  // {% for x in xs if cond %}: filtered before the loop (loop.length counts the rest)
    ValueList kept;
    for (auto& it : items) {
      count_iterations(1);
      assign(*n.target, it, ls);
      if (truthy(eval(*n.b, ls))) kept.push_back(it);
    }
    items = std::move(kept);
  }
  auto loop = std::make_shared<LoopObj>();
  loop->items_store = std::move(items);
  const ValueList& its = loop->items_store;
  loop->depth0 = depth;
  loop->node = &n;
  loop->scope = s;
  Value loop_value;
  loop_value.kind = Kind::kLoop;
  loop_value.obj = loop;
  // jinja2 enters the loop body's frame inside the Python for statement: every iteration starts
  // from fresh locals, so a {% set %} in the body neither survives to the next iteration nor
  // leaks out (hence namespace()).
  // jinja2 clears its "run the else block" flag at the end of the loop body, so {% else %} also
  // runs when every iteration left through break or continue.
  bool completed = false;
  for (size_t k = 0; k < its.size(); ++k) {
    count_iterations(1);
    loop->index0 = k;
    ls->vars.clear();
    assign(*n.target, its[k], ls);
    ls->set("loop", loop_value);
    Flow f = exec_block(n.body, ls, out);
    if (f == Flow::kBreak) break;
    if (f == Flow::kNormal) completed = true;
  }
  if (!completed) exec_block(n.orelse, new_scope(s), out);
}

Renderer::Flow Renderer::exec(const Node& n, Scope* s, std::string& out) {
  EvalDepth guard(eval_depth_, n.line);
  try {
    return exec_node(n, s, out);
  } catch (Error& e) {
    if (e.line == 0) e.line = n.line;
    throw;
  }
}

Renderer::Flow Renderer::exec_node(const Node& n, Scope* s, std::string& out) {
  switch (n.kind) {
    case NodeKind::kData:
      out += n.name;
      check_output(out.size(), n.name.size());
      return Flow::kNormal;
    case NodeKind::kOutput: exec_output(n, s, out); return Flow::kNormal;
    case NodeKind::kIf:
      if (truthy(eval(*n.a, s))) return exec_block(n.body, s, out);
      return exec_block(n.orelse, s, out);
    case NodeKind::kFor: exec_for(n, s, out); return Flow::kNormal;
    case NodeKind::kSet: exec_set(n, s); return Flow::kNormal;
    case NodeKind::kSetBlock:
    case NodeKind::kFilterBlock: exec_filtered(n, s, out); return Flow::kNormal;
    case NodeKind::kMacro:
    case NodeKind::kCallBlock: exec_macro(n, s, out); return Flow::kNormal;
    case NodeKind::kWith: return exec_with(n, s, out);
    case NodeKind::kGeneration: exec_filtered(n, s, out); return Flow::kNormal;
    case NodeKind::kBreak: return Flow::kBreak;
    case NodeKind::kContinue: return Flow::kContinue;
    default: fail("internal: expression node in statement position");
  }
}

[[gnu::noinline]] void Renderer::exec_output(const Node& n, Scope* s, std::string& out) {
  Value v = eval(*n.a, s);
  size_t before = out.size();
  if (v.kind == Kind::kString) out += v.s;
  else out += to_str(v);
  check_output(out.size(), out.size() - before);
}

[[gnu::noinline]] void Renderer::exec_for(const Node& n, Scope* s, std::string& out) {
  Value seq = eval(*n.a, s);
  run_for(n, iterate(seq), s, out, 0);
}

[[gnu::noinline]] void Renderer::exec_set(const Node& n, Scope* s) { assign(*n.target, eval(*n.a, s), s); }

// {% set x %}...{% endset %}, {% filter f %}...{% endfilter %}, {% generation %}: the body renders
// into its own buffer (and scope), then goes through the filters.
[[gnu::noinline]] void Renderer::exec_filtered(const Node& n, Scope* s, std::string& out) {
  std::string body;
  exec_block(n.body, new_scope(s), body);
  if (n.kind == NodeKind::kGeneration) {
    out += body;
    check_output(out.size(), body.size());
    return;
  }
  Value v = Value::string(std::move(body));
  if (n.a) {
    // The filter chain was parsed with an empty base: apply it innermost first.
    std::vector<const Node*> chain;
    for (const Node* f = n.a.get(); f; f = f->a.get()) chain.push_back(f);
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) {
      CallArgs args;
      build_args(**it, s, args);
      v = apply_filter((*it)->name, v, args, (*it)->line);
    }
  }
  if (n.kind == NodeKind::kSetBlock) {
    assign(*n.target, v, s);
    return;
  }
  size_t before = out.size();
  out += to_str(v);
  check_output(out.size(), out.size() - before);
}

[[gnu::noinline]] void Renderer::exec_macro(const Node& n, Scope* s, std::string& out) {
  auto fn = std::make_shared<MacroFn>();
  fn->node = &n;
  fn->closure = s;
  Value v;
  v.kind = Kind::kCallable;
  if (n.kind == NodeKind::kMacro) {
    fn->name = n.name;
    v.obj = fn;
    s->set(n.name, v);
    return;
  }
  fn->name = "caller";
  fn->is_caller = true;
  v.obj = fn;
  const Node& call = *n.a;
  Value callee = eval(*call.a, s);
  CallArgs args;
  build_args(call, s, args);
  args.kw.emplace_back("caller", v);
  Value r = call_value(callee, args, call.line);
  size_t before = out.size();
  out += to_str(r);
  check_output(out.size(), out.size() - before);
}

[[gnu::noinline]] Renderer::Flow Renderer::exec_with(const Node& n, Scope* s, std::string& out) {
  Scope* ws = new_scope(s);
  std::vector<std::pair<const Node*, Value>> vals;
  for (const auto& c : n.children) vals.emplace_back(c->target.get(), eval(*c->a, s));
  for (auto& tv : vals) assign(*tv.first, tv.second, ws);
  return exec_block(n.body, ws, out);
}

void Renderer::build_args(const Node& n, Scope* s, CallArgs& args) {
  for (const auto& c : n.children) args.pos.push_back(eval(*c, s));
  for (const auto& kv : n.kwargs) args.kw.emplace_back(kv.first, eval(*kv.second, s));
  if (n.dyn_args) {
    ValueList extra = iterate(eval(*n.dyn_args, s));
    args.pos.insert(args.pos.end(), extra.begin(), extra.end());
  }
  if (n.dyn_kwargs) {
    Value d = eval(*n.dyn_kwargs, s);
    if (!d.is_dict()) fail("TypeError: argument after ** must be a mapping, not " + type_name(d), n.line);
    for (const auto& kv : d.entries().items) {
      if (!kv.first.is_string()) fail("TypeError: keywords must be strings", n.line);
      args.kw.emplace_back(kv.first.s, kv.second);
    }
  }
}

Value Renderer::call_value(const Value& fn, CallArgs& args, int line) {
  if (fn.is_undefined()) fail_undefined(fn);
  if (fn.kind == Kind::kLoop) {  // recursive for: loop(children)
    auto loop = std::static_pointer_cast<LoopObj>(fn.obj);
    if (!loop->node->flag) fail("TypeError: Tried to call non recursive loop.  Maybe you forgot the 'recursive' modifier.", line);
    LoopCallFn call;
    call.loop = loop;
    return call.call(*this, args, line);
  }
  if (fn.kind != Kind::kCallable) fail("TypeError: '" + type_name(fn) + "' object is not callable", line);
  return static_cast<Callable*>(fn.obj.get())->call(*this, args, line);
}

Value Renderer::apply_filter(const std::string& name, const Value& input, CallArgs& args, int line) {
  FilterFn f = find_filter(name);
  if (!f) fail("TemplateRuntimeError: No filter named '" + name + "' found.", line);
  return f(*this, input, args, line);
}

bool Renderer::apply_test(const std::string& name, const Value& input, CallArgs& args, int line) {
  static const char* kNoArgs[] = {"boolean", "callable", "defined", "undefined", "none", "false", "true",
                                  "integer", "float", "number", "string", "mapping", "iterable", "sequence",
                                  "escaped", "even", "odd", "lower", "upper", "filter", "test"};
  for (const char* na : kNoArgs)
    if (name == na && (!args.pos.empty() || !args.kw.empty()))
      fail("TypeError: test_" + name + "() takes 1 positional argument but " + std::to_string(1 + args.pos.size()) +
               " were given",
           line);
  TestFn t = find_test(name);
  if (!t) fail("TemplateRuntimeError: No test named '" + name + "' found.", line);
  return t(*this, input, args, line);
}

Value Renderer::getattr(const Value& obj, const std::string& name) {
  switch (obj.kind) {
    case Kind::kUndefined: fail_undefined(obj);
    case Kind::kDict: {
      Value m = find_method(obj, name);
      if (!m.is_undefined() || (m.obj && static_cast<UndefInfo*>(m.obj.get())->security)) return m;
      if (const Value* v = obj.entries().find(std::string_view(name))) return *v;
      return Value::undefined_attr(obj, Value::string(name));
    }
    case Kind::kNamespace: {
      auto* ns = static_cast<NamespaceObj*>(obj.obj.get());
      if (const Value* v = ns->attrs.find(std::string_view(name))) return *v;
      return Value::undefined_attr(obj, Value::string(name));
    }
    case Kind::kLoop: return loop_attr(std::static_pointer_cast<LoopObj>(obj.obj), name);
    default: {
      Value m = find_method(obj, name);
      if (!m.is_undefined() || (m.obj && static_cast<UndefInfo*>(m.obj.get())->security)) return m;
      return Value::undefined_attr(obj, Value::string(name));
    }
  }
}

Value Renderer::getitem(const Value& obj, const Value& key) {
  switch (obj.kind) {
    case Kind::kUndefined: fail_undefined(obj);
    case Kind::kDict: {
      // An unhashable key is a TypeError that jinja2's getitem swallows: undefined.
      if ((key.kind == Kind::kList && !key.flag) || key.kind == Kind::kDict) break;
      if (const Value* v = obj.entries().find(key)) return *v;
      break;
    }
    case Kind::kList:
    case Kind::kString: {
      if (const SeqTag* t = seq_tag(obj); t && t->type != SeqTag::kRange) break;  // views: no indexing
      if (key.kind == Kind::kInt || key.kind == Kind::kBool) {
        int64_t idx = key.as_int();
        if (obj.kind == Kind::kList) {
          int64_t n = static_cast<int64_t>(obj.items().size());
          if (idx < 0) idx += n;
          if (idx >= 0 && idx < n) return obj.items()[static_cast<size_t>(idx)];
          return Value::undefined_attr(obj, key);
        }
        bool ascii = true;
        for (char c : obj.s)
          if (static_cast<unsigned char>(c) >= 0x80) { ascii = false; break; }
        if (ascii) {
          int64_t n = static_cast<int64_t>(obj.s.size());
          if (idx < 0) idx += n;
          if (idx >= 0 && idx < n) {
            Value ch = Value::string(std::string(1, obj.s[static_cast<size_t>(idx)]));
            ch.flag = obj.flag;
            return ch;
          }
          return Value::undefined_attr(obj, key);
        }
        auto cps = utf8_decode(obj.s);
        int64_t n = static_cast<int64_t>(cps.size());
        if (idx < 0) idx += n;
        if (idx >= 0 && idx < n) {
          std::string ch;
          utf8_append(ch, cps[static_cast<size_t>(idx)]);
          Value cv = Value::string(std::move(ch));
          cv.flag = obj.flag;
          return cv;
        }
        return Value::undefined_attr(obj, key);
      }
      break;
    }
    default: break;
  }
  // obj[key] failed: jinja2 falls back to the attribute for string keys.
  if (key.is_string()) {
    if (obj.kind == Kind::kNamespace || obj.kind == Kind::kLoop) return getattr(obj, key.s);
    Value m = find_method(obj, key.s);
    if (!m.is_undefined() || (m.obj && static_cast<UndefInfo*>(m.obj.get())->security)) return m;
  }
  return Value::undefined_attr(obj, key);
}

static bool is_int(const Value& v) { return v.kind == Kind::kInt || v.kind == Kind::kBool; }

Value Renderer::eval_binary(const std::string& op, const Value& a, const Value& b) {
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  auto unsupported = [&]() -> Value {
    fail("TypeError: unsupported operand type(s) for " + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
  };
  char o = op[0];
  bool both_num = a.is_number() && b.is_number();
  bool any_float = a.kind == Kind::kFloat || b.kind == Kind::kFloat;
  if (op == "+") {
    if (both_num) {
      if (any_float) return Value::real(a.as_double() + b.as_double());
      int64_t r;
      if (__builtin_add_overflow(a.as_int(), b.as_int(), &r)) fail("OverflowError: integer result out of range");
      return Value::integer(r);
    }
    if (a.is_string() && b.is_string()) {
      check_size(a.s.size() + b.s.size());
      // markupsafe: Markup + str (either order) escapes the plain side and stays Markup.
      if (a.is_markup() || b.is_markup())
        return Value::markup((a.is_markup() ? a.s : html_escape(a.s)) + (b.is_markup() ? b.s : html_escape(b.s)));
      return Value::string(a.s + b.s);
    }
    if (a.is_list() && b.is_list() && a.flag == b.flag && !seq_tag(a) && !seq_tag(b)) {
      check_size((a.items().size() + b.items().size()) * kElementCost);
      ValueList items = a.items();
      items.insert(items.end(), b.items().begin(), b.items().end());
      return Value::make_list(std::move(items), a.flag);
    }
    if (a.is_string()) fail("TypeError: can only concatenate str (not \"" + type_name(b) + "\") to str");
    if (a.is_list()) fail("TypeError: can only concatenate " + type_name(a) + " (not \"" + type_name(b) + "\") to " + type_name(a));
    return unsupported();
  }
  if (op == "-") {
    if (!both_num) return unsupported();
    if (any_float) return Value::real(a.as_double() - b.as_double());
    int64_t r;
    if (__builtin_sub_overflow(a.as_int(), b.as_int(), &r)) fail("OverflowError: integer result out of range");
    return Value::integer(r);
  }
  if (op == "*") {
    if (both_num) {
      if (any_float) return Value::real(a.as_double() * b.as_double());
      int64_t r;
      if (__builtin_mul_overflow(a.as_int(), b.as_int(), &r)) fail("OverflowError: integer result out of range");
      return Value::integer(r);
    }
    const Value* seq = nullptr;
    const Value* cnt = nullptr;
    if ((a.is_string() || (a.is_list() && !seq_tag(a))) && is_int(b)) { seq = &a; cnt = &b; }
    if ((b.is_string() || (b.is_list() && !seq_tag(b))) && is_int(a)) { seq = &b; cnt = &a; }
    if (!seq && (seq_tag(a) || seq_tag(b))) return unsupported();
    if (!seq) {
      if (a.is_string() || b.is_string() || a.is_list() || b.is_list())
        fail("TypeError: can't multiply sequence by non-int of type '" + type_name(a.is_string() || a.is_list() ? b : a) + "'");
      return unsupported();
    }
    int64_t n = std::max<int64_t>(0, cnt->as_int());
    if (seq->is_string()) {
      if (n > 0 && seq->s.size() > 0) check_size(seq->s.size() * std::min<uint64_t>(n, limits_.max_output_bytes + 1));
      std::string r;
      for (int64_t k = 0; k < n && !seq->s.empty(); ++k) r += seq->s;
      Value out = Value::string(std::move(r));
      out.flag = seq->flag;
      return out;
    }
    if (n > 0 && !seq->items().empty())
      check_size(seq->items().size() * kElementCost * std::min<uint64_t>(n, limits_.max_output_bytes + 1));
    ValueList r;
    for (int64_t k = 0; k < n && !seq->items().empty(); ++k) r.insert(r.end(), seq->items().begin(), seq->items().end());
    return Value::make_list(std::move(r), seq->flag);
  }
  if (op == "/") {
    if (!both_num) return unsupported();
    if (b.as_double() == 0) fail("ZeroDivisionError: division by zero");
    return Value::real(a.as_double() / b.as_double());
  }
  if (op == "//") {
    if (!both_num) return unsupported();
    if (any_float) {
      if (b.as_double() == 0) fail("ZeroDivisionError: float floor division by zero");
      double x = a.as_double(), y = b.as_double();
      double mod = std::fmod(x, y);
      double div = (x - mod) / y;
      if (mod != 0 && ((y < 0) != (mod < 0))) div -= 1.0;
      double fl = std::floor(div);
      if (div - fl > 0.5) fl += 1.0;
      if (div == 0) fl = std::copysign(0.0, x / y);
      return Value::real(fl);
    }
    int64_t x = a.as_int(), y = b.as_int();
    if (y == 0) fail("ZeroDivisionError: integer division or modulo by zero");
    if (x == INT64_MIN && y == -1) fail("OverflowError: integer result out of range");
    int64_t q = x / y;
    if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
    return Value::integer(q);
  }
  if (op == "%") {
    if (a.is_string()) return python_mod_format(a.s, b, a.is_markup());
    if (!both_num) return unsupported();
    if (any_float) {
      double x = a.as_double(), y = b.as_double();
      if (y == 0) fail("ZeroDivisionError: float modulo");
      double m = std::fmod(x, y);
      if (m != 0 && ((y < 0) != (m < 0))) m += y;
      if (m == 0) m = std::copysign(0.0, y);
      return Value::real(m);
    }
    int64_t x = a.as_int(), y = b.as_int();
    if (y == 0) fail("ZeroDivisionError: integer division or modulo by zero");
    if (y == -1) return Value::integer(0);
    int64_t m = x % y;
    if (m != 0 && ((y < 0) != (m < 0))) m += y;
    return Value::integer(m);
  }
  if (op == "**") {
    if (!both_num) return unsupported();
    if (!any_float && b.as_int() >= 0) {
      int64_t base = a.as_int(), e = b.as_int(), r = 1;
      while (e > 0) {
        if (e & 1)
          if (__builtin_mul_overflow(r, base, &r)) fail("OverflowError: integer result out of range");
        e >>= 1;
        if (e && __builtin_mul_overflow(base, base, &base)) fail("OverflowError: integer result out of range");
      }
      return Value::integer(r);
    }
    double x = a.as_double(), y = b.as_double();
    if (x == 0 && y < 0) fail("ZeroDivisionError: 0.0 cannot be raised to a negative power");
    return Value::real(std::pow(x, y));
  }
  (void)o;
  return unsupported();
}

static bool contains(const Value& container, const Value& item) {
  switch (container.kind) {
    case Kind::kUndefined: return false;
    case Kind::kString:
      if (!item.is_string())
        fail("TypeError: 'in <string>' requires string as left operand, not " + type_name(item));
      return container.s.find(item.s) != std::string::npos;
    case Kind::kList:
      for (const auto& v : container.items())
        if (equal(v, item)) return true;
      return false;
    case Kind::kDict:
      if ((item.kind == Kind::kList && !item.flag) || item.kind == Kind::kDict)
        fail("TypeError: unhashable type: '" + type_name(item) + "'");
      return container.entries().find(item) != nullptr;
    case Kind::kIterator: {
      auto* it = static_cast<IteratorObj*>(container.obj.get());
      Value v;
      while (it->next(v))
        if (equal(v, item)) return true;
      return false;
    }
    default: fail("TypeError: argument of type '" + type_name(container) + "' is not iterable");
  }
}

bool Renderer::eval_compare(const std::string& op, const Value& a, const Value& b) {
  if (op == "==") return equal(a, b);
  if (op == "!=") return !equal(a, b);
  if (op == "<") return less(a, b, "<");
  if (op == ">") return less(b, a, ">");
  if (op == "<=") return less(a, b, "<=") || equal(a, b);
  if (op == ">=") return less(b, a, ">=") || equal(a, b);
  if (op == "in") return contains(b, a);
  if (op == "notin") return !contains(b, a);
  fail("internal: unknown comparison " + op);
}

// eval() recurses once per nesting level of an expression: it and eval_node() keep small frames
// (every case with locals lives in its own non-inlined function), so the depth limit bounds the
// stack even in sanitizer builds.
Value Renderer::eval(const Node& n, Scope* s) {
  EvalDepth guard(eval_depth_, n.line);
  try {
    return eval_node(n, s);
  } catch (Error& e) {
    if (e.line == 0) e.line = n.line;
    throw;
  }
}

Value Renderer::eval_node(const Node& n, Scope* s) {
  switch (n.kind) {
    case NodeKind::kConst: return n.value;
    case NodeKind::kName: return lookup(n.name, s);
    case NodeKind::kListLit:
    case NodeKind::kTupleLit:
    case NodeKind::kDictLit: return eval_literal(n, s);
    case NodeKind::kGetattr: return getattr(eval(*n.a, s), n.name);
    case NodeKind::kGetitem: return eval_getitem(n, s);
    case NodeKind::kSlice: fail("internal: slice outside subscript");
    case NodeKind::kCall:
    case NodeKind::kFilter:
    case NodeKind::kTest: return eval_call(n, s);
    case NodeKind::kNot: return Value::boolean(!truthy(eval(*n.a, s)));
    case NodeKind::kNeg:
    case NodeKind::kPos: return eval_unary(n, s);
    case NodeKind::kBinary: return eval_binop(n, s);
    case NodeKind::kConcat:
    case NodeKind::kCompare: return eval_chain(n, s);
    case NodeKind::kAnd:
    case NodeKind::kOr:
    case NodeKind::kCondExpr: return eval_logic(n, s);
    default: fail("internal: statement node in expression position");
  }
}

[[gnu::noinline]] Value Renderer::eval_literal(const Node& n, Scope* s) {
  if (n.kind == NodeKind::kDictLit) {
    DictData d;
    for (size_t k = 0; k + 1 < n.children.size(); k += 2) {
      Value key = eval(*n.children[k], s);
      if ((key.kind == Kind::kList && !key.flag) || key.kind == Kind::kDict)
        fail("TypeError: unhashable type: '" + type_name(key) + "'");
      d.set(std::move(key), eval(*n.children[k + 1], s));
    }
    return Value::make_dict(std::move(d));
  }
  ValueList items;
  items.reserve(n.children.size());
  for (const auto& c : n.children) items.push_back(eval(*c, s));
  return Value::make_list(std::move(items), n.kind == NodeKind::kTupleLit);
}

[[gnu::noinline]] Value Renderer::eval_getitem(const Node& n, Scope* s) {
  Value obj = eval(*n.a, s);
  if (n.b->kind != NodeKind::kSlice) return getitem(obj, eval(*n.b, s));
  const Node& sl = *n.b;
  Value start = sl.a ? eval(*sl.a, s) : Value::none();
  Value stop = sl.b ? eval(*sl.b, s) : Value::none();
  Value step = sl.c ? eval(*sl.c, s) : Value::none();
  if (obj.is_undefined()) fail_undefined(obj);
  if (const_mode_) {
    // jinja2's compile-time evaluation (as_const) subscripts through the sandbox's getitem: a
    // failed slice is an undefined there, not an error.
    try {
      return slice_value(obj, start, stop, step);
    } catch (const Error&) {
      return Value::undefined_attr(obj, Value::string("slice"));
    }
  }
  return slice_value(obj, start, stop, step);
}

[[gnu::noinline]] Value Renderer::eval_call(const Node& n, Scope* s) {
  if (n.kind == NodeKind::kCall) {
    if (const_mode_) throw Impossible{};
    Value callee = eval(*n.a, s);
    CallArgs args;
    build_args(n, s, args);
    return call_value(callee, args, n.line);
  }
  if (n.kind == NodeKind::kFilter) {
    if (const_mode_ && (!n.a || n.name == "map" || n.name == "select" || n.name == "reject" ||
                        n.name == "selectattr" || n.name == "rejectattr" || !find_filter(n.name)))
      throw Impossible{};  // unknown, or takes the render context
    Value input = n.a ? eval(*n.a, s) : Value::undefined();
    CallArgs args;
    build_args(n, s, args);
    return apply_filter(n.name, input, args, n.line);
  }
  if (const_mode_ && !find_test(n.name)) throw Impossible{};
  Value input = eval(*n.a, s);
  CallArgs args;
  build_args(n, s, args);
  return Value::boolean(apply_test(n.name, input, args, n.line));
}

[[gnu::noinline]] Value Renderer::eval_unary(const Node& n, Scope* s) {
  Value v = eval(*n.a, s);
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_number())
    fail(std::string("TypeError: bad operand type for unary ") + (n.kind == NodeKind::kNeg ? "-" : "+") + ": '" +
         type_name(v) + "'");
  if (n.kind == NodeKind::kPos) return v.kind == Kind::kBool ? Value::integer(v.as_int()) : v;
  if (v.kind == Kind::kFloat) return Value::real(-v.f);
  if (v.as_int() == INT64_MIN) fail("OverflowError: integer result out of range");
  return Value::integer(-v.as_int());
}

[[gnu::noinline]] Value Renderer::eval_binop(const Node& n, Scope* s) {
  Value a = eval(*n.a, s);
  Value b = eval(*n.b, s);
  return eval_binary(n.name, a, b);
}

[[gnu::noinline]] Value Renderer::eval_chain(const Node& n, Scope* s) {
  if (n.kind == NodeKind::kConcat) {
    std::string r;
    for (const auto& c : n.children) {
      Value v = eval(*c, s);
      size_t before = r.size();
      if (v.is_string()) r += v.s;
      else r += to_str(v);
      check_output(r.size(), r.size() - before);
    }
    return Value::string(std::move(r));
  }
  Value left = eval(*n.a, s);
  for (size_t k = 0; k < n.ops.size(); ++k) {
    Value right = eval(*n.children[k], s);
    if (!eval_compare(n.ops[k], left, right)) return Value::boolean(false);
    left = std::move(right);
  }
  return Value::boolean(true);
}

[[gnu::noinline]] Value Renderer::eval_logic(const Node& n, Scope* s) {
  if (n.kind == NodeKind::kCondExpr) {
    if (truthy(eval(*n.b, s))) return eval(*n.a, s);
    if (n.c) return eval(*n.c, s);
    return Value::undefined("", "the inline if-expression on line " + std::to_string(n.line) +
                                    " evaluated to false and no else section was defined.");
  }
  Value a = eval(*n.a, s);
  if ((n.kind == NodeKind::kAnd) != truthy(a)) return a;
  return eval(*n.b, s);
}

// Python's has_safe_repr: what jinja2's optimizer may bake into the compiled template.
static bool safe_repr(const Value& v) {
  switch (v.kind) {
    case Kind::kNone:
    case Kind::kBool:
    case Kind::kInt:
    case Kind::kFloat:
    case Kind::kString: return true;
    case Kind::kList: {
      if (const SeqTag* t = seq_tag(v)) return t->type == SeqTag::kRange;
      for (const auto& e : v.items())
        if (!safe_repr(e)) return false;
      return true;
    }
    case Kind::kDict:
      for (const auto& kv : v.entries().items)
        if (!safe_repr(kv.first) || !safe_repr(kv.second)) return false;
      return true;
    default: return false;
  }
}

static bool is_expression(NodeKind k) {
  switch (k) {
    case NodeKind::kConst:
    case NodeKind::kName:
    case NodeKind::kSlice: return false;  // nothing to fold / folded only inside a subscript
    case NodeKind::kListLit:
    case NodeKind::kTupleLit:
    case NodeKind::kDictLit:
    case NodeKind::kGetattr:
    case NodeKind::kGetitem:
    case NodeKind::kCall:
    case NodeKind::kFilter:
    case NodeKind::kTest:
    case NodeKind::kNot:
    case NodeKind::kNeg:
    case NodeKind::kPos:
    case NodeKind::kBinary:
    case NodeKind::kConcat:
    case NodeKind::kCompare:
    case NodeKind::kAnd:
    case NodeKind::kOr:
    case NodeKind::kCondExpr: return true;
    default: return false;
  }
}

// Whether evaluating `n` at compile time could succeed: a cheap static check that saves throwing
// Impossible for every expression that mentions a variable.
static bool maybe_const(const Node* n) {
  if (!n) return true;
  switch (n->kind) {
    case NodeKind::kConst: return true;
    case NodeKind::kName:
    case NodeKind::kCall: return false;
    case NodeKind::kCondExpr: return maybe_const(n->b.get());  // the test decides which branch runs
    case NodeKind::kAnd:
    case NodeKind::kOr: return maybe_const(n->a.get());
    case NodeKind::kFilter:
      if (!n->a || n->name == "map" || n->name == "select" || n->name == "reject" || n->name == "selectattr" ||
          n->name == "rejectattr")
        return false;
      break;
    default: break;
  }
  if (n->dyn_args || n->dyn_kwargs) return false;
  if (!maybe_const(n->a.get()) || !maybe_const(n->b.get()) || !maybe_const(n->c.get())) return false;
  for (const auto& c : n->children)
    if (!maybe_const(c.get())) return false;
  for (const auto& kv : n->kwargs)
    if (!maybe_const(kv.second.get())) return false;
  return true;
}

void Renderer::fold(NodePtr& n, Scope* scope) {
  if (!n) return;
  fold(n->a, scope);
  fold(n->b, scope);
  fold(n->c, scope);
  fold(n->dyn_args, scope);
  fold(n->dyn_kwargs, scope);
  if (n->kind != NodeKind::kMacro && n->kind != NodeKind::kCallBlock)
    for (auto& c : n->children) fold(c, scope);
  else
    for (auto& c : n->children) fold(c->a, scope);  // parameter defaults
  for (auto& kv : n->kwargs) fold(kv.second, scope);
  for (auto& c : n->body) fold(c, scope);
  for (auto& c : n->orelse) fold(c, scope);
  if (n->kind == NodeKind::kOutput && n->a && n->a->kind != NodeKind::kConst && maybe_const(n->a.get())) {
    // {{ expr }}: jinja2 bakes str(expr.as_const()) into the template whatever its type.
    try {
      Value v = eval(*n->a, scope);
      auto c = std::make_unique<Node>(NodeKind::kConst, n->a->line);
      c->value = Value::string(to_str(v));
      n->a = std::move(c);
    } catch (const Impossible&) {
    } catch (const Error&) {
    }
    return;
  }
  if (!is_expression(n->kind)) return;
  if (n->kind == NodeKind::kFilter && !n->a) return;  // a filter block's chain has no input
  if (!maybe_const(n.get())) return;
  try {
    Value v = eval(*n, scope);
    if (!safe_repr(v)) return;
    auto c = std::make_unique<Node>(NodeKind::kConst, n->line);
    c->value = std::move(v);
    n = std::move(c);
  } catch (const Impossible&) {
  } catch (const Error&) {
  }
}

void fold_constants(std::vector<NodePtr>& body) {
  // jinja2's optimizer (always on) evaluates constant expressions at compile time, where a slice
  // goes through the sandbox's getitem; folding here keeps that behaviour (and saves work).
  // Small limits: folding gives up on big constant work and leaves it to the render's own limits.
  RenderLimits limits;
  limits.max_output_bytes = 1 << 20;
  limits.max_work = 16u << 20;
  Renderer r(Value::make_dict(DictData()), limits);
  r.const_mode_ = true;
  WorkBudget budget;
  budget.limit = limits.max_work;
  set_work_budget(&budget);
  Scope* root = r.new_scope(nullptr);
  try {
    for (auto& n : body) r.fold(n, root);
  } catch (...) {
    set_work_budget(nullptr);
    throw;
  }
  set_work_budget(nullptr);
}

}  // namespace kiln::chat::jinja
