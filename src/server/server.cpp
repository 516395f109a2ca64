// Routes of `kiln serve` and the life of one generation request. See server.h.
//
// A request becomes a Job: one engine request per choice (n per prompt). Engine events arrive on
// the engine thread and are only posted to the connection's strand; there the Job detokenizes
// (one IncrementalDecoder per choice), looks for stop strings, and writes SSE chunks or gathers
// the final response. A stop string or a departed client cancels the engine requests at once.
#include "server/server.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <random>

#include "core/log.h"
#include "server/chat_page.h"

namespace kiln::server {

namespace {

using Clock = std::chrono::steady_clock;

uint64_t random_u64() {
  thread_local std::mt19937_64 rng{(uint64_t(std::random_device{}()) << 32) ^ std::random_device{}()};
  return rng();
}

std::string random_id(const char* prefix) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", (unsigned long long)random_u64(), (unsigned long long)random_u64());
  return std::string(prefix) + buf;
}

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

void send_json(ResponseWriter& w, int status, const Json& j, HeaderList headers = {}) {
  w.send(status, "application/json", dump_json(j), std::move(headers));
}

void send_error(ResponseWriter& w, const ApiError& e, HeaderList headers = {}) {
  send_json(w, e.status, e.to_json(), std::move(headers));
}

ApiError server_error(int status, std::string message) {
  ApiError e;
  e.status = status;
  e.message = std::move(message);
  e.type = "server_error";
  return e;
}

const char* finish_name(FinishReason f) {
  switch (f) {
    case FinishReason::kNone: return "";
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kCancelled: return "abort";
    case FinishReason::kError: return "error";
  }
  return "";
}

LogField log_int(const char* key, int64_t v) { return LogField{key, std::to_string(v), false}; }

LogField log_ms(const char* key, double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", ms);
  return LogField{key, buf, false};
}

std::string json_ids(const std::vector<int32_t>& ids) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) out += (i ? "," : "") + std::to_string(ids[i]);
  return out + "]";
}

}  // namespace

// Everything a request needs from the loaded model. Jobs hold it, so it outlives them.
struct BackendState {
  std::unique_ptr<Engine> engine;
  std::shared_ptr<const Tokenizer> tok;
  std::optional<chat::Template> tmpl;
  int32_t max_model_len = 0;
  ApiLimits limits;
};

struct Server::Impl {
  explicit Impl(ServerOptions o) : opt(std::move(o)), http(opt.http) {}

  ServerOptions opt;
  HttpServer http;
  Metrics metrics;
  int64_t created = unix_now();
  std::string fingerprint = std::string("kiln-") + KILN_VERSION;

  mutable std::mutex mu;
  std::shared_ptr<BackendState> backend;
  bool shut_down = false;

  std::shared_ptr<BackendState> get() const {
    std::lock_guard<std::mutex> lock(mu);
    return backend;
  }

  // The backend, or a 503 written to `w` while the model loads.
  std::shared_ptr<BackendState> ready_or_503(ResponseWriter& w) const {
    auto be = get();
    if (!be) send_error(w, server_error(503, "the model is still loading; retry shortly"), {{"Retry-After", "1"}});
    return be;
  }

  std::optional<ApiError> check_model(const std::string& model) const {
    if (model.empty() || model == opt.served_model_name) return {};
    return api_not_found("The model `" + model + "` does not exist.", "model_not_found");
  }

  Json model_card(const BackendState& be) const {
    return Json{{"id", opt.served_model_name}, {"object", "model"},      {"created", created},
                {"owned_by", "kiln"},          {"root", opt.model_path}, {"parent", nullptr},
                {"max_model_len", be.max_model_len}, {"vocab_size", be.limits.vocab_size}};
  }

  void add_routes();
  void handle_completions(const HttpRequest& r, std::shared_ptr<ResponseWriter> w);
  void handle_chat(const HttpRequest& r, std::shared_ptr<ResponseWriter> w);
  void handle_tokenize(const HttpRequest& r, std::shared_ptr<ResponseWriter> w);
  void handle_detokenize(const HttpRequest& r, std::shared_ptr<ResponseWriter> w);
};

namespace {

// One line per request; the hot path only gathered the fields, the formatting happens here once.
void log_request(RequestRecord&& r) {
  std::vector<LogField> f;
  f.reserve(r.fields.size() + 7);
  f.push_back(LogField{"id", std::move(r.id)});
  f.push_back(LogField{"method", std::move(r.method)});
  f.push_back(LogField{"route", std::move(r.path)});
  f.push_back(log_int("status", r.status));
  if (r.client_gone) f.push_back(LogField{"client_gone", "true", false});
  // Token counts and TTFT before the total (the order of the plain line); prompt/output last.
  size_t content = r.fields.size();
  for (size_t i = 0; i < r.fields.size(); ++i)
    if (r.fields[i].key == "prompt" || r.fields[i].key == "output") {
      content = i;
      break;
    }
  for (size_t i = 0; i < content; ++i) f.push_back(std::move(r.fields[i]));
  f.push_back(log_ms("total_ms", r.total_ms));
  for (size_t i = content; i < r.fields.size(); ++i) f.push_back(std::move(r.fields[i]));
  log_event(LogLevel::kInfo, "request", f);
}

// Renders messages with the chat template. continue_final_message leaves the last (assistant)
// message open: the text is cut right after its content, as vLLM does.
Result<std::string> render_chat(const BackendState& be, const Json& messages, const Json& tools,
                                bool add_generation_prompt, bool continue_final_message, const Json& kwargs) {
  if (!be.tmpl)
    return Status::error("this model has no chat template; start kiln serve with --chat_template FILE");
  auto text = be.tmpl->apply(messages, tools, add_generation_prompt, be.tok->bos_token(), be.tok->eos_token(), kwargs);
  if (!text) return Status::error("chat template: " + text.message());
  if (continue_final_message) {
    const Json& last = messages.back();
    const Json* content = last.contains("content") ? &last["content"] : nullptr;
    std::string tail;
    if (content && content->is_string()) tail = content->get<std::string>();
    if (content && content->is_array() && !content->empty() && content->back().contains("text"))
      tail = content->back()["text"].get<std::string>();
    size_t pos = tail.empty() ? std::string::npos : text->rfind(tail);
    if (pos == std::string::npos)
      return Status::error("continue_final_message: the final message's content was not found in the rendered prompt");
    return text->substr(0, pos + tail.size());
  }
  return text;
}

struct Choice {
  int32_t index = 0;
  size_t prompt_idx = 0;
  uint64_t seed = 0;
  uint64_t engine_id = 0;
  bool submitted = false;
  bool done = false;
  std::unique_ptr<IncrementalDecoder> dec;
  std::string echo;              // completions with echo: the prompt's text
  // echo + logprobs: the prompt's logprobs are still to come (the first event brings them), and
  // when streaming the echoed text waits for them so both go out in one chunk.
  bool prompt_lps_pending = false;
  bool echo_unsent = false;
  std::string text;              // generated text (cut at a stop string)
  size_t sent = 0;               // bytes of `text` already streamed
  size_t stop_scan_from = 0;     // bytes of `text` that cannot start a stop string any more
  std::vector<LogprobItem> lps;
  size_t lps_sent = 0;
  int64_t lp_offset = 0;         // completions text_offset of lps[lps_sent]
  int64_t num_tokens = 0;
  int32_t cached_tokens = 0;
  std::string finish;
  bool got_first = false;
  Clock::time_point last_token;
};

class Job : public std::enable_shared_from_this<Job> {
 public:
  Job(Server::Impl* srv, std::shared_ptr<BackendState> be, std::shared_ptr<ResponseWriter> w, bool chat)
      : srv_(srv), be_(std::move(be)), w_(std::move(w)), chat_(chat), arrival_(Clock::now()) {}

  GenerationOptions gen;
  std::vector<int32_t> max_tokens;  // per prompt
  ResponseMeta meta;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> echoes;  // per prompt, completions with echo
  bool echo_logprobs = false;       // completions with echo and logprobs: prompt logprobs first
  std::vector<Choice> choices;
  // Per prompt, as a JSON literal (text or token ids); only filled with --log_requests.
  std::vector<std::string> prompt_log;

  // Builds the choices, submits them to the engine, and starts the response. On failure nothing
  // stays queued and the error is returned (nothing written yet).
  std::optional<ApiError> start() {
    const int32_t n = gen.n;
    choices.resize(prompts.size() * size_t(n));
    for (size_t p = 0; p < prompts.size(); ++p)
      for (int32_t i = 0; i < n; ++i) {
        Choice& c = choices[p * size_t(n) + size_t(i)];
        c.index = int32_t(p * size_t(n) + size_t(i));
        c.prompt_idx = p;
        c.seed = gen.seed ? *gen.seed + uint64_t(i) : random_u64();
        c.dec = std::make_unique<IncrementalDecoder>(be_->tok, gen.skip_special_tokens);
        // A few prompt ids as context, so a Metaspace tokenizer keeps the first word's space.
        const auto& ids = prompts[p];
        size_t k = std::min<size_t>(ids.size(), 6);
        c.dec->set_prefix(std::span<const int32_t>(ids.data() + ids.size() - k, k));
        if (p < echoes.size()) {
          c.echo = echoes[p];
          // text_offset runs over the echoed prompt tokens first when they are listed.
          c.lp_offset = echo_logprobs ? 0 : utf8_length(c.echo);
          c.prompt_lps_pending = c.echo_unsent = echo_logprobs;
        }
      }
    for (const std::string& s : gen.stop) max_stop_len_ = std::max(max_stop_len_, s.size());

    Engine& engine = *be_->engine;
    EngineStats st = engine.stats();
    const int32_t queue_limit = engine.limits().max_queue;
    if (queue_limit > 0 && int64_t(st.num_waiting) + int64_t(choices.size()) > queue_limit)
      return server_error(503, "the server is overloaded: " + std::to_string(st.num_waiting) +
                                   " requests are waiting (limit " + std::to_string(queue_limit) + "); retry later");
    for (size_t ci = 0; ci < choices.size(); ++ci) {
      Choice& c = choices[ci];
      EngineRequest er;
      er.prompt = prompts[c.prompt_idx];
      er.sampling = gen.sampling;
      er.sampling.seed = c.seed;
      er.sampling.logprobs = gen.logprobs;
      // Every choice computes them (each is its own engine request); they are equal across the n.
      er.prompt_logprobs = echo_logprobs ? gen.logprobs : -1;
      er.max_tokens = max_tokens[c.prompt_idx];
      er.min_tokens = gen.min_tokens;
      er.ignore_eos = gen.ignore_eos;
      er.stop_token_ids = gen.stop_token_ids;
      // Runs on the engine thread: only hop to the connection's strand (never block there).
      er.on_event = [self = shared_from_this(), ci](const TokenEvent& ev) {
        self->w_->post([self, ci, ev] { self->on_event(ci, ev); });
      };
      auto id = engine.submit(std::move(er));
      if (!id) {
        cancel_submitted();
        const std::string& m = id.message();
        bool busy = m.find("queue") != std::string::npos || m.find("shut") != std::string::npos;
        return busy ? server_error(503, m) : api_bad_request(m);
      }
      c.engine_id = *id;
      c.submitted = true;
    }
    w_->on_disconnect([self = shared_from_this()] { self->client_gone(); });
    if (gen.stream) {
      w_->start_stream(200, "text/event-stream");
      for (Choice& c : choices) {
        ChoiceResult d;
        d.index = c.index;
        if (chat_) {
          write_event(chat_chunk(meta, d, /*role_chunk=*/true, gen.include_usage));
        } else if (!c.echo.empty() && !c.echo_unsent) {
          d.text = c.echo;
          write_event(completion_chunk(meta, d, gen.include_usage));
        }
      }
    }
    return {};
  }

 private:
  void write_event(const Json& j) { w_->write(sse_event(j)); }

  void cancel_submitted() {
    for (Choice& c : choices)
      if (c.submitted && !c.done) {
        be_->engine->cancel(c.engine_id);
        c.done = true;
      }
  }

  void client_gone() {
    if (finished_) return;
    finished_ = true;
    for (Choice& c : choices)
      if (!c.done) {
        be_->engine->cancel(c.engine_id);
        c.done = true;
        srv_->metrics.count_finish("abort");
      }
    srv_->metrics.add_generation_tokens(total_tokens());
    w_->set_log(meta.id, log_fields());
  }

  // The request log's fields, formatted once when the request ends.
  std::vector<LogField> log_fields() const {
    Usage u = usage();
    std::vector<LogField> f;
    f.push_back(log_int("prompt_tokens", u.prompt_tokens));
    f.push_back(log_int("generated_tokens", u.completion_tokens));
    f.push_back(log_int("cached_tokens", u.cached_tokens));
    if (any_token_) f.push_back(log_ms("ttft_ms", std::chrono::duration<double, std::milli>(first_token_ - arrival_).count()));
    std::string finish;
    for (const Choice& c : choices) finish += (finish.empty() ? "" : ",") + (c.finish.empty() ? std::string("abort") : c.finish);
    f.push_back(LogField{"finish", finish, true});
    f.push_back(log_int("n", int64_t(choices.size())));
    f.push_back(LogField{"stream", gen.stream ? "true" : "false", false});
    if (srv_->opt.log_content) {
      std::string prompt;
      if (prompt_log.size() == 1) {
        prompt = prompt_log[0];
      } else {
        prompt = "[";
        for (size_t i = 0; i < prompt_log.size(); ++i) prompt += (i ? "," : "") + prompt_log[i];
        prompt += "]";
      }
      f.push_back(LogField{"prompt", prompt, false});
      std::string output = "[";
      for (size_t i = 0; i < choices.size(); ++i) output += (i ? "," : "") + json_quote(choices[i].text);
      f.push_back(LogField{"output", output + "]", false});
    }
    return f;
  }

  int64_t total_tokens() const {
    int64_t n = 0;
    for (const Choice& c : choices) n += c.num_tokens;
    return n;
  }

  void on_event(size_t ci, const TokenEvent& ev) {
    if (finished_) return;
    Choice& c = choices[ci];
    if (c.done) return;  // stopped by a stop string; the engine's last events are moot
    if (ev.num_cached_tokens > 0) c.cached_tokens = ev.num_cached_tokens;
    if (c.prompt_lps_pending && ev.finish != FinishReason::kError && ev.finish != FinishReason::kCancelled) {
      add_prompt_logprobs(c, ev.prompt_logprobs);
      c.prompt_lps_pending = false;
    }
    if (!ev.tokens.empty()) {
      if (!any_token_) {
        any_token_ = true;
        first_token_ = Clock::now();
      }
      const double gap = c.got_first ? seconds_since(c.last_token) : seconds_since(arrival_);
      if (!c.got_first) srv_->metrics.observe_ttft(gap);
      else
        for (size_t k = 0; k < ev.tokens.size(); ++k) srv_->metrics.observe_inter_token(gap / double(ev.tokens.size()));
      c.got_first = true;
      c.last_token = Clock::now();
    }
    for (size_t k = 0; k < ev.tokens.size(); ++k) {
      const SampledToken& t = ev.tokens[k];
      ++c.num_tokens;
      // The EOS / stop token that ended the request is not part of the text (as vLLM).
      const bool ending_token = ev.finish == FinishReason::kStop && k + 1 == ev.tokens.size() &&
                                t.id == ev.matched_stop_token && !gen.include_stop_str_in_output;
      if (ending_token) continue;
      c.text += c.dec->push(t.id);
      if (gen.logprobs >= 0 && t.logprob) {
        LogprobItem item;
        item.token = be_->tok->decode(std::span<const int32_t>(&t.id, 1), false);
        item.logprob = t.logprob->logprob;
        for (const auto& [id, lp] : t.logprob->top)
          item.top.emplace_back(be_->tok->decode(std::span<const int32_t>(&id, 1), false), lp);
        c.lps.push_back(std::move(item));
      }
    }
    if (ev.finish != FinishReason::kNone) c.text += c.dec->flush();

    if (!gen.stop.empty()) {
      size_t stop_len = 0;
      size_t pos = find_stop(c.text, gen.stop, c.stop_scan_from, &stop_len);
      if (pos != std::string::npos) {
        c.text.resize(pos + (gen.include_stop_str_in_output ? stop_len : 0));
        c.finish = "stop";
        c.done = true;
        if (ev.finish == FinishReason::kNone) be_->engine->cancel(c.engine_id);
      } else {
        c.stop_scan_from = c.text.size() >= max_stop_len_ ? c.text.size() - max_stop_len_ + 1 : 0;
      }
    }
    if (!c.done && ev.finish != FinishReason::kNone) {
      c.done = true;
      c.finish = finish_name(ev.finish);
      if (ev.finish == FinishReason::kError) {
        error_ = ev.error.empty() ? "the engine failed this request" : ev.error;
        log_error("request " + meta.id + ": " + error_);
      }
    }
    if (c.done) srv_->metrics.count_finish(c.finish);
    if (!error_.empty()) return fail();
    if (gen.stream) stream_delta(c);
    for (const Choice& x : choices)
      if (!x.done) return;
    finish();
  }

  // The echoed prompt's entries, ahead of any generated token's: the first prompt token with a null
  // logprob, then each later one scored given those before it (entries[i] is prompt token i + 1).
  void add_prompt_logprobs(Choice& c, const std::vector<TokenLogprob>& entries) {
    const std::vector<int32_t>& ids = prompts[c.prompt_idx];
    auto piece = [&](int32_t id) { return be_->tok->decode(std::span<const int32_t>(&id, 1), false); };
    std::vector<LogprobItem> items;
    items.reserve(ids.size() + c.lps.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      LogprobItem item;
      item.token = piece(ids[i]);
      if (i == 0 || i - 1 >= entries.size()) {
        item.has_logprob = false;  // an entry missing (cannot happen) shows as null, never as a wrong number
      } else {
        const TokenLogprob& e = entries[i - 1];
        item.logprob = e.logprob;
        for (const auto& [id, lp] : e.top) item.top.emplace_back(piece(id), lp);
      }
      items.push_back(std::move(item));
    }
    items.insert(items.end(), std::make_move_iterator(c.lps.begin()), std::make_move_iterator(c.lps.end()));
    c.lps = std::move(items);
  }

  void stream_delta(Choice& c) {
    c.sent = std::min(c.sent, c.text.size());  // holdback keeps sent <= any stop's start; stay safe anyway
    size_t end = c.text.size();
    if (!c.done && !gen.stop.empty()) end -= std::min(end, stop_holdback(c.text, gen.stop));
    end = std::max(end, c.sent);
    ChoiceResult d;
    d.index = c.index;
    d.text = c.text.substr(c.sent, end - c.sent);
    c.sent = end;
    if (c.echo_unsent) {  // echo + logprobs: the prompt goes out with its logprobs, in the first chunk
      d.text = c.echo + d.text;
      c.echo_unsent = false;
    }
    if (gen.logprobs >= 0 && c.lps.size() > c.lps_sent) {
      d.has_logprobs = true;
      d.logprobs.assign(c.lps.begin() + std::ptrdiff_t(c.lps_sent), c.lps.end());
      d.text_offset0 = c.lp_offset;
      for (const LogprobItem& it : d.logprobs) c.lp_offset += utf8_length(token_display(it.token));
      c.lps_sent = c.lps.size();
    }
    if (!d.text.empty() || d.has_logprobs)
      write_event(chat_ ? chat_chunk(meta, d, false, gen.include_usage) : completion_chunk(meta, d, gen.include_usage));
    if (c.done) {
      ChoiceResult f;
      f.index = c.index;
      f.finish_reason = c.finish;
      write_event(chat_ ? chat_chunk(meta, f, false, gen.include_usage) : completion_chunk(meta, f, gen.include_usage));
    }
  }

  Usage usage() const {
    Usage u;
    for (size_t p = 0; p < prompts.size(); ++p) {
      u.prompt_tokens += int64_t(prompts[p].size());
      u.cached_tokens += choices[p * size_t(gen.n)].cached_tokens;
    }
    u.completion_tokens = total_tokens();
    return u;
  }

  void finish() {
    finished_ = true;
    srv_->metrics.observe_e2e(seconds_since(arrival_));
    Usage u = usage();
    srv_->metrics.add_prompt_tokens(u.prompt_tokens);
    srv_->metrics.add_generation_tokens(u.completion_tokens);
    w_->set_log(meta.id, log_fields());
    if (gen.stream) {
      std::string out;
      if (gen.include_usage) out += sse_event(usage_chunk(meta, chat_ ? "chat.completion.chunk" : "text_completion", u));
      out += "data: [DONE]\n\n";
      w_->write(std::move(out));
      w_->end_stream();
      return;
    }
    std::vector<ChoiceResult> results;
    results.reserve(choices.size());
    for (Choice& c : choices) {
      ChoiceResult r;
      r.index = c.index;
      r.text = c.echo + c.text;
      r.finish_reason = c.finish;
      r.has_logprobs = gen.logprobs >= 0;
      r.logprobs = std::move(c.lps);
      r.text_offset0 = echo_logprobs ? 0 : utf8_length(c.echo);
      results.push_back(std::move(r));
    }
    send_json(*w_, 200, chat_ ? chat_response(meta, results, u) : completion_response(meta, results, u));
  }

  // The engine failed a choice: cancel the rest, answer 500 (or an error event when streaming).
  void fail() {
    finished_ = true;
    cancel_submitted();
    ApiError e = server_error(500, error_);
    w_->set_log(meta.id, log_fields());
    if (gen.stream) {
      w_->write(sse_event(e.to_json()) + "data: [DONE]\n\n");
      w_->end_stream();
    } else {
      send_error(*w_, e);
    }
  }

  Server::Impl* srv_;
  std::shared_ptr<BackendState> be_;
  std::shared_ptr<ResponseWriter> w_;
  bool chat_;
  Clock::time_point arrival_;
  Clock::time_point first_token_;  // of any choice: the request's TTFT
  bool any_token_ = false;
  size_t max_stop_len_ = 0;
  bool finished_ = false;
  std::string error_;
};

// Context limit: the prompt leaves room for max_tokens (default: the rest of the context).
std::optional<ApiError> fit_context(const BackendState& be, size_t prompt_len, std::optional<int32_t> requested,
                                    int32_t default_max, const char* what, int32_t* max_tokens) {
  const int64_t limit = be.max_model_len;
  if (int64_t(prompt_len) >= limit) return context_length_error(limit, int64_t(prompt_len), 0, what);
  int64_t mt = requested ? *requested : (default_max > 0 ? default_max : limit - int64_t(prompt_len));
  if (int64_t(prompt_len) + mt > limit) {
    if (!requested && default_max > 0) mt = limit - int64_t(prompt_len);  // a default never errors
    else return context_length_error(limit, int64_t(prompt_len), mt, what);
  }
  *max_tokens = int32_t(mt);
  return {};
}

}  // namespace

void Server::Impl::handle_completions(const HttpRequest& r, std::shared_ptr<ResponseWriter> w) {
  auto be = ready_or_503(*w);
  if (!be) return;
  Json body;
  CompletionRequest req;
  if (auto e = parse_json_body(r.body, &body)) return send_error(*w, *e);
  if (auto e = parse_completion_request(body, be->limits, &req)) return send_error(*w, *e);
  if (auto e = check_model(req.model)) return send_error(*w, *e);
  auto job = std::make_shared<Job>(this, be, w, /*chat=*/false);
  job->gen = std::move(req.gen);
  job->echo_logprobs = req.echo && job->gen.logprobs >= 0;
  for (const std::string& text : req.text_prompts) {
    job->prompts.push_back(be->tok->encode(text, /*add_special_tokens=*/true));
    if (req.echo) job->echoes.push_back(text);
    if (opt.log_content) job->prompt_log.push_back(json_quote(text));
  }
  for (auto& ids : req.token_prompts) {
    if (req.echo) job->echoes.push_back(be->tok->decode(ids, /*skip_special_tokens=*/false));
    if (opt.log_content) job->prompt_log.push_back(json_ids(ids));
    job->prompts.push_back(std::move(ids));
  }
  for (const auto& p : job->prompts) {
    if (p.empty()) return send_error(*w, api_bad_request("the prompt is empty after tokenization", "prompt"));
    int32_t max_tokens = 0;
    if (auto e = fit_context(*be, p.size(), job->gen.max_tokens, 16, "prompt", &max_tokens)) return send_error(*w, *e);
    job->max_tokens.push_back(max_tokens);
  }
  job->meta = ResponseMeta{random_id("cmpl-"), unix_now(), opt.served_model_name, fingerprint};
  if (auto e = job->start()) {
    w->set_log(job->meta.id, {});
    return send_error(*w, *e, e->status == 503 ? HeaderList{{"Retry-After", "1"}} : HeaderList{});
  }
}

void Server::Impl::handle_chat(const HttpRequest& r, std::shared_ptr<ResponseWriter> w) {
  auto be = ready_or_503(*w);
  if (!be) return;
  Json body;
  ChatRequest req;
  if (auto e = parse_json_body(r.body, &body)) return send_error(*w, *e);
  if (auto e = parse_chat_request(body, be->limits, &req)) return send_error(*w, *e);
  if (auto e = check_model(req.model)) return send_error(*w, *e);
  auto text = render_chat(*be, req.messages, req.tools, req.add_generation_prompt, req.continue_final_message,
                          req.chat_template_kwargs);
  if (!text) return send_error(*w, api_bad_request(text.message(), "messages"));
  auto job = std::make_shared<Job>(this, be, w, /*chat=*/true);
  job->gen = std::move(req.gen);
  job->prompts.push_back(be->tok->encode(*text, /*add_special_tokens=*/false));
  if (opt.log_content) job->prompt_log.push_back(json_quote(*text));
  if (job->prompts[0].empty()) return send_error(*w, api_bad_request("the messages render to no tokens", "messages"));
  int32_t max_tokens = 0;
  if (auto e = fit_context(*be, job->prompts[0].size(), job->gen.max_tokens, 0, "messages", &max_tokens))
    return send_error(*w, *e);
  job->max_tokens.push_back(max_tokens);
  job->meta = ResponseMeta{random_id("chatcmpl-"), unix_now(), opt.served_model_name, fingerprint};
  if (auto e = job->start()) {
    w->set_log(job->meta.id, {});
    return send_error(*w, *e, e->status == 503 ? HeaderList{{"Retry-After", "1"}} : HeaderList{});
  }
}

void Server::Impl::handle_tokenize(const HttpRequest& r, std::shared_ptr<ResponseWriter> w) {
  auto be = ready_or_503(*w);
  if (!be) return;
  Json body;
  TokenizeRequest req;
  if (auto e = parse_json_body(r.body, &body)) return send_error(*w, *e);
  if (auto e = parse_tokenize_request(body, &req)) return send_error(*w, *e);
  if (auto m = body.find("model"); m != body.end() && m->is_string())
    if (auto e = check_model(m->get<std::string>())) return send_error(*w, *e);
  std::string text = req.prompt;
  if (req.is_chat) {
    auto rendered = render_chat(*be, req.messages, req.tools, req.add_generation_prompt, false, Json::object());
    if (!rendered) return send_error(*w, api_bad_request(rendered.message(), "messages"));
    text = std::move(*rendered);
  }
  std::vector<int32_t> ids = be->tok->encode(text, req.add_special_tokens);
  send_json(*w, 200,
            Json{{"count", ids.size()}, {"max_model_len", be->max_model_len}, {"tokens", ids}, {"token_strs", nullptr}});
}

void Server::Impl::handle_detokenize(const HttpRequest& r, std::shared_ptr<ResponseWriter> w) {
  auto be = ready_or_503(*w);
  if (!be) return;
  Json body;
  std::vector<int32_t> ids;
  if (auto e = parse_json_body(r.body, &body)) return send_error(*w, *e);
  if (auto e = parse_detokenize_request(body, be->limits, &ids)) return send_error(*w, *e);
  send_json(*w, 200, Json{{"prompt", be->tok->decode(ids, /*skip_special_tokens=*/false)}});
}

void Server::Impl::add_routes() {
  auto bind = [this](void (Impl::*fn)(const HttpRequest&, std::shared_ptr<ResponseWriter>)) {
    return [this, fn](const HttpRequest& r, std::shared_ptr<ResponseWriter> w) { (this->*fn)(r, std::move(w)); };
  };
  http.add_route("POST", "/v1/completions", bind(&Impl::handle_completions));
  http.add_route("POST", "/v1/chat/completions", bind(&Impl::handle_chat));
  http.add_route("POST", "/tokenize", bind(&Impl::handle_tokenize));
  http.add_route("POST", "/detokenize", bind(&Impl::handle_detokenize));
  http.add_route("GET", "/v1/models", [this](const HttpRequest&, std::shared_ptr<ResponseWriter> w) {
    auto be = ready_or_503(*w);
    if (!be) return;
    send_json(*w, 200, Json{{"object", "list"}, {"data", Json::array({model_card(*be)})}});
  });
  http.add_route(
      "GET", "/v1/models/",
      [this](const HttpRequest& r, std::shared_ptr<ResponseWriter> w) {
        auto be = ready_or_503(*w);
        if (!be) return;
        std::string id = r.path.substr(std::string("/v1/models/").size());
        if (id != opt.served_model_name)
          return send_error(*w, api_not_found("The model `" + id + "` does not exist.", "model_not_found"));
        send_json(*w, 200, model_card(*be));
      },
      /*open=*/false, /*prefix=*/true);
  http.add_route(
      "GET", "/health",
      [this](const HttpRequest&, std::shared_ptr<ResponseWriter> w) {
        if (get()) w->send(200, "text/plain", "");
        else send_error(*w, server_error(503, "the model is still loading"), {{"Retry-After", "1"}});
      },
      /*open=*/true);
  http.add_route(
      "GET", "/version",
      [](const HttpRequest&, std::shared_ptr<ResponseWriter> w) {
        send_json(*w, 200, Json{{"version", KILN_VERSION}, {"commit", KILN_GIT_COMMIT}});
      },
      /*open=*/true);
  // The browser chat page (src/server/chat_page.h): open, like /health; its API calls carry the key.
  http.add_route(
      "GET", "/",
      [](const HttpRequest& r, std::shared_ptr<ResponseWriter> w) {
        const std::string etag(chat_page_etag());
        HeaderList headers = {{"ETag", etag}, {"Cache-Control", "no-cache"}};
        if (const std::string* inm = r.header("if-none-match"); inm && *inm == etag)
          return w->send(304, "text/html; charset=utf-8", "", std::move(headers));
        w->send(200, "text/html; charset=utf-8", std::string(chat_page_html()), std::move(headers));
      },
      /*open=*/true);
  http.add_route("GET", "/metrics", [this](const HttpRequest&, std::shared_ptr<ResponseWriter> w) {
    auto be = get();
    EngineStats st;
    if (be) st = be->engine->stats();
    w->send(200, "text/plain; version=0.0.4; charset=utf-8", metrics.render(be ? &st : nullptr));
  });
  http.set_status_observer([this](int status) { metrics.count_response(status); });
  if (opt.log_requests) http.set_request_observer([](RequestRecord&& r) { log_request(std::move(r)); });
}

Server::Server(ServerOptions options) : impl_(std::make_shared<Impl>(std::move(options))) {
  if (impl_->opt.served_model_name.empty()) impl_->opt.served_model_name = "kiln";
  impl_->add_routes();
}

Server::~Server() { shutdown(0.0); }

Result<uint16_t> Server::start() { return impl_->http.start(); }

void Server::set_backend(Backend b) {
  auto be = std::make_shared<BackendState>();
  be->engine = std::move(b.engine);
  be->tok = std::move(b.tokenizer);
  be->tmpl = std::move(b.chat_template);
  const ExecutorInfo& info = be->engine->info();
  int32_t len = b.max_model_len;
  if (len <= 0) len = be->engine->limits().max_seq_len;
  if (len <= 0) len = info.max_seq_len;
  // A sequence can never hold more tokens than the whole KV cache.
  if (info.num_kv_blocks > 0) len = std::min<int64_t>(len, int64_t(info.num_kv_blocks) * info.block_size);
  be->max_model_len = len;
  be->limits = impl_->opt.api;
  be->limits.vocab_size = info.vocab_size > 0 ? info.vocab_size : be->tok->vocab_size();
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->backend = std::move(be);
}

void Server::shutdown(double grace_s) {
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    if (impl_->shut_down) return;
    impl_->shut_down = true;
  }
  impl_->http.drain(grace_s);
  // Cancel what is left while the I/O threads still run, so every job sees its final event.
  if (auto be = impl_->get()) be->engine->shutdown(/*drain=*/false);
  impl_->http.stop();
}

Metrics& Server::metrics() { return impl_->metrics; }

bool Server::ready() const { return impl_->get() != nullptr; }

}  // namespace kiln::server
