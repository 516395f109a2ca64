// Small text helpers shared by the parsers.
#pragma once
#include <string>
#include <string_view>

namespace kiln {

// 'name' for error messages, where the name comes from an untrusted file: control bytes escaped
// (\xNN) and long names cut at 200 bytes, so a message stays printable and short.
std::string quote_untrusted(std::string_view s);

}  // namespace kiln
