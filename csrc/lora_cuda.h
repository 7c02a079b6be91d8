// Shared declarations of the optional CUDA extension of lora_kernels (module lora_kernels._C_lora).
//
// The extension links the CUDA runtime only, never libtorch: Python passes raw device pointers (tensor.data_ptr()),
// sizes, element strides, dtype codes and the current stream as integers. Every CUDA call is checked and a failure
// becomes a C++ exception (a Python RuntimeError through pybind11) that carries the CUDA error string.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(LORA_CUDA_EMULATION)
#include "emu/cuda_emu.h"  // host-compiler build for CPU tests of the kernel logic (see emu/cuda_emu.h)
#else
#include <cuda_runtime.h>
// Kernels declare dynamic shared memory and are launched through these two macros so that emu/cuda_emu.h can stand in.
#define LORA_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#define LORA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace lora_cuda {

// Element types, numbered as lora_kernels/cuda.py numbers them (DTYPE_CODES there).
enum DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

// Index types of the token->adapter ids and the per-adapter ranks (INDEX_CODES in cuda.py).
enum IndexType : int {
  kInt32 = 0,
  kInt64 = 1,
};

// qkv (3) and gate/up (2) are the stacked projections met in practice. Equal to MAX_SLICES of the Python package
// (lora_kernels/ops/_validate.py: every backend accepts the same slice count; tests/test_cuda_ext.py checks that they
// agree). Small enough that the parameter block (passed by value, no device allocation, so the launch is CUDA-graph
// safe) stays well under the 4 KiB kernel-argument limit.
constexpr int kMaxSlices = 4;

// The work list of a LoRABatch (lora_kernels/pool.py): token indices stably sorted by slot, their slots, and the start
// of each tile (<= tile_m consecutive sorted entries of one slot; -1 past the last tile). With it, a block serves up to
// kTileTokens tokens of one adapter per pass and reads that adapter's weights once for all of them. tile_starts null:
// the per-token kernels run instead (one block per token; no list needed).
struct TileList {
  const int32_t* sorted_tokens;  // [cap]
  const int32_t* sorted_slots;   // [cap]
  const int32_t* tile_starts;    // [>= num_tiles]
  int64_t cap, num_tiles, tile_m;
};

// Tokens per pass of the tiled kernels: 8 x 4 rank rows of fp32 accumulators stay in registers.
constexpr int kTileTokens = 8;

// One slice of the shrink: A_s stacked over adapters, [L, r_max, K], element strides.
struct ShrinkSlice {
  const void* a;
  int64_t stride_l, stride_r, stride_k;
};

// out[s, m, j] = scale[id, s] * sum_k x[m, k] * A_s[id, j, k]  for j < rank[id];  0 for rank[id] <= j < r_max and for
// tokens whose id is -1 or outside [0, L) (those read nothing from the pool).
struct ShrinkParams {
  const void* x;  // [M, K] dtype
  int64_t stride_xm, stride_xk;
  int64_t M, K, r_max, L;
  const void* ids;  // [M] int32/int64 adapter slot per token, -1 = none
  int64_t stride_id;
  int ids_type;
  const void* ranks;  // [L] int32/int64 or null (every adapter has rank r_max)
  int ranks_type;
  const float* scales;  // [L, S] fp32 (scale of adapter l on slice s) or null (no scaling here)
  int64_t stride_scale_l, stride_scale_s;
  void* out;            // [S, M, r_max] out_dtype
  int out_dtype;
  int64_t stride_os, stride_om, stride_or;
  int num_slices;
  ShrinkSlice slices[kMaxSlices];
  TileList tiles;  // tiled mode: `out` must be zero beforehand (only tiles of valid slots are written)
};

// One slice of the expand: B_s stacked over adapters, [L, N_s, r_max], written to columns [y_offset, y_offset + n).
struct ExpandSlice {
  const void* b;
  int64_t stride_l, stride_n, stride_r;
  int64_t n, y_offset;
};

// y[m, off_s + n] += scale[id, s] * sum_{j < rank[id]} buf[s, m, j] * B_s[id, n, j]; tokens with id -1 or outside
// [0, L) are left untouched.
struct ExpandParams {
  const void* buf;  // [S, M, r_max] buf_dtype
  int buf_dtype;
  int64_t stride_bs, stride_bm, stride_br;
  void* y;  // [M, N_total] dtype (the dtype of B)
  int64_t stride_ym, stride_yn;
  int64_t M, r_max, L;
  const void* ids;
  int64_t stride_id;
  int ids_type;
  const void* ranks;
  int ranks_type;
  const float* scales;  // [L, S] fp32 or null (scale 1)
  int64_t stride_scale_l, stride_scale_s;
  int num_slices;
  ExpandSlice slices[kMaxSlices];
  TileList tiles;
};

// Launchers (bgmv_shrink.cu, bgmv_expand.cu). Both throw CudaError on a bad argument or a CUDA failure.
void launch_shrink(const ShrinkParams& p, int dtype, int device, cudaStream_t stream);
void launch_expand(const ExpandParams& p, int dtype, int device, cudaStream_t stream);

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Argument checks shared by both launchers; `op` ("lora shrink" / "lora expand") starts each message.
inline void check_codes(const char* op, int dtype, int ids_type, int ranks_type) {
  if (dtype != kFloat16 && dtype != kBFloat16 && dtype != kFloat32)
    throw CudaError(std::string(op) + ": bad dtype code " + std::to_string(dtype));
  if ((ids_type != kInt32 && ids_type != kInt64) || (ranks_type != kInt32 && ranks_type != kInt64))
    throw CudaError(std::string(op) + ": bad index type code for ids or ranks");
}

// A tile list is optional (null tile_starts: per-token kernels); when given, every part of it must be.
inline void check_tiles(const char* op, const TileList& t) {
  if (t.tile_starts && (!t.sorted_tokens || !t.sorted_slots || t.cap < 0 || t.num_tiles < 0 || t.tile_m < 1))
    throw CudaError(std::string(op) + ": incomplete tile list");
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw CudaError(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) + ": " +
                    cudaGetErrorString(err));
  }
}

// After a launch: a bad configuration shows up at once in cudaGetLastError (which also clears it, so the next call
// does not report it again); faults inside the kernel surface at the next synchronising call.
#if defined(LORA_CUDA_EMULATION)
inline void check_launch(const char* kernel) {
  if (lora_cuda_emu::misaligned_vector_load.exchange(false))
    throw CudaError(std::string("CUDA error in ") + kernel + ": misaligned address (emulated 16-byte load)");
}
#else
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }
#endif

// Makes `device` current for the launch and restores the caller's device afterwards (torch keeps its own notion of
// the current device; ours must match the tensors').
#if defined(LORA_CUDA_EMULATION)
class DeviceGuard {
 public:
  explicit DeviceGuard(int) {}
};
#else
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};
#endif

}  // namespace lora_cuda
