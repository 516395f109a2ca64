#include "runtime/kv_manager.h"

#include <gtest/gtest.h>

#include <numeric>

namespace kiln {
namespace {

std::vector<int32_t> iota_tokens(int32_t n, int32_t start = 0) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

#define EXPECT_INTEGRITY(kv)                      \
  do {                                            \
    Status st_ = (kv).check_integrity();          \
    EXPECT_TRUE(st_.is_ok()) << st_.message();    \
  } while (0)

TEST(KvManager, AllocateGrowFree) {
  KvBlockManager kv(4, 4, false);
  EXPECT_EQ(kv.num_free_blocks(), 4);
  auto t = kv.allocate(1, 5);  // 5 tokens -> 2 blocks
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->size(), 2u);
  EXPECT_TRUE(kv.allocate(1, 8).has_value());  // still 2 blocks
  EXPECT_EQ(kv.blocks(1).size(), 2u);
  EXPECT_TRUE(kv.allocate(1, 9).has_value());  // third block
  EXPECT_EQ(kv.num_used_blocks(), 3);
  EXPECT_INTEGRITY(kv);
  kv.free(1);
  kv.free(1);  // unknown now: no-op
  EXPECT_EQ(kv.num_free_blocks(), 4);
  EXPECT_INTEGRITY(kv);
}

TEST(KvManager, FullIsAValueNotAThrow) {
  KvBlockManager kv(3, 4, false);
  ASSERT_TRUE(kv.allocate(1, 8).has_value());
  EXPECT_FALSE(kv.can_allocate(2, 8));
  EXPECT_FALSE(kv.allocate(2, 8).has_value());
  EXPECT_FALSE(kv.has_seq(2));  // a failed allocate changes nothing
  EXPECT_EQ(kv.num_free_blocks(), 1);
  EXPECT_TRUE(kv.can_allocate(2, 4));
  EXPECT_INTEGRITY(kv);
}

TEST(KvManager, PrefixHitSharesBlocksAndNeverCoversLastToken) {
  KvBlockManager kv(8, 4, true);
  const auto a = iota_tokens(12);
  ASSERT_TRUE(kv.allocate(1, 12).has_value());
  kv.cache_full_blocks(1, a, 12);  // 3 full blocks registered
  // Same 12 tokens: only 2 blocks may be reused (the last token must be computed).
  PrefixHit h = kv.find_cached_prefix(a);
  EXPECT_EQ(h.num_tokens, 8);
  // 13 tokens sharing the first 12: all 3 blocks.
  auto b = a;
  b.push_back(99);
  h = kv.find_cached_prefix(b);
  EXPECT_EQ(h.num_tokens, 12);
  ASSERT_TRUE(kv.allocate(2, 13, &h).has_value());
  auto b1 = kv.blocks(1), b2 = kv.blocks(2);
  EXPECT_TRUE(std::equal(b1.begin(), b1.end(), b2.begin()));
  EXPECT_EQ(kv.num_used_blocks(), 4);  // 3 shared + 1 new
  EXPECT_INTEGRITY(kv);
  // A different second block breaks the chain after block 0.
  auto c = a;
  c[5] = 500;
  c.push_back(1);
  EXPECT_EQ(kv.find_cached_prefix(c).num_tokens, 4);
  kv.free(1);
  EXPECT_EQ(kv.num_used_blocks(), 4);  // still owned by seq 2
  kv.free(2);
  EXPECT_EQ(kv.num_used_blocks(), 0);
  EXPECT_EQ(kv.num_cached_free_blocks(), 3);  // findable after free
  EXPECT_EQ(kv.find_cached_prefix(b).num_tokens, 12);
  EXPECT_INTEGRITY(kv);
}

TEST(KvManager, HitOnFreeBlocksCountsThemAsTaken) {
  // 4 blocks; seq 1 caches 3 and frees them. A request hitting those 3 and needing 1 more fits;
  // one needing 2 more does not, and the failed check leaves the cache intact.
  KvBlockManager kv(4, 4, true);
  const auto a = iota_tokens(13);
  ASSERT_TRUE(kv.allocate(1, 12).has_value());
  kv.cache_full_blocks(1, a, 12);
  kv.free(1);
  PrefixHit h = kv.find_cached_prefix(a);
  ASSERT_EQ(h.num_tokens, 12);
  EXPECT_FALSE(kv.can_allocate(2, 20, &h));
  EXPECT_FALSE(kv.allocate(2, 20, &h).has_value());
  EXPECT_EQ(kv.num_cached_free_blocks(), 3);
  EXPECT_TRUE(kv.allocate(2, 16, &h).has_value());
  EXPECT_EQ(kv.num_free_blocks(), 0);
  EXPECT_INTEGRITY(kv);
}

TEST(KvManager, DuplicateBlockStaysUncached) {
  // Two sequences compute the same prefix at once (both missed): the second copy is not cached,
  // and goes back to the pool first when freed.
  KvBlockManager kv(4, 4, true);
  const auto a = iota_tokens(5);
  ASSERT_TRUE(kv.allocate(1, 5).has_value());
  ASSERT_TRUE(kv.allocate(2, 5).has_value());
  kv.cache_full_blocks(1, a, 5);
  kv.cache_full_blocks(2, a, 5);
  EXPECT_INTEGRITY(kv);
  kv.free(1);
  kv.free(2);
  EXPECT_EQ(kv.num_cached_free_blocks(), 1);
  EXPECT_INTEGRITY(kv);
}

TEST(KvManager, LruEvictsTailOfOldestFirst) {
  // Timeline (block_size 4, 6 blocks):
  //   seq 1 caches 3 blocks [p0 p1 p2] and frees them; seq 2 caches 2 blocks [q0 q1] and frees them.
  //   free list, front (next to reuse) to back: u | p2 p1 p0 | q1 q0   (u: never cached)
  //   seq 3 takes 3 fresh blocks: u p2 p1 -> p0 (seq 1's head) and q0 q1 survive.
  KvBlockManager kv(6, 4, true);
  const auto p = iota_tokens(13, 0), q = iota_tokens(9, 100);
  ASSERT_TRUE(kv.allocate(1, 12).has_value());
  kv.cache_full_blocks(1, p, 12);
  kv.free(1);
  ASSERT_TRUE(kv.allocate(2, 8).has_value());
  kv.cache_full_blocks(2, q, 8);
  kv.free(2);
  EXPECT_EQ(kv.num_cached_free_blocks(), 5);
  ASSERT_TRUE(kv.allocate(3, 12).has_value());
  EXPECT_EQ(kv.num_cached_free_blocks(), 3);
  EXPECT_EQ(kv.find_cached_prefix(p).num_tokens, 4);
  EXPECT_EQ(kv.find_cached_prefix(q).num_tokens, 8);
  EXPECT_INTEGRITY(kv);
}

TEST(KvManager, PrefixCachingOff) {
  KvBlockManager kv(4, 4, false);
  const auto a = iota_tokens(9);
  ASSERT_TRUE(kv.allocate(1, 8).has_value());
  kv.cache_full_blocks(1, a, 8);
  kv.free(1);
  EXPECT_EQ(kv.find_cached_prefix(a).num_tokens, 0);
  EXPECT_EQ(kv.num_cached_free_blocks(), 0);
}

}  // namespace
}  // namespace kiln
