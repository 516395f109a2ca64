// A small Llama-shaped config for tests that build random-weight models (make_dummy_model):
// GQA (4 query heads over 2 KV heads), two layers, a vocabulary that is not a power of two.
#pragma once
#include "model/config.h"

namespace kiln::testing {

inline ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 97;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 128;
  c.eos_token_ids = {2};
  return c;
}

}  // namespace kiln::testing
