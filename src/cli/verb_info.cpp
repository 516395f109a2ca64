// kiln info: what a model file or directory holds. (Filled in as formats land.)
#include "cli/cli.h"

KILN_VERB(info) {
  auto* cmd = app.add_subcommand("info", "Describe a model file or directory");
  static std::string path;
  cmd->add_option("MODEL", path, "model dir, .gguf or .safetensors")->required();
  cmd->callback([] { std::printf("%s\n", path.c_str()); });
}
