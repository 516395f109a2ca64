// Paged KV cache bookkeeping: which physical blocks each sequence owns, plus a prefix cache over full
// blocks. Plain CPU code (STYLE.md #4): it never touches KV memory, only block ids 0..N-1, which are
// indices into the executor's KV tensors ([num_blocks, block_size, ...]).
//
// Allocation is check-then-commit (STYLE.md #6): can_allocate() says whether allocate() would
// succeed; allocate() returns std::nullopt on "full" and never throws.
//
// Prefix caching: a full block is identified by a chained hash (parent block's hash + the block's
// token ids), so equal hashes mean equal prefixes. When a block of a sequence is fully computed its
// hash is registered (cache_full_blocks). A freed block whose hash is registered keeps its contents
// and stays findable until the allocator reuses it; free blocks are handed out uncached ones first,
// then cached ones least recently freed first (LRU).
#pragma once
#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "core/status.h"

namespace kiln {

// A run of cached blocks that holds the first num_tokens tokens of a sequence.
struct PrefixHit {
  std::vector<int32_t> blocks;
  int32_t num_tokens = 0;  // blocks.size() * block_size
};

class KvBlockManager {
 public:
  KvBlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Blocks an allocation can take: unowned blocks, cached or not.
  int32_t num_free_blocks() const { return num_free_; }
  int32_t num_used_blocks() const { return num_blocks_ - num_free_; }
  // Free blocks whose contents are still findable by the prefix cache.
  int32_t num_cached_free_blocks() const;
  int32_t blocks_for(int32_t num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }

  // Longest cached prefix of `tokens`, in whole blocks. It never covers the last token: the model
  // must compute at least one token to produce logits. Takes no reference: pass the hit to
  // allocate() in the same step, before anything else allocates.
  PrefixHit find_cached_prefix(std::span<const int32_t> tokens) const;

  // Whether `seq` can hold num_total_tokens tokens (its blocks grow, never shrink). `hit` is only
  // for a sequence that owns no blocks yet; its blocks become the start of the block table.
  bool can_allocate(uint64_t seq, int32_t num_total_tokens, const PrefixHit* hit = nullptr) const;
  // Commits what can_allocate checked. Returns the sequence's block table, or nullopt (and
  // changes nothing) when there are not enough free blocks.
  std::optional<std::span<const int32_t>> allocate(uint64_t seq, int32_t num_total_tokens,
                                                   const PrefixHit* hit = nullptr);
  // Registers the hashes of the blocks of `seq` that are full within tokens[0, num_computed), so
  // later requests can share them. Call only once those tokens' KV is really written.
  void cache_full_blocks(uint64_t seq, std::span<const int32_t> tokens, int32_t num_computed);
  // Releases every block of `seq` (cached ones stay findable until reused). Unknown seq: no-op.
  void free(uint64_t seq);

  std::span<const int32_t> blocks(uint64_t seq) const;
  bool has_seq(uint64_t seq) const { return seqs_.count(seq) != 0; }

  // Ref counts match the block tables, the free list holds exactly the unowned blocks, and the
  // hash map and per-block hashes agree. Cheap enough for every test step and idle moments.
  [[nodiscard]] Status check_integrity() const;

 private:
  static constexpr int32_t kNil = -1;
  struct Seq {
    std::vector<int32_t> blocks;
    int32_t num_hashed = 0;  // leading blocks whose hash is known (registered or found)
    uint64_t last_hash = 0;  // hash of block num_hashed - 1 (chain parent for the next)
  };
  struct Block {
    int32_t ref = 0;
    bool hashed = false;
    uint64_t hash = 0;
    int32_t prev = kNil, next = kNil;  // free list links, valid while ref == 0
  };

  uint64_t block_hash(uint64_t parent, std::span<const int32_t> tokens) const;
  void free_list_remove(int32_t b);
  void free_list_push_front(int32_t b);
  void free_list_push_back(int32_t b);
  int32_t pop_free_block();  // evicts its cache entry if any
  int32_t new_blocks_needed(const Seq* s, int32_t num_total_tokens, const PrefixHit* hit) const;

  int32_t num_blocks_;
  int32_t block_size_;
  bool prefix_caching_;
  std::vector<Block> pool_;
  int32_t free_head_ = kNil, free_tail_ = kNil, num_free_ = 0;
  std::unordered_map<uint64_t, int32_t> cached_;  // block hash -> block id
  std::vector<int32_t> cached_tokens_;            // [num_blocks, block_size] ids a hashed block holds
  std::unordered_map<uint64_t, Seq> seqs_;
};

}  // namespace kiln
