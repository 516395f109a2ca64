// kiln tokenize TOKENIZER TEXT [--add_special_tokens]   -> [1,2,3]
// kiln tokenize TOKENIZER --jsonl FILE                   one JSON string per line in, one JSON id
//                                                        list per line out (FILE '-' = stdin); a
//                                                        line may also be a list of byte values
//                                                        [104,255] for text that is not UTF-8
// kiln tokenize TOKENIZER --bench FILE [--repeat N]      encode FILE line by line ('\n' kept) on one
//                                                        thread, print {"mb_per_s", "mb_per_cpu_s", ...}
//                                                        (best of N; tools/tokenizer_bench.py)
// kiln detokenize TOKENIZER 1,2,3 [--skip_special_tokens] -> the text, exactly, no newline added
// kiln detokenize TOKENIZER --jsonl FILE [--stream]      one JSON id list per line in, one JSON
//                                                        string out (--stream: the list of pieces
//                                                        IncrementalDecoder emits, one per id + flush)
// TOKENIZER is a directory (tokenizer.json + configs), a tokenizer.json file or a .gguf file.
#include <chrono>
#include <ctime>
#include <climits>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/cli.h"
#include "core/file.h"
#include "tokenizer/tokenizer.h"

namespace kiln::cli {
namespace {

using json = nlohmann::json;

struct TokenizeArgs {
  std::string tokenizer, text, jsonl, bench;
  bool add_special_tokens = false, text_given = false;
  int repeat = 1;
};

struct DetokenizeArgs {
  std::string tokenizer, ids, jsonl;
  bool skip_special_tokens = false, stream = false;
};

std::string ids_json(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  s += ']';
  return s;
}

std::string str_json(const std::string& s) { return json(s).dump(-1, ' ', false, json::error_handler_t::replace); }

Result<std::shared_ptr<const Tokenizer>> load(const std::string& path) {
  if (path.empty()) return Status::error("give a TOKENIZER (a directory, a tokenizer.json or a .gguf)");
  return Tokenizer::load(path);
}

// Lines of FILE ('-' = stdin), each handed to fn(line, line_no); stops at the first error.
template <class Fn>
Status for_each_line(const std::string& file, Fn fn) {
  std::ifstream f;
  std::istream* in = &std::cin;
  if (file != "-") {
    f.open(file, std::ios::binary);
    if (!f) return Status::error(file + ": cannot open");
    in = &f;
  }
  std::string line;
  size_t no = 0;
  while (std::getline(*in, line)) {
    ++no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    KILN_RETURN_IF_ERROR(fn(line, no));
  }
  return Status::ok();
}

int run_tokenize(const TokenizeArgs& a) {
  auto tok = load(a.tokenizer);
  if (!tok) return fail("tokenize", tok.message());
  const Tokenizer& t = **tok;
  if (!a.bench.empty()) {
    auto text = read_file(a.bench);
    if (!text) return fail("tokenize", text.message());
    // Lines keep their '\n', as Python's `for line in file` does (the bench script does the same).
    std::vector<std::string_view> lines;
    const std::string& s = *text;
    for (size_t pos = 0; pos < s.size();) {
      size_t e = s.find('\n', pos);
      e = e == std::string::npos ? s.size() : e + 1;
      lines.emplace_back(s.data() + pos, e - pos);
      pos = e;
    }
    size_t tokens = 0;
    double best = 1e30, best_cpu = 1e30;
    for (int r = 0; r < std::max(1, a.repeat); ++r) {
      auto t0 = std::chrono::steady_clock::now();
      std::clock_t c0 = std::clock();
      size_t n = 0;
      for (auto line : lines) n += t.encode(line, a.add_special_tokens).size();
      double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      // CPU time as well: on a shared machine wall time measures the neighbours too.
      double cpu = double(std::clock() - c0) / CLOCKS_PER_SEC;
      best = std::min(best, sec);
      best_cpu = std::min(best_cpu, cpu);
      tokens = n;
    }
    json out = {{"bytes", s.size()}, {"lines", lines.size()}, {"tokens", tokens}, {"seconds", best},
                {"cpu_seconds", best_cpu}, {"mb_per_s", s.size() / 1e6 / best},
                {"mb_per_cpu_s", s.size() / 1e6 / best_cpu}, {"threads", 1}};
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  if (!a.jsonl.empty()) {
    Status st = for_each_line(a.jsonl, [&](const std::string& line, size_t no) -> Status {
      json j = json::parse(line, nullptr, false);
      std::string where = a.jsonl + ":" + std::to_string(no);
      std::string text;
      if (!j.is_discarded() && j.is_string()) {
        text = j.get<std::string>();
      } else if (!j.is_discarded() && j.is_array()) {  // raw bytes (JSON strings cannot hold invalid UTF-8)
        for (const auto& b : j) {
          if (!b.is_number_integer() || b.get<int64_t>() < 0 || b.get<int64_t>() > 255)
            return Status::error(where + ": a list must hold byte values 0..255");
          text += static_cast<char>(b.get<int>());
        }
      } else {
        return Status::error(where + ": not a JSON string or a list of byte values");
      }
      std::string out = ids_json(t.encode(text, a.add_special_tokens));
      out += '\n';
      std::fwrite(out.data(), 1, out.size(), stdout);
      return Status::ok();
    });
    if (!st) return fail("tokenize", st.message());
    return 0;
  }
  if (!a.text_given) return fail("tokenize", "give TEXT, --jsonl FILE or --bench FILE");
  std::printf("%s\n", ids_json(t.encode(a.text, a.add_special_tokens)).c_str());
  return 0;
}

Result<std::vector<int32_t>> parse_id_list(const std::string& s) {
  std::vector<int32_t> ids;
  std::string item;
  auto flush = [&]() -> Status {
    if (item.empty()) return Status::ok();
    size_t pos = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &pos);
    } catch (...) {
      pos = 0;
    }
    if (pos == 0 || pos != item.size() || v < 0 || v > INT32_MAX) return Status::error("'" + item + "' is not a token id");
    ids.push_back(static_cast<int32_t>(v));
    item.clear();
    return Status::ok();
  };
  for (char c : s) {
    if (c == ',' || c == ' ' || c == '[' || c == ']' || c == '\n' || c == '\t') {
      KILN_RETURN_IF_ERROR(flush());
    } else {
      item += c;
    }
  }
  KILN_RETURN_IF_ERROR(flush());
  return ids;
}

int run_detokenize(const DetokenizeArgs& a) {
  auto tok = load(a.tokenizer);
  if (!tok) return fail("detokenize", tok.message());
  if (!a.jsonl.empty()) {
    Status st = for_each_line(a.jsonl, [&](const std::string& line, size_t no) -> Status {
      json j = json::parse(line, nullptr, false);
      std::string where = a.jsonl + ":" + std::to_string(no);
      if (j.is_discarded() || !j.is_array()) return Status::error(where + ": not a JSON list of ids");
      std::vector<int32_t> ids;
      for (const auto& x : j) {
        if (!x.is_number_integer()) return Status::error(where + ": not a JSON list of ids");
        int64_t v = x.get<int64_t>();
        ids.push_back(v < INT32_MIN || v > INT32_MAX ? -1 : static_cast<int32_t>(v));
      }
      std::string out;
      if (a.stream) {
        IncrementalDecoder dec(*tok, a.skip_special_tokens);
        json pieces = json::array();
        for (int32_t id : ids) pieces.push_back(dec.push(id));
        pieces.push_back(dec.flush());
        out = pieces.dump(-1, ' ', false, json::error_handler_t::replace);
      } else {
        out = str_json((*tok)->decode(ids, a.skip_special_tokens));
      }
      out += '\n';
      std::fwrite(out.data(), 1, out.size(), stdout);
      return Status::ok();
    });
    if (!st) return fail("detokenize", st.message());
    return 0;
  }
  auto ids = parse_id_list(a.ids);
  if (!ids) return fail("detokenize", ids.message());
  std::string text = (*tok)->decode(*ids, a.skip_special_tokens);
  std::fwrite(text.data(), 1, text.size(), stdout);
  return 0;
}

}  // namespace
}  // namespace kiln::cli

KILN_VERB(tokenize) {
  static kiln::cli::TokenizeArgs a;
  auto* cmd = app.add_subcommand("tokenize", "Print the token ids of a text as JSON");
  cmd->add_option("TOKENIZER", a.tokenizer, "tokenizer directory, tokenizer.json or .gguf")->required();
  cmd->add_option("TEXT", a.text, "text to encode")->each([](const std::string&) { a.text_given = true; });
  kiln::cli::add_switch(*cmd, "add_special_tokens", a.add_special_tokens, "apply the post-processor (BOS etc.)");
  kiln::cli::add_flag(*cmd, "jsonl", a.jsonl, "encode FILE ('-' = stdin): one JSON string per line -> one JSON id list per line");
  kiln::cli::add_flag(*cmd, "bench", a.bench, "encode FILE line by line on one thread and print the throughput as JSON");
  kiln::cli::add_flag(*cmd, "repeat", a.repeat, "--bench: passes over the file (the best is reported)");
  cmd->callback([] {
    if (int rc = kiln::cli::run_tokenize(a)) throw CLI::RuntimeError(rc);
  });
}

KILN_VERB(detokenize) {
  static kiln::cli::DetokenizeArgs a;
  auto* cmd = app.add_subcommand("detokenize", "Print the text of token ids (1,2,3) exactly, without a newline");
  cmd->add_option("TOKENIZER", a.tokenizer, "tokenizer directory, tokenizer.json or .gguf")->required();
  cmd->add_option("IDS", a.ids, "token ids: 1,2,3 or [1, 2, 3]");
  kiln::cli::add_switch(*cmd, "skip_special_tokens", a.skip_special_tokens, "leave special tokens out");
  kiln::cli::add_flag(*cmd, "jsonl", a.jsonl, "decode FILE ('-' = stdin): one JSON id list per line -> one JSON string per line");
  kiln::cli::add_switch(*cmd, "stream", a.stream, "--jsonl: print the pieces of incremental decoding as a JSON list");
  cmd->callback([] {
    if (int rc = kiln::cli::run_detokenize(a)) throw CLI::RuntimeError(rc);
  });
}
