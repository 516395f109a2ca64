#include "core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>

namespace kiln {
namespace {
LogLevel initial_level() {
  const char* env = std::getenv("KILN_LOG_LEVEL");
  if (!env) return LogLevel::kInfo;
  if (!std::strcmp(env, "debug")) return LogLevel::kDebug;
  if (!std::strcmp(env, "warn")) return LogLevel::kWarn;
  if (!std::strcmp(env, "error")) return LogLevel::kError;
  return LogLevel::kInfo;
}
std::atomic<LogLevel> g_level{initial_level()};
std::atomic<LogFormat> g_format{LogFormat::kPlain};
std::mutex g_mu;
std::function<void(std::string_view)> g_sink;  // guarded by g_mu

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
  }
  return "info";
}

// Plain values stay bare when they cannot be misread (no spaces, quotes, '=' or control bytes);
// anything else is quoted so a prompt with newlines stays on its line.
bool plain_safe(std::string_view s) {
  if (s.empty()) return false;
  for (unsigned char c : s)
    if (c <= ' ' || c == '"' || c == '=' || c == '\\' || c == 0x7f) return false;
  return true;
}

std::string now_utc() {
  std::time_t t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return ts;
}

void emit(LogLevel level, const std::string& msg, const std::vector<LogField>& fields) {
  if (level < g_level.load()) return;
  std::string line = format_log_line(g_format.load(), now_utc(), level, msg, fields);
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_sink) return g_sink(line);
  line += '\n';
  std::fwrite(line.data(), 1, line.size(), stderr);
}
}  // namespace

std::string json_quote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += ch;  // UTF-8 passes through (invalid bytes too: the text is the model's, keep it)
        }
    }
  }
  out += '"';
  return out;
}

std::string format_log_line(LogFormat format, std::string_view time, LogLevel level, std::string_view msg,
                            const std::vector<LogField>& fields) {
  std::string out;
  switch (format) {
    case LogFormat::kPlain:
      out.append(time).append(" ").append(level_name(level)).append(" ").append(msg);
      for (const LogField& f : fields) {
        out.append(" ").append(f.key).append("=");
        if (!f.is_string || plain_safe(f.value)) out += f.value;
        else out += json_quote(f.value);
      }
      return out;
    case LogFormat::kJson:
      out = "{\"time\":" + json_quote(time) + ",\"level\":\"" + level_name(level) + "\",\"msg\":" + json_quote(msg);
      for (const LogField& f : fields) {
        out.append(",").append(json_quote(f.key)).append(":");
        out += f.is_string ? json_quote(f.value) : f.value;
      }
      out += "}";
      return out;
  }
  return out;
}

LogLevel log_level() { return g_level.load(); }
void set_log_level(LogLevel level) { g_level.store(level); }
LogFormat log_format() { return g_format.load(); }
void set_log_format(LogFormat format) { g_format.store(format); }

void set_log_sink(std::function<void(std::string_view)> sink) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_sink = std::move(sink);
}

void log_message(LogLevel level, const std::string& msg) { emit(level, msg, {}); }

void log_event(LogLevel level, const std::string& msg, const std::vector<LogField>& fields) {
  emit(level, msg, fields);
}
}  // namespace kiln
