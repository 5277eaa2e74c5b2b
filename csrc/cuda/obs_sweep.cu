// SparseGPT's in-block OBS sweep: one launch per block of B <= 128 columns.
//
// Layout: the Hinv block lives in shared memory (B*B fp32, up to 64 KB, dynamic); one warp sweeps one
// row, lane l holding columns l, l+32, l+64, l+96 in registers. Column i is broadcast from its owner
// lane with a shuffle, every lane applies the rank-1 update to the columns it holds, and at every
// group start (N:M) the warp ranks the group's scores in registers. Rows are independent given Hinv,
// so the warps never talk to each other.
//
// The arithmetic follows the reference operation by operation (w*w/(d*d) scores, err = (w-q)/d,
// w -= err*h with separately rounded product and difference: no FMA contraction), so masks and values
// match the PyTorch reference on the same device.
#include <cuda_runtime.h>

#include <cstdint>

#include "prunekit/obs_sweep_cuda.h"

namespace prunekit {
namespace cuda {
namespace {

constexpr int kSlots = kObsSweepMaxBlock / 32;  // columns per lane
constexpr int kWarps = 16;                       // rows per CTA in flight
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFullMask = 0xffffffffu;

// v[slot] for a slot known only at run time (the warp agrees on it): registers cannot be indexed.
__device__ __forceinline__ float pick(const float (&v)[kSlots], int slot) {
  float out = v[0];
#pragma unroll
  for (int s = 1; s < kSlots; ++s) out = (slot == s) ? v[s] : out;
  return out;
}

__device__ __forceinline__ float score(float w, float d) {
  return __fdiv_rn(__fmul_rn(w, w), __fmul_rn(d, d));
}

// Keep the n highest scores among columns start..start+m-1 of this row; ties prune the lower index
// first. Each lane ranks the group columns it owns against all m group members.
__device__ __forceinline__ void select_nm(const float (&w)[kSlots], bool (&kept)[kSlots],
                                          const float* hs, int B, int start, int n, int m, int lane) {
  float own[kSlots];
  int rank[kSlots];
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    const int col = t * 32 + lane;
    own[t] = (col < B) ? score(w[t], hs[col * B + col]) : 0.f;
    rank[t] = 0;
  }
  for (int k = 0; k < m; ++k) {
    const int c = start + k;
    const float s_c = score(__shfl_sync(kFullMask, pick(w, c >> 5), c & 31), hs[c * B + c]);
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int col = t * 32 + lane;
      rank[t] += (s_c < own[t]) || (s_c == own[t] && c < col);
    }
  }
#pragma unroll
  for (int t = 0; t < kSlots; ++t) {
    const int col = t * 32 + lane;
    if (col >= start && col < start + m) kept[t] = rank[t] >= m - n;
  }
}

__global__ void __launch_bounds__(kThreads)
obs_sweep_kernel(const float* __restrict__ w_in, const float* __restrict__ hinv,
                 const std::uint8_t* __restrict__ keep_in, float* __restrict__ q_out,
                 float* __restrict__ err_out, float* __restrict__ loss_out,
                 std::uint8_t* __restrict__ keep_out, std::int64_t rows, int B, int n, int m) {
  extern __shared__ float hs[];  // the B x B Hinv block
  for (int idx = threadIdx.x; idx < B * B; idx += blockDim.x) hs[idx] = hinv[idx];
  __syncthreads();  // the only block-wide barrier: warps are independent from here on

  const int lane = threadIdx.x & 31;
  const std::int64_t warp_stride = static_cast<std::int64_t>(gridDim.x) * kWarps;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
       row < rows; row += warp_stride) {
    const std::int64_t base = row * B;
    float w[kSlots], q[kSlots], e[kSlots];
    bool kept[kSlots];
#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int col = t * 32 + lane;
      const bool inside = col < B;
      w[t] = inside ? w_in[base + col] : 0.f;
      kept[t] = (m == 0 && inside) ? keep_in[base + col] != 0 : false;
      q[t] = 0.f;
      e[t] = 0.f;
    }
    float loss = 0.f;

#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int lanes_here = min(32, B - s * 32);  // warp-uniform
      for (int l = 0; l < lanes_here; ++l) {
        const int i = s * 32 + l;
        if (m > 0 && i % m == 0) select_nm(w, kept, hs, B, i, n, m, lane);
        const float w_i = __shfl_sync(kFullMask, w[s], l);
        const bool kept_i = __shfl_sync(kFullMask, static_cast<int>(kept[s]), l) != 0;
        const float d = hs[i * B + i];
        const float q_i = kept_i ? w_i : 0.f;
        const float delta = __fsub_rn(w_i, q_i);
        loss = __fadd_rn(loss, __fdiv_rn(__fdiv_rn(__fmul_rn(delta, delta), __fmul_rn(d, d)), 2.f));
        const float e_i = __fdiv_rn(delta, d);
        if (lane == l) {
          q[s] = q_i;
          e[s] = e_i;
        }
        const float* h_row = hs + i * B;
#pragma unroll
        for (int t = s; t < kSlots; ++t) {  // slots before s hold columns < i only
          const int col = t * 32 + lane;
          if (col >= i && col < B) w[t] = __fsub_rn(w[t], __fmul_rn(e_i, h_row[col]));
        }
      }
    }

#pragma unroll
    for (int t = 0; t < kSlots; ++t) {
      const int col = t * 32 + lane;
      if (col < B) {
        q_out[base + col] = q[t];
        err_out[base + col] = e[t];
        keep_out[base + col] = kept[t] ? 1 : 0;
      }
    }
    if (lane == 0) loss_out[row] = loss;
  }
}

}  // namespace

Status obs_sweep(const float* w, const float* hinv, const std::uint8_t* keep, float* q, float* err,
                 float* loss, std::uint8_t* keep_out, std::int64_t rows, int B, int n, int m,
                 cudaStream_t stream, const char** cuda_error) {
  if (rows < 0 || B < 1 || B > kObsSweepMaxBlock || m < 0) return Status::kInvalidArgument;
  if (m > 0 && (n < 0 || n > m || B % m != 0)) return Status::kInvalidArgument;
  // Before the pointer checks: an empty [0, B] tensor from PyTorch has data_ptr() == 0.
  if (rows == 0) return Status::kOk;
  if (!w || !hinv || !q || !err || !loss || !keep_out || (m == 0 && !keep)) return Status::kInvalidArgument;

  const std::size_t smem = static_cast<std::size_t>(B) * B * sizeof(float);
  cudaError_t status = cudaSuccess;
  int device = 0, sms = 0;
  if ((status = cudaGetDevice(&device)) == cudaSuccess)
    status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess && smem > 48 * 1024)  // beyond the default dynamic shared-memory limit
    status = cudaFuncSetAttribute(obs_sweep_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem));
  if (status == cudaSuccess) {
    // Enough CTAs to fill every SM; more would only reload Hinv. Extra rows loop inside a warp.
    const std::int64_t wanted = (rows + kWarps - 1) / kWarps;
    const std::int64_t cap = static_cast<std::int64_t>(sms > 0 ? sms : 1) * (2048 / kThreads);
    const unsigned grid = static_cast<unsigned>(wanted < cap ? wanted : cap);
    obs_sweep_kernel<<<grid, kThreads, smem, stream>>>(w, hinv, keep, q, err, loss, keep_out, rows, B, n, m);
    status = cudaGetLastError();
  }
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear a sticky launch error so the next call starts clean
    if (cuda_error) *cuda_error = cudaGetErrorString(status);
    return Status::kCudaError;
  }
  return Status::kOk;
}

}  // namespace cuda
}  // namespace prunekit
