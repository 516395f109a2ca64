// Token sampling on the device with the host sampler's semantics (backend/cpu/sampler.cpp):
// repetition / presence / frequency penalties, logit_bias and banned ids, then temperature, top-k,
// top-p and min-p over the candidates sorted by logit (ties by id: a stable radix sort of the row),
// and the same counter RNG sampler_uniform(seed, step). A seeded request therefore draws the same
// tokens on the CPU and the GPU for the same logits; sums run in another order (parallel scans in
// double), so a threshold that falls within ~1e-15 of a boundary can still go the other way.
// Logprobs stay on the host (the executor copies those rows back).
#pragma once
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

#include "core/status.h"
#include "model/sampling.h"

namespace kiln::cuda {

// One row to sample, as the kernels read it (built on the host by DeviceSampler::sample).
struct SampleRow {
  int32_t logits_row;  // row of the logits matrix, and of the output ids
  int32_t greedy;      // 1: the first maximum after penalties and bias
  int32_t top_k;       // 0: off
  float inv_t;         // 1 / temperature, as the host computes it
  float top_p, min_p, repetition_penalty;
  int32_t rep_off, rep_n;    // unique prompt+output ids in ints[]
  int32_t pen_off, pen_n;    // output ids in ints[], presence + frequency * count in floats[]
  int32_t bias_off, bias_n;  // logit_bias ids in ints[], values in floats[] (applied in order)
  int32_t ban_off, ban_n;    // banned ids in ints[]
  uint64_t seed, step;
};

// Fills row.* list fields and appends to ints/floats (sampler_host.cpp: compiled as host C++ with the
// CPU sampler's flags, so presence + frequency * count rounds as it does there).
void sample_row_build(const SeqSampling& s, int32_t logits_row, int32_t V, SampleRow* row,
                      std::vector<int32_t>* ints, std::vector<float>* floats);

class DeviceSampler {
 public:
  DeviceSampler() = default;
  DeviceSampler(const DeviceSampler&) = delete;
  DeviceSampler& operator=(const DeviceSampler&) = delete;
  ~DeviceSampler();

  // True when `s` can be sampled on the device (everything but logprobs).
  static bool supports(const SeqSampling& s) { return s.params->logprobs < 0; }

  // logits: device [*, V]. For each j, samples seqs[j] from logits row rows[j] and writes the id to
  // ids[rows[j]] (device). Enqueued on `stream`; host staging is reused by the next call, so the
  // caller synchronizes the stream between calls (the executor does, every step).
  [[nodiscard]] Status sample(const float* logits, int32_t V, const std::vector<int32_t>& rows,
                              const std::vector<const SeqSampling*>& seqs, int32_t* ids, cudaStream_t stream);

 private:
  Status reserve(int32_t n_rows, int32_t V, size_t n_list, cudaStream_t stream);
  void release();

  int32_t cap_rows_ = 0, cap_v_ = 0;
  size_t cap_list_ = 0, temp_bytes_ = 0;
  float* keys_ = nullptr;  // [cap_rows, V] penalised logits, then the same sorted (2 buffers)
  float* keys_sorted_ = nullptr;
  int32_t* vals_ = nullptr;  // token ids, then the same sorted
  int32_t* vals_sorted_ = nullptr;
  int32_t* offsets_ = nullptr;  // [cap_rows + 1] segment starts
  void* temp_ = nullptr;        // cub temporary storage
  SampleRow* d_rows_ = nullptr;
  int32_t* d_ints_ = nullptr;
  float* d_floats_ = nullptr;
  // pinned staging: rows, ints, floats, offsets
  SampleRow* h_rows_ = nullptr;
  int32_t* h_ints_ = nullptr;
  float* h_floats_ = nullptr;
  int32_t* h_offsets_ = nullptr;
};

}  // namespace kiln::cuda
