// One step's metadata, planned once by the scheduler side and read by every layer (STYLE.md #7).
// Requests are packed: sequence s owns query rows [query_start[s], query_start[s+1]).
// There are no prefill/decode modes: a sequence contributes num_computed..num_computed+n tokens,
// whether that is a whole prompt, a chunk of one, or a single decode token.
#pragma once
#include <cstdint>
#include <vector>

namespace kiln {

struct StepBatch {
  std::vector<int32_t> token_ids;     // [num_tokens] packed over sequences
  std::vector<int32_t> positions;     // [num_tokens] absolute position of each token in its sequence
  std::vector<int32_t> query_start;   // [num_seqs + 1] offsets into token_ids
  std::vector<int32_t> context_lens;  // [num_seqs] tokens in the KV cache after this step (incl. new)
  std::vector<int32_t> block_tables;  // [num_seqs, max_blocks_per_seq] physical block ids, row-major
  int32_t max_blocks_per_seq = 0;
  // Rows of token_ids whose logits are wanted, in output order: first the last token of each
  // sequence that samples this step (one per SeqSampling), then the prompt rows of
  // prompt_logprob_rows, in that order.
  std::vector<int32_t> logits_rows;
  // Prompt logprobs (empty unless a request asks for them, so the common path pays nothing):
  // entry j belongs to logits row logits_rows[num_sampled_rows() + j], the row of a prompt token
  // whose logits score the next prompt token `target_id`.
  struct PromptLogprobRow {
    int32_t target_id = -1;
    int32_t top_k = 0;  // alternatives to report besides the target
  };
  std::vector<PromptLogprobRow> prompt_logprob_rows;

  int32_t num_tokens() const { return int32_t(token_ids.size()); }
  int32_t num_seqs() const { return int32_t(context_lens.size()); }
  int32_t num_sampled_rows() const { return int32_t(logits_rows.size() - prompt_logprob_rows.size()); }
  const int32_t* block_table(int32_t seq) const { return block_tables.data() + size_t(seq) * max_blocks_per_seq; }
  void clear() {
    token_ids.clear();
    positions.clear();
    query_start.assign(1, 0);
    context_lens.clear();
    block_tables.clear();
    logits_rows.clear();
    prompt_logprob_rows.clear();
    max_blocks_per_seq = 0;
  }
};

}  // namespace kiln
