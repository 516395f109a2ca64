// Minimal leveled logging to stderr. KILN_LOG_LEVEL=debug|info|warn|error.
#pragma once
#include <string>

namespace kiln {
enum class LogLevel { kDebug, kInfo, kWarn, kError };
void log_message(LogLevel level, const std::string& msg);
LogLevel log_level();
void set_log_level(LogLevel level);
inline void log_debug(const std::string& m) { log_message(LogLevel::kDebug, m); }
inline void log_info(const std::string& m) { log_message(LogLevel::kInfo, m); }
inline void log_warn(const std::string& m) { log_message(LogLevel::kWarn, m); }
inline void log_error(const std::string& m) { log_message(LogLevel::kError, m); }
}  // namespace kiln
