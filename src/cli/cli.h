// Verb registry: each verb lives in its own verb_*.cpp and registers itself with KILN_VERB, so
// adding one touches no shared file. Flags accept --snake_case and --kebab-case and read KILN_<NAME>.
#pragma once
#include <CLI/CLI.hpp>
#include <string>

namespace kiln::cli {

using VerbSetup = void (*)(CLI::App& app);
struct VerbRegistrar {
  VerbRegistrar(const char* name, VerbSetup setup);
};

// Adds --name (snake), --name-with-dashes (kebab) and the env var KILN_NAME to an option.
template <class T>
CLI::Option* add_flag(CLI::App& app, const std::string& name, T& var, const std::string& help) {
  std::string kebab = name;
  for (auto& c : kebab) if (c == '_') c = '-';
  std::string names = "--" + name;
  if (kebab != name) names += ",--" + kebab;
  std::string env = "KILN_";
  for (char c : name) env += char(std::toupper(static_cast<unsigned char>(c)));
  return app.add_option(names, var, help)->envname(env);
}
// Boolean switch, same spellings; KILN_NAME=1/true/on sets it.
CLI::Option* add_switch(CLI::App& app, const std::string& name, bool& var, const std::string& help);

// Exit code for a failed verb after printing "kiln VERB: message" to stderr.
int fail(const std::string& verb, const std::string& message);

}  // namespace kiln::cli

#define KILN_VERB_CONCAT_(a, b) a##b
#define KILN_VERB(name)                                                                        \
  static void KILN_VERB_CONCAT_(kiln_verb_setup_, name)(CLI::App & app);                      \
  static ::kiln::cli::VerbRegistrar KILN_VERB_CONCAT_(kiln_verb_reg_, name)(                  \
      #name, KILN_VERB_CONCAT_(kiln_verb_setup_, name));                                       \
  static void KILN_VERB_CONCAT_(kiln_verb_setup_, name)(CLI::App & app)
