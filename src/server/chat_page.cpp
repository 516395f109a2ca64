#include "server/chat_page.h"

namespace kiln::server {
namespace {
#include "server/chat_page_html.inc"
}  // namespace

std::string_view chat_page_html() { return kChatPageHtml; }
std::string_view chat_page_etag() { return kChatPageEtag; }

}  // namespace kiln::server
