// Multi-adapter shrink for decode-sized batches (BGMV, Punica's term): per token m with adapter slot id = ids[m],
//   out[s, m, j] = scale[id, s] * sum_k x[m, k] * A_s[id, j, k]      for j < rank[id]
//   out[s, m, j] = 0                                                for rank[id] <= j < r_max, and for every j when
//                                                                   id is -1 or outside [0, L) (nothing is read).
// Each token reads one K-long row of x and rank rows of A: a matrix-vector product per token. A tensor-core tile
// would spend 15 of its 16 rows on nothing here, so this is CUDA-core work: 16-byte loads along K, fp32 FMAs, a
// warp-shuffle reduction and a shared-memory sum across the block's warps.
//
// Work split: one block per (token, group of ROWS rank rows, slice). The block's 128 threads stride over K in 16-byte
// chunks; each x chunk is loaded once and reused for the ROWS rows of A, so x is re-read only r_max / ROWS times per
// token (from L1/L2).
#include <algorithm>
#include <climits>

#include "device_utils.cuh"
#include "lora_cuda.h"

namespace lora_cuda {
namespace {

// 4 warps: enough loads in flight per SM to cover DRAM latency with several blocks resident, small enough that a
// single token with rank 8 still spreads over several blocks (ROWS = 1).
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

template <typename T, int ROWS, bool VEC>
__global__ void __launch_bounds__(kThreads) bgmv_shrink_kernel(const ShrinkParams p, const int64_t groups) {
  const int64_t m = blockIdx.x / groups;
  const int64_t j0 = (blockIdx.x % groups) * ROWS;
  const int s = blockIdx.y;

  int64_t slot = 0, rank = 0;
  const bool active =
      token_adapter(p.ids, p.ids_type, p.stride_id, m, p.ranks, p.ranks_type, p.L, p.r_max, &slot, &rank);
  int64_t nrows = active ? rank - j0 : 0;  // rows of this group below the adapter's rank, clamped to [0, ROWS]
  nrows = nrows < 0 ? 0 : (nrows > ROWS ? ROWS : nrows);
  const int64_t out_base = s * p.stride_os + m * p.stride_om;

  if (nrows == 0) {  // no adapter, or every row of this group is past the adapter's rank: zeros, no pool reads
    if (threadIdx.x < ROWS && j0 + threadIdx.x < p.r_max)
      store_any(p.out, p.out_dtype, out_base + (j0 + threadIdx.x) * p.stride_or, 0.0f);
    return;
  }

  const ShrinkSlice sl = p.slices[s];
  const T* x = static_cast<const T*>(p.x) + m * p.stride_xm;
  const T* a = static_cast<const T*>(sl.a) + slot * sl.stride_l + j0 * sl.stride_r;

  float acc[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;

  if constexpr (VEC) {
    // Contiguous, 16-byte aligned rows (checked by the launcher): the main loop moves whole 16-byte chunks; the last
    // K % V elements (K need not be a multiple of anything) go through the scalar tail below.
    constexpr int V = Vec<T>::kSize;
    const int64_t nvec = p.K / V;
#pragma unroll 4
    for (int64_t c = threadIdx.x; c < nvec; c += kThreads) {
      float xv[V];
      load_vec(x + c * V, xv);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < nrows) {
          float av[V];
          load_vec(a + r * sl.stride_r + c * V, av);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[r] = fmaf(xv[e], av[e], acc[r]);
        }
      }
    }
    for (int64_t k = nvec * V + threadIdx.x; k < p.K; k += kThreads) {
      const float xv = to_float(x[k]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (r < nrows) acc[r] = fmaf(xv, to_float(a[r * sl.stride_r + k]), acc[r]);
    }
  } else {
    // Any strides, any alignment: one element per thread per step.
    for (int64_t k = threadIdx.x; k < p.K; k += kThreads) {
      const float xv = to_float(x[k * p.stride_xk]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (r < nrows) acc[r] = fmaf(xv, to_float(a[r * sl.stride_r + k * sl.stride_k]), acc[r]);
    }
  }

  __shared__ float partial[kWarps][ROWS];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float v = group_sum(acc[r], 32);
    if (lane == 0) partial[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < ROWS) {
    const int r = threadIdx.x;
    const int64_t j = j0 + r;
    if (j < p.r_max) {
      float v = 0.0f;
      if (r < nrows) {
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += partial[w][r];
        if (p.scales) v *= p.scales[slot * p.stride_scale_l + s * p.stride_scale_s];
      }
      store_any(p.out, p.out_dtype, out_base + j * p.stride_or, v);
    }
  }
}

// Tiled variant: one block per (tile of one adapter's tokens, group of 4 rank rows, slice). Each pass takes up to
// kTileTokens tokens of the tile; the A chunk of the 4 rows is loaded once and used for all of them, so A is read
// once per pass instead of once per token (grouped decode batches: several tokens per adapter). Tokens of no valid
// tile (id -1, bad ids, empty slots) are not visited: the caller zeroes `out` first.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) bgmv_shrink_tiled_kernel(const ShrinkParams p, const int64_t groups) {
  constexpr int ROWS = 4;
  constexpr int TM = kTileTokens;
  const int64_t tile = blockIdx.x / groups;
  const int64_t j0 = (blockIdx.x % groups) * ROWS;
  const int s = blockIdx.y;
  const TileList& tl = p.tiles;

  const int64_t start = tl.tile_starts[tile];
  if (start < 0 || start >= tl.cap) return;  // past the last tile
  const int64_t slot = tl.sorted_slots[start];
  if (slot < 0 || slot >= p.L) return;  // "no adapter" or a bad id: never read the pool
  int64_t rank = p.ranks ? load_index(p.ranks, p.ranks_type, slot) : p.r_max;
  rank = rank < 0 ? 0 : (rank > p.r_max ? p.r_max : rank);
  int64_t nrows = rank - j0;
  nrows = nrows < 0 ? 0 : (nrows > ROWS ? ROWS : nrows);
  if (nrows == 0) return;  // rows past the rank stay zero

  const ShrinkSlice sl = p.slices[s];
  const T* a = static_cast<const T*>(sl.a) + slot * sl.stride_l + j0 * sl.stride_r;
  const float scale = p.scales ? p.scales[slot * p.stride_scale_l + s * p.stride_scale_s] : 1.0f;
  __shared__ float partial[kWarps][TM][ROWS];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  for (int64_t c0 = 0; c0 < tl.tile_m; c0 += TM) {
    // The pass's tokens: entries of this tile's slot only (so even a malformed list cannot make a block read another
    // adapter's tokens) and token indices < M; -1 marks an unused entry.
    int64_t tok[TM];
    int ntok = 0;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t pos = start + c0 + i;
      int64_t t = -1;
      if (c0 + i < tl.tile_m && pos < tl.cap && tl.sorted_slots[pos] == slot) {
        t = tl.sorted_tokens[pos];
        if (t < 0 || t >= p.M) t = -1;
      }
      tok[i] = t;
      ntok += t >= 0;
    }
    if (ntok == 0) continue;  // the same for every thread of the block

    float acc[TM][ROWS];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[i][r] = 0.0f;

    if constexpr (VEC) {
      constexpr int V = Vec<T>::kSize;
      const int64_t nvec = p.K / V;
      for (int64_t c = threadIdx.x; c < nvec; c += kThreads) {
        float av[ROWS][V];
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
          if (r < nrows) load_vec(a + r * sl.stride_r + c * V, av[r]);
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          if (tok[i] < 0) continue;
          float xv[V];
          load_vec(static_cast<const T*>(p.x) + tok[i] * p.stride_xm + c * V, xv);
#pragma unroll
          for (int r = 0; r < ROWS; ++r)
            if (r < nrows)
#pragma unroll
              for (int e = 0; e < V; ++e) acc[i][r] = fmaf(xv[e], av[r][e], acc[i][r]);
        }
      }
      for (int64_t k = nvec * V + threadIdx.x; k < p.K; k += kThreads) {
        float av[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) av[r] = r < nrows ? to_float(a[r * sl.stride_r + k]) : 0.0f;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          if (tok[i] < 0) continue;
          const float xv = to_float(static_cast<const T*>(p.x)[tok[i] * p.stride_xm + k]);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) acc[i][r] = fmaf(xv, av[r], acc[i][r]);
        }
      }
    } else {
      for (int64_t k = threadIdx.x; k < p.K; k += kThreads) {
        float av[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) av[r] = r < nrows ? to_float(a[r * sl.stride_r + k * sl.stride_k]) : 0.0f;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
          if (tok[i] < 0) continue;
          const float xv = to_float(static_cast<const T*>(p.x)[tok[i] * p.stride_xm + k * p.stride_xk]);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) acc[i][r] = fmaf(xv, av[r], acc[i][r]);
        }
      }
    }

#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float v = group_sum(acc[i][r], 32);
        if (lane == 0) partial[warp][i][r] = v;
      }
    __syncthreads();
    if (threadIdx.x < TM * ROWS) {
      const int i = threadIdx.x / ROWS;
      const int r = threadIdx.x % ROWS;
      if (tok[i] >= 0 && r < nrows) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += partial[w][i][r];
        store_any(p.out, p.out_dtype, s * p.stride_os + tok[i] * p.stride_om + (j0 + r) * p.stride_or, v * scale);
      }
    }
    __syncthreads();  // `partial` is rewritten by the next pass
  }
}

template <typename T>
bool aligned16(const void* ptr, int64_t stride) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

template <typename T, int ROWS, bool VEC>
void launch_typed(const ShrinkParams& p, cudaStream_t stream) {
  const int64_t groups = (p.r_max + ROWS - 1) / ROWS;
  const int64_t blocks = p.M * groups;
  if (blocks > INT_MAX) throw CudaError("lora shrink: M * ceil(r_max / rows) exceeds the grid limit");
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.num_slices));
  auto kernel = bgmv_shrink_kernel<T, ROWS, VEC>;
  LORA_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, p, groups);
  check_launch("bgmv_shrink_kernel");
}

template <typename T, bool VEC>
void launch_tiled(const ShrinkParams& p, cudaStream_t stream) {
  const int64_t groups = (p.r_max + 3) / 4;
  const int64_t blocks = p.tiles.num_tiles * groups;
  if (blocks > INT_MAX) throw CudaError("lora shrink: num_tiles * ceil(r_max / 4) exceeds the grid limit");
  if (blocks == 0) return;
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.num_slices));
  auto kernel = bgmv_shrink_tiled_kernel<T, VEC>;
  LORA_LAUNCH(kernel, grid, dim3(kThreads), 0, stream, p, groups);
  check_launch("bgmv_shrink_tiled_kernel");
}

template <typename T>
void launch_dtype(const ShrinkParams& p, cudaStream_t stream) {
  bool vec = p.stride_xk == 1 && aligned16<T>(p.x, p.stride_xm);
  for (int s = 0; s < p.num_slices; ++s) {
    const ShrinkSlice& sl = p.slices[s];
    vec = vec && sl.stride_k == 1 && aligned16<T>(sl.a, sl.stride_l) && aligned16<T>(sl.a, sl.stride_r);
  }
  // Few (token, row) pairs: one row per block, so that the reads spread over as many SMs as possible. Otherwise four
  // rows per block, so that each x chunk is reused four times from registers.
  if (p.tiles.tile_starts) {
    vec ? launch_tiled<T, true>(p, stream) : launch_tiled<T, false>(p, stream);
    return;
  }
  const bool wide = p.M * p.num_slices * p.r_max >= 1024;
  if (vec) {
    wide ? launch_typed<T, 4, true>(p, stream) : launch_typed<T, 1, true>(p, stream);
  } else {
    wide ? launch_typed<T, 4, false>(p, stream) : launch_typed<T, 1, false>(p, stream);
  }
}

}  // namespace

void launch_shrink(const ShrinkParams& p, int dtype, int device, cudaStream_t stream) {
  if (p.num_slices < 1 || p.num_slices > kMaxSlices)
    throw CudaError("lora shrink: number of slices must be in [1, " + std::to_string(kMaxSlices) + "], got " +
                    std::to_string(p.num_slices));
  if (p.M < 0 || p.K < 0 || p.r_max < 0 || p.L < 0) throw CudaError("lora shrink: negative size");
  if (p.out_dtype < kFloat32 || p.out_dtype > kBFloat16) throw CudaError("lora shrink: bad output dtype code");
  check_codes("lora shrink", dtype, p.ids_type, p.ranks_type);
  if (p.M == 0 || p.r_max == 0) return;
  if (!p.x || !p.ids || !p.out) throw CudaError("lora shrink: null pointer for x, ids or out");
  check_tiles("lora shrink", p.tiles);
  DeviceGuard guard(device);
  if (dtype == kFloat16) {
    launch_dtype<__half>(p, stream);
  } else if (dtype == kBFloat16) {
    launch_dtype<__nv_bfloat16>(p, stream);
  } else {
    launch_dtype<float>(p, stream);
  }
}

}  // namespace lora_cuda
