// Device sampling kernels (sampler.h): prep (copy + penalties), a stable segmented radix sort of each
// row by logit (descending; equal logits keep id order, the host's tie rule), then one block per row
// walks the sorted candidates with block-wide scans in double.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <cmath>
#include <string>

#include "backend/cuda/sampler.h"

namespace kiln::cuda {
namespace {

constexpr int kChooseThreads = 1024;

__device__ uint64_t splitmix64_dev(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// sampler_uniform (backend/cpu/sampler.cpp), bit for bit.
__device__ double uniform_dev(uint64_t seed, uint64_t step) {
  uint64_t r = splitmix64_dev(splitmix64_dev(seed) ^ (step * 0xd1b54a32d192ed03ull + 0x8cb92ba72f3d8dd7ull));
  return double(r >> 11) * (1.0 / 9007199254740992.0);
}

// grid: one block per row. keys/vals: [rows, V].
__global__ void sample_prep_kernel(const float* logits, int32_t V, const SampleRow* rows, const int32_t* ints,
                                   const float* floats, float* keys, int32_t* vals) {
  const SampleRow r = rows[blockIdx.x];
  const float* src = logits + size_t(r.logits_row) * V;
  float* x = keys + size_t(blockIdx.x) * V;
  int32_t* id = vals + size_t(blockIdx.x) * V;
  for (int32_t i = threadIdx.x; i < V; i += blockDim.x) {
    x[i] = src[i];
    id[i] = i;
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < r.rep_n; i += blockDim.x) {  // ids unique: no conflicts
    const int32_t t = ints[r.rep_off + i];
    const float v = x[t];
    x[t] = v > 0 ? v / r.repetition_penalty : v * r.repetition_penalty;
  }
  __syncthreads();
  for (int32_t i = threadIdx.x; i < r.pen_n; i += blockDim.x) x[ints[r.pen_off + i]] -= floats[r.pen_off + i];
  __syncthreads();
  if (threadIdx.x == 0) {  // in the host's order: a repeated bias id adds twice
    for (int32_t i = 0; i < r.bias_n; ++i) x[ints[r.bias_off + i]] += floats[r.bias_off + i];
    for (int32_t i = 0; i < r.ban_n; ++i) x[ints[r.ban_off + i]] = -INFINITY;
  }
}

__device__ __forceinline__ double cand_prob(const float* x, int32_t i, float mx, float inv_t) {
  return exp(double(x[i] - mx) * inv_t);
}

// grid: one block per row, kChooseThreads threads; thread t owns the contiguous candidates
// [t * chunk, (t + 1) * chunk) so a block scan of per-thread sums gives every prefix.
__global__ void __launch_bounds__(kChooseThreads) sample_choose_kernel(const float* keys, const int32_t* vals,
                                                                        int32_t V, const SampleRow* rows,
                                                                        int32_t* out) {
  using Scan = cub::BlockScan<double, kChooseThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int32_t s_first;
  const SampleRow r = rows[blockIdx.x];
  const float* x = keys + size_t(blockIdx.x) * V;
  const int32_t* id = vals + size_t(blockIdx.x) * V;
  if (r.greedy) {  // sorted: the first maximum, lowest id among equals
    if (threadIdx.x == 0) out[r.logits_row] = id[0];
    return;
  }
  int32_t keep = r.top_k > 0 ? r.top_k : V;
  const float mx = x[0];
  const int32_t t = threadIdx.x;
  auto prefix = [&](int32_t n, double* base, double* total) {  // sums of prob over [0, n)
    const int32_t chunk = (n + kChooseThreads - 1) / kChooseThreads;
    const int32_t b = min(n, t * chunk), e = min(n, b + chunk);
    double local = 0.0;
    for (int32_t i = b; i < e; ++i) local += cand_prob(x, i, mx, r.inv_t);
    Scan(scan_tmp).ExclusiveSum(local, *base, *total);
    __syncthreads();
    return chunk;
  };
  // First index in [b, e) where pred(i, cum_inclusive) holds, block-wide min; `dflt` when none.
  auto first_where = [&](int32_t n, int32_t chunk, double base, int32_t dflt, auto pred) {
    if (t == 0) s_first = dflt;
    __syncthreads();
    const int32_t b = min(n, t * chunk), e = min(n, b + chunk);
    double cum = base;
    for (int32_t i = b; i < e; ++i) {
      const double p = cand_prob(x, i, mx, r.inv_t);
      cum += p;
      if (pred(i, p, cum)) {
        atomicMin(&s_first, i);
        break;
      }
    }
    __syncthreads();
    const int32_t f = s_first;
    __syncthreads();
    return f;
  };
  double base = 0.0, total = 0.0;
  int32_t chunk = prefix(keep, &base, &total);
  if (r.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p (at least one)
    const double tp = double(r.top_p);
    keep = first_where(keep, chunk, base, keep - 1, [&](int32_t, double, double cum) { return cum / total >= tp; }) + 1;
  }
  if (r.min_p > 0.0f) {  // prob[0] is exp(0) = 1: the floor is min_p itself
    const double floor = double(r.min_p);
    keep = max(1, first_where(keep, chunk, base, keep, [&](int32_t i, double p, double) { return i > 0 && p < floor; }));
  }
  chunk = prefix(keep, &base, &total);
  const double u = uniform_dev(r.seed, r.step) * total;
  const int32_t c = first_where(keep, chunk, base, keep - 1, [&](int32_t, double, double cum) { return u < cum; });
  if (t == 0) out[r.logits_row] = id[c];
}

Status cuda_err(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return Status::ok();
  return Status::error(std::string("device sampler: ") + what + ": " + cudaGetErrorString(e));
}

}  // namespace

DeviceSampler::~DeviceSampler() { release(); }

void DeviceSampler::release() {
  for (void* p : {static_cast<void*>(keys_), static_cast<void*>(keys_sorted_), static_cast<void*>(vals_),
                  static_cast<void*>(vals_sorted_), static_cast<void*>(offsets_), temp_,
                  static_cast<void*>(d_rows_), static_cast<void*>(d_ints_), static_cast<void*>(d_floats_)})
    if (p) cudaFree(p);
  for (void* p : {static_cast<void*>(h_rows_), static_cast<void*>(h_ints_), static_cast<void*>(h_floats_),
                  static_cast<void*>(h_offsets_)})
    if (p) cudaFreeHost(p);
  keys_ = keys_sorted_ = nullptr;
  vals_ = vals_sorted_ = offsets_ = d_ints_ = h_ints_ = h_offsets_ = nullptr;
  temp_ = nullptr;
  d_rows_ = h_rows_ = nullptr;
  d_floats_ = h_floats_ = nullptr;
  cap_rows_ = cap_v_ = 0;
  cap_list_ = temp_bytes_ = 0;
}

Status DeviceSampler::reserve(int32_t n_rows, int32_t V, size_t n_list, cudaStream_t stream) {
  if (n_rows <= cap_rows_ && V == cap_v_ && n_list <= cap_list_) return Status::ok();
  KILN_RETURN_IF_ERROR(cuda_err(cudaStreamSynchronize(stream), "sync before growing"));
  const int32_t rows = std::max(n_rows, cap_rows_);
  const size_t list = std::max(n_list, std::max<size_t>(cap_list_, 4096));
  release();
  const size_t n = size_t(rows) * size_t(V);
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&keys_, n * 4), "keys"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&keys_sorted_, n * 4), "keys"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&vals_, n * 4), "ids"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&vals_sorted_, n * 4), "ids"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&offsets_, size_t(rows + 1) * 4), "offsets"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&d_rows_, size_t(rows) * sizeof(SampleRow)), "rows"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&d_ints_, list * 4), "lists"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&d_floats_, list * 4), "lists"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMallocHost(&h_rows_, size_t(rows) * sizeof(SampleRow)), "pinned rows"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMallocHost(&h_ints_, list * 4), "pinned lists"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMallocHost(&h_floats_, list * 4), "pinned lists"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMallocHost(&h_offsets_, size_t(rows + 1) * 4), "pinned offsets"));
  size_t temp = 0;
  KILN_RETURN_IF_ERROR(cuda_err(cub::DeviceSegmentedRadixSort::SortPairsDescending(
                                    nullptr, temp, keys_, keys_sorted_, vals_, vals_sorted_, int64_t(n), rows,
                                    offsets_, offsets_ + 1, 0, 32, stream),
                                "sort size"));
  KILN_RETURN_IF_ERROR(cuda_err(cudaMalloc(&temp_, std::max<size_t>(temp, 16)), "sort scratch"));
  temp_bytes_ = temp;
  cap_rows_ = rows;
  cap_v_ = V;
  cap_list_ = list;
  return Status::ok();
}

Status DeviceSampler::sample(const float* logits, int32_t V, const std::vector<int32_t>& rows,
                             const std::vector<const SeqSampling*>& seqs, int32_t* ids, cudaStream_t stream) {
  const int32_t n = int32_t(rows.size());
  if (n == 0) return Status::ok();
  std::vector<SampleRow> r(static_cast<size_t>(n));
  std::vector<int32_t> ints;
  std::vector<float> floats;
  for (int32_t j = 0; j < n; ++j) sample_row_build(*seqs[size_t(j)], rows[size_t(j)], V, &r[size_t(j)], &ints, &floats);
  KILN_RETURN_IF_ERROR(reserve(n, V, ints.size(), stream));
  std::copy(r.begin(), r.end(), h_rows_);
  std::copy(ints.begin(), ints.end(), h_ints_);
  std::copy(floats.begin(), floats.end(), h_floats_);
  for (int32_t j = 0; j <= n; ++j) h_offsets_[j] = j * V;
  cudaMemcpyAsync(d_rows_, h_rows_, size_t(n) * sizeof(SampleRow), cudaMemcpyHostToDevice, stream);
  if (!ints.empty()) {
    cudaMemcpyAsync(d_ints_, h_ints_, ints.size() * 4, cudaMemcpyHostToDevice, stream);
    cudaMemcpyAsync(d_floats_, h_floats_, floats.size() * 4, cudaMemcpyHostToDevice, stream);
  }
  cudaMemcpyAsync(offsets_, h_offsets_, size_t(n + 1) * 4, cudaMemcpyHostToDevice, stream);
  sample_prep_kernel<<<n, 256, 0, stream>>>(logits, V, d_rows_, d_ints_, d_floats_, keys_, vals_);
  size_t temp = temp_bytes_;
  KILN_RETURN_IF_ERROR(cuda_err(cub::DeviceSegmentedRadixSort::SortPairsDescending(
                                    temp_, temp, keys_, keys_sorted_, vals_, vals_sorted_,
                                    int64_t(n) * V, n, offsets_, offsets_ + 1, 0, 32, stream),
                                "sort"));
  sample_choose_kernel<<<n, kChooseThreads, 0, stream>>>(keys_sorted_, vals_sorted_, V, d_rows_, ids);
  return cuda_err(cudaGetLastError(), "launch");
}

}  // namespace kiln::cuda
