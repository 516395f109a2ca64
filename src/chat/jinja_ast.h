// Jinja AST: one node type for expressions and statements, built by the parser
// (jinja_parser.cpp) and walked by the renderer (jinja_render.cpp). Immutable after parsing, so a
// parsed template is shared by concurrent renders.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "chat/jinja_value.h"

namespace kiln::chat::jinja {

enum class NodeKind : uint8_t {
  // expressions
  kConst,      // value
  kName,       // name
  kListLit,    // children
  kTupleLit,   // children
  kDictLit,    // children: k0, v0, k1, v1, ...
  kGetattr,    // a . name
  kGetitem,    // a [ b ]
  kSlice,      // children: start, stop, step (null entries allowed)
  kCall,       // a ( args, kwargs )
  kFilter,     // a | name ( args, kwargs ); a null for filter blocks
  kTest,       // a is name ( args, kwargs )
  kNot,        // not a
  kNeg,        // - a
  kPos,        // + a
  kBinary,     // a op b  (op in name: + - * / // % **)
  kConcat,     // a ~ b
  kCompare,    // a op1 c0 op2 c1 ... (ops in `ops`, operands in children)
  kAnd,        // a and b
  kOr,         // a or b
  kCondExpr,   // a if b else c  (c may be null)
  // statements
  kData,       // name: literal template text
  kOutput,     // {{ a }}
  kIf,         // a: condition, body, orelse (elif becomes a nested kIf in orelse)
  kFor,        // target, a: iterable, b: filter condition, body, orelse, flag: recursive
  kSet,        // target = a
  kSetBlock,   // target, body, filters (children: chain of kFilter with null base)
  kMacro,      // name, params (children: kName with optional default in a), body
  kCallBlock,  // a: the call expression, params (children) for caller(...), body
  kFilterBlock,  // children: filter chain, body
  kWith,       // targets (children kSet), body
  kBreak,
  kContinue,
  kGeneration,  // {% generation %}: renders its body (transformers' AssistantTracker)
};

struct Node;
using NodePtr = std::unique_ptr<Node>;

struct Node {
  NodeKind kind;
  int line = 0;
  std::string name;
  Value value;
  NodePtr a, b, c;
  NodePtr target;
  std::vector<NodePtr> children;                       // positional args, items, params, ...
  std::vector<std::pair<std::string, NodePtr>> kwargs;  // keyword arguments
  NodePtr dyn_args, dyn_kwargs;                        // *args, **kwargs in calls
  std::vector<std::string> ops;                        // compare operators
  std::vector<NodePtr> body, orelse;
  bool flag = false;
  // kMacro / kCallBlock: whether the body mentions varargs / kwargs / caller.
  bool uses_varargs = false, uses_kwargs = false, uses_caller = false;
  Node(NodeKind k, int l) : kind(k), line(l) {}
};

// Parses a whole template. Throws Error with the line of the problem.
std::vector<NodePtr> parse_template(const std::string& source);

bool filter_exists(const std::string& name);
bool test_exists(const std::string& name);

}  // namespace kiln::chat::jinja
