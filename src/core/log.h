// Minimal leveled logging to stderr. KILN_LOG_LEVEL=debug|info|warn|error.
//
// Two line formats (set_log_format; `kiln serve --log_format`): plain
//   2026-11-22T09:00:00Z info request id=cmpl-1 status=200 total_ms=81.5
// and JSON, one object per line, for log shippers (journald, docker, Loki, ...):
//   {"time":"2026-11-22T09:00:00Z","level":"info","msg":"request","id":"cmpl-1","status":200,...}
#pragma once
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace kiln {
enum class LogLevel { kDebug, kInfo, kWarn, kError };
enum class LogFormat { kPlain, kJson };

// One structured field. `value` is the text of a string (is_string) or a JSON literal: a number,
// true/false, an array.
struct LogField {
  std::string key;
  std::string value;
  bool is_string = true;
};

void log_message(LogLevel level, const std::string& msg);
// A message with fields, formatted once into one line.
void log_event(LogLevel level, const std::string& msg, const std::vector<LogField>& fields);
LogLevel log_level();
void set_log_level(LogLevel level);
LogFormat log_format();
void set_log_format(LogFormat format);
// Where finished lines go (without the newline); nullptr: stderr. For tests.
void set_log_sink(std::function<void(std::string_view line)> sink);

// The line log_event writes, for a given time stamp.
std::string format_log_line(LogFormat format, std::string_view time, LogLevel level, std::string_view msg,
                            const std::vector<LogField>& fields);
// s as a JSON string literal, quotes included.
std::string json_quote(std::string_view s);

inline void log_debug(const std::string& m) { log_message(LogLevel::kDebug, m); }
inline void log_info(const std::string& m) { log_message(LogLevel::kInfo, m); }
inline void log_warn(const std::string& m) { log_message(LogLevel::kWarn, m); }
inline void log_error(const std::string& m) { log_message(LogLevel::kError, m); }
}  // namespace kiln
