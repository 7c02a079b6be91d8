// Device helpers shared by the kernels: element conversions, 16-byte vector loads, warp reductions, index loads.
#pragma once

#include <cstdint>

#include "lora_cuda.h"  // first: under LORA_CUDA_EMULATION it sets up the host stand-ins before any CUDA header

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace lora_cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One 16-byte transaction holds this many elements (8 halves, 4 floats): the widest load a thread can issue.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
};

// Loads Vec<T>::kSize consecutive elements (16-byte aligned: the launcher checked) and widens them to fp32.
template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, float* out) {
  union {
    uint4 raw;
    T elems[Vec<T>::kSize];
  } u;
#if defined(LORA_CUDA_EMULATION)
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) lora_cuda_emu::misaligned_vector_load = true;
#endif
  u.raw = __ldg(reinterpret_cast<const uint4*>(ptr));
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = to_float(u.elems[i]);
}

// Sum across the `width` lanes of an aligned lane group (width a power of two <= 32) by butterfly shuffles; every
// lane of the group ends with the total.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

__device__ __forceinline__ int64_t load_index(const void* base, int type, int64_t i) {
  return type == kInt64 ? static_cast<const int64_t*>(base)[i]
                        : static_cast<int64_t>(static_cast<const int32_t*>(base)[i]);
}

// Reads a value of a runtime-chosen float dtype (the shrink/expand intermediate may be fp32 or the activation dtype).
__device__ __forceinline__ float load_any(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16:
      return __half2float(static_cast<const __half*>(base)[i]);
    case kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_any(void* base, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16:
      static_cast<__half*>(base)[i] = __float2half_rn(v);
      break;
    case kBFloat16:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
  }
}

// The adapter slot of token m and its effective rank; returns false (token reads nothing) for -1 and for any id
// outside [0, L), so a bad id can never address memory outside the pool.
__device__ __forceinline__ bool token_adapter(const void* ids, int ids_type, int64_t stride_id, int64_t m,
                                              const void* ranks, int ranks_type, int64_t L, int64_t r_max,
                                              int64_t* slot, int64_t* rank) {
  const int64_t id = load_index(ids, ids_type, m * stride_id);
  if (id < 0 || id >= L) return false;
  int64_t r = ranks ? load_index(ranks, ranks_type, id) : r_max;
  r = r < 0 ? 0 : (r > r_max ? r_max : r);
  *slot = id;
  *rank = r;
  return true;
}

}  // namespace lora_cuda
