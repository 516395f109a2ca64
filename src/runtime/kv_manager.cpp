#include "runtime/kv_manager.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <unordered_set>

namespace kiln {

namespace {
inline uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
}  // namespace

KvBlockManager::KvBlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks), block_size_(block_size), prefix_caching_(enable_prefix_caching) {
  KILN_CHECK(num_blocks >= 0 && block_size > 0);
  pool_.resize(size_t(num_blocks));
  if (prefix_caching_) cached_tokens_.assign(size_t(num_blocks) * size_t(block_size), -1);
  for (int32_t b = 0; b < num_blocks; ++b) free_list_push_back(b);
}

uint64_t KvBlockManager::block_hash(uint64_t parent, std::span<const int32_t> tokens) const {
  uint64_t h = mix64(parent ^ 0x6b696c6eull);
  for (int32_t t : tokens) h = mix64(h ^ uint64_t(uint32_t(t)));
  return h;
}

void KvBlockManager::free_list_remove(int32_t b) {
  Block& k = pool_[size_t(b)];
  if (k.prev != kNil) pool_[size_t(k.prev)].next = k.next; else free_head_ = k.next;
  if (k.next != kNil) pool_[size_t(k.next)].prev = k.prev; else free_tail_ = k.prev;
  k.prev = k.next = kNil;
  --num_free_;
}

void KvBlockManager::free_list_push_front(int32_t b) {
  Block& k = pool_[size_t(b)];
  k.prev = kNil;
  k.next = free_head_;
  if (free_head_ != kNil) pool_[size_t(free_head_)].prev = b; else free_tail_ = b;
  free_head_ = b;
  ++num_free_;
}

void KvBlockManager::free_list_push_back(int32_t b) {
  Block& k = pool_[size_t(b)];
  k.next = kNil;
  k.prev = free_tail_;
  if (free_tail_ != kNil) pool_[size_t(free_tail_)].next = b; else free_head_ = b;
  free_tail_ = b;
  ++num_free_;
}

int32_t KvBlockManager::pop_free_block() {
  const int32_t b = free_head_;
  KILN_CHECK(b != kNil);
  free_list_remove(b);
  Block& k = pool_[size_t(b)];
  if (k.hashed) {  // evict: its contents are about to be overwritten
    cached_.erase(k.hash);
    k.hashed = false;
  }
  return b;
}

int32_t KvBlockManager::num_cached_free_blocks() const {
  int32_t n = 0;
  for (int32_t b = free_head_; b != kNil; b = pool_[size_t(b)].next) n += pool_[size_t(b)].hashed;
  return n;
}

PrefixHit KvBlockManager::find_cached_prefix(std::span<const int32_t> tokens) const {
  PrefixHit hit;
  if (!prefix_caching_ || tokens.empty()) return hit;
  // At most (len - 1) tokens, in whole blocks: the last token is always computed.
  const size_t max_blocks = (tokens.size() - 1) / size_t(block_size_);
  uint64_t parent = 0;
  for (size_t i = 0; i < max_blocks; ++i) {
    auto block_tokens = tokens.subspan(i * size_t(block_size_), size_t(block_size_));
    const uint64_t h = block_hash(parent, block_tokens);
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    // A 64-bit hash can collide; the tokens are kept, so a hit is exact.
    const int32_t* held = cached_tokens_.data() + size_t(it->second) * size_t(block_size_);
    if (std::memcmp(held, block_tokens.data(), size_t(block_size_) * sizeof(int32_t)) != 0) break;
    hit.blocks.push_back(it->second);
    parent = h;
  }
  hit.num_tokens = int32_t(hit.blocks.size()) * block_size_;
  return hit;
}

int32_t KvBlockManager::new_blocks_needed(const Seq* s, int32_t num_total_tokens, const PrefixHit* hit) const {
  const int32_t have = s ? int32_t(s->blocks.size()) : 0;
  int32_t need = std::max(0, blocks_for(num_total_tokens) - have);
  if (hit && !hit->blocks.empty()) {
    KILN_CHECK_MSG(have == 0, "a prefix hit is only for a sequence without blocks");
    need = std::max(0, blocks_for(num_total_tokens) - int32_t(hit->blocks.size()));
    // Hit blocks that sit in the free list are taken from it too.
    for (int32_t b : hit->blocks) need += pool_[size_t(b)].ref == 0;
  }
  return need;
}

bool KvBlockManager::can_allocate(uint64_t seq, int32_t num_total_tokens, const PrefixHit* hit) const {
  auto it = seqs_.find(seq);
  return new_blocks_needed(it == seqs_.end() ? nullptr : &it->second, num_total_tokens, hit) <= num_free_;
}

std::optional<std::span<const int32_t>> KvBlockManager::allocate(uint64_t seq, int32_t num_total_tokens,
                                                                 const PrefixHit* hit) {
  if (!can_allocate(seq, num_total_tokens, hit)) return std::nullopt;
  Seq& s = seqs_[seq];
  if (hit && !hit->blocks.empty()) {
    // Take the hit blocks first, so the pops below cannot evict them.
    for (int32_t b : hit->blocks) {
      Block& k = pool_[size_t(b)];
      KILN_CHECK_MSG(k.hashed, "stale prefix hit: find_cached_prefix and allocate must be in the same step");
      if (k.ref++ == 0) free_list_remove(b);
      s.blocks.push_back(b);
    }
    s.num_hashed = int32_t(hit->blocks.size());
    s.last_hash = pool_[size_t(hit->blocks.back())].hash;
  }
  const int32_t want = blocks_for(num_total_tokens);
  while (int32_t(s.blocks.size()) < want) {
    const int32_t b = pop_free_block();
    pool_[size_t(b)].ref = 1;
    s.blocks.push_back(b);
  }
  return std::span<const int32_t>(s.blocks);
}

void KvBlockManager::cache_full_blocks(uint64_t seq, std::span<const int32_t> tokens, int32_t num_computed) {
  if (!prefix_caching_) return;
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  Seq& s = it->second;
  KILN_CHECK(num_computed <= int32_t(tokens.size()));
  const int32_t num_full = std::min(num_computed / block_size_, int32_t(s.blocks.size()));
  for (int32_t i = s.num_hashed; i < num_full; ++i) {
    auto block_tokens = tokens.subspan(size_t(i) * size_t(block_size_), size_t(block_size_));
    const uint64_t h = block_hash(s.last_hash, block_tokens);
    const int32_t b = s.blocks[size_t(i)];
    Block& k = pool_[size_t(b)];
    // If another block already holds this prefix (two requests computed it at once), keep that one:
    // this block stays uncached and goes back to the pool first when freed.
    if (!k.hashed && cached_.emplace(h, b).second) {
      k.hashed = true;
      k.hash = h;
      std::memcpy(cached_tokens_.data() + size_t(b) * size_t(block_size_), block_tokens.data(),
                  size_t(block_size_) * sizeof(int32_t));
    }
    s.last_hash = h;
    s.num_hashed = i + 1;
  }
}

void KvBlockManager::free(uint64_t seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  const std::vector<int32_t>& blocks = it->second.blocks;
  // Tail blocks first: a sequence's last blocks are the least likely to be shared, so they sit
  // nearer the front of the LRU order and are evicted before its prefix.
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) {
    Block& k = pool_[size_t(*b)];
    KILN_CHECK(k.ref > 0);
    if (--k.ref == 0) {
      if (k.hashed) free_list_push_back(*b); else free_list_push_front(*b);
    }
  }
  seqs_.erase(it);
}

std::span<const int32_t> KvBlockManager::blocks(uint64_t seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return {};
  return it->second.blocks;
}

Status KvBlockManager::check_integrity() const {
  auto fail = [](const std::string& m) { return Status::error("kv integrity: " + m); };
  std::vector<int32_t> refs(size_t(num_blocks_), 0);
  for (const auto& [id, s] : seqs_) {
    std::unordered_set<int32_t> seen;
    for (int32_t b : s.blocks) {
      if (b < 0 || b >= num_blocks_) return fail("seq " + std::to_string(id) + " holds bad block " + std::to_string(b));
      if (!seen.insert(b).second) return fail("seq " + std::to_string(id) + " holds block " + std::to_string(b) + " twice");
      ++refs[size_t(b)];
    }
    if (s.num_hashed > int32_t(s.blocks.size())) return fail("seq " + std::to_string(id) + " hashed past its blocks");
  }
  int32_t expect_free = 0;
  for (int32_t b = 0; b < num_blocks_; ++b) {
    const Block& k = pool_[size_t(b)];
    if (k.ref != refs[size_t(b)])
      return fail("block " + std::to_string(b) + " ref " + std::to_string(k.ref) + " but " +
                  std::to_string(refs[size_t(b)]) + " owners");
    expect_free += k.ref == 0;
    if (k.hashed) {
      auto it = cached_.find(k.hash);
      if (it == cached_.end() || it->second != b) return fail("block " + std::to_string(b) + " hashed but not in the map");
    }
  }
  if (expect_free != num_free_)
    return fail(std::to_string(expect_free) + " unowned blocks but free count " + std::to_string(num_free_));
  int32_t walked = 0, prev = kNil;
  for (int32_t b = free_head_; b != kNil; prev = b, b = pool_[size_t(b)].next) {
    if (++walked > num_blocks_) return fail("free list has a cycle");
    if (pool_[size_t(b)].ref != 0) return fail("block " + std::to_string(b) + " is both free and owned");
    if (pool_[size_t(b)].prev != prev) return fail("free list back link broken at block " + std::to_string(b));
  }
  if (prev != free_tail_) return fail("free list tail is wrong");
  if (walked != num_free_) return fail("free list length " + std::to_string(walked) + " != " + std::to_string(num_free_));
  for (const auto& [h, b] : cached_) {
    if (b < 0 || b >= num_blocks_ || !pool_[size_t(b)].hashed || pool_[size_t(b)].hash != h)
      return fail("hash map entry points at block " + std::to_string(b) + " which does not hold it");
  }
  return Status::ok();
}

}  // namespace kiln
