// The browser chat page served at GET / (source: web/chat.html, embedded at build time by
// tools/embed_chat_page.py into chat_page_html.inc, so nothing is read from disk at run time).
#pragma once
#include <string_view>

namespace kiln::server {

// The whole page: HTML with inline CSS and JS, no external resources. Serve it as
// "text/html; charset=utf-8".
std::string_view chat_page_html();
// A strong ETag for the page (quotes included), changing whenever the page does.
std::string_view chat_page_etag();

}  // namespace kiln::server
