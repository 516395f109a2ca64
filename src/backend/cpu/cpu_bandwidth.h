// The CPU's streaming-read rate, measured in the run that reports a CPU benchmark, so a decode
// speed can be printed next to its memory-bandwidth ceiling (weights read per token / this rate).
#pragma once
#include <cstddef>

namespace kiln {

// Best of `repeats` passes summing a buffer of `bytes` (well above the caches) on all pool threads.
double cpu_stream_read_gbps(size_t bytes = size_t(512) << 20, int repeats = 5);

}  // namespace kiln
