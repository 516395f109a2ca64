// kiln: one binary, verbs as subcommands (see cli.h for how a verb registers itself).
#include <algorithm>
#include <cstdio>
#include <map>
#include <vector>

#include "cli/cli.h"

namespace kiln::cli {

static std::vector<std::pair<std::string, VerbSetup>>& registry() {
  static std::vector<std::pair<std::string, VerbSetup>> r;
  return r;
}

VerbRegistrar::VerbRegistrar(const char* name, VerbSetup setup) { registry().emplace_back(name, setup); }

CLI::Option* add_switch(CLI::App& app, const std::string& name, bool& var, const std::string& help) {
  std::string kebab = name;
  for (auto& c : kebab) if (c == '_') c = '-';
  std::string names = "--" + name;
  if (kebab != name) names += ",--" + kebab;
  std::string env = "KILN_";
  for (char c : name) env += char(std::toupper(static_cast<unsigned char>(c)));
  return app.add_flag(names, var, help)->envname(env);
}

int fail(const std::string& verb, const std::string& message) {
  std::fprintf(stderr, "kiln %s: %s\n", verb.c_str(), message.c_str());
  return 1;
}

}  // namespace kiln::cli

int main(int argc, char** argv) {
  CLI::App app{"kiln: LLM inference engine and OpenAI-compatible server"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("kiln ") + KILN_VERSION + " (commit " + KILN_GIT_COMMIT + "; " + KILN_CUDA_INFO + ")");
  auto verbs = kiln::cli::registry();
  std::sort(verbs.begin(), verbs.end());
  for (auto& [name, setup] : verbs) setup(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::RuntimeError& e) {
    return e.get_exit_code();  // a verb's own failure: it already printed its message
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return 0;
}
