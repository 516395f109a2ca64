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
std::mutex g_mu;
}  // namespace

LogLevel log_level() { return g_level.load(); }
void set_log_level(LogLevel level) { g_level.store(level); }

void log_message(LogLevel level, const std::string& msg) {
  if (level < g_level.load()) return;
  static const char* names[] = {"debug", "info", "warn", "error"};
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stderr, "%s %s %s\n", ts, names[int(level)], msg.c_str());
}
}  // namespace kiln
