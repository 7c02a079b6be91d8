// Multi-adapter expand for decode-sized batches (BGMV): per token m with adapter slot id = ids[m] and per slice s,
//   y[m, off_s + n] += scale[id, s] * sum_{j < rank[id]} buf[s, m, j] * B_s[id, n, j]      for n < N_s
// in place; tokens whose id is -1 or outside [0, L) are left untouched and read nothing from the pool.
//
// A row of B is only rank elements long (8..64 typically: 16..128 bytes), so a warp splits into groups of `lanes`
// lanes, one group per output column n; each lane loads 16-byte pieces of that row and the group sums them with
// shuffles. A warp's load then covers 32 / lanes consecutive rows of B: one contiguous run of memory. The token's
// rank-long input row is staged once per block in shared memory, pre-multiplied by the adapter's scale.
#include <algorithm>
#include <climits>

#include "device_utils.cuh"
#include "lora_cuda.h"

namespace lora_cuda {
namespace {

// 4 warps; with rank 16 in fp16 (2 lanes per column) a block covers 64 output columns.
constexpr int kThreads = 128;

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) bgmv_expand_kernel(const ExpandParams p, const int lanes,
                                                               const int64_t col_blocks) {
  LORA_DYNAMIC_SMEM(float, t_s);  // [rank] the token's shrink output times its scale
  const int64_t m = blockIdx.x / col_blocks;
  const int64_t cols_per_block = kThreads / lanes;
  const int64_t n0 = (blockIdx.x % col_blocks) * cols_per_block;
  const ExpandSlice sl = p.slices[blockIdx.y];
  if (n0 >= sl.n) return;  // this slice is narrower than the widest one

  int64_t slot = 0, rank = 0;
  if (!token_adapter(p.ids, p.ids_type, p.stride_id, m, p.ranks, p.ranks_type, p.L, p.r_max, &slot, &rank)) return;
  if (rank == 0) return;

  const float scale = p.scales ? p.scales[slot * p.stride_scale_l + blockIdx.y * p.stride_scale_s] : 1.0f;
  const int64_t buf_base = blockIdx.y * p.stride_bs + m * p.stride_bm;
  for (int64_t j = threadIdx.x; j < rank; j += kThreads)
    t_s[j] = scale * load_any(p.buf, p.buf_dtype, buf_base + j * p.stride_br);
  __syncthreads();

  const int lig = threadIdx.x & (lanes - 1);  // lane in group (lanes is a power of two <= 32)
  const int64_t n = n0 + threadIdx.x / lanes;
  float acc = 0.0f;
  if (n < sl.n) {  // no early return: every lane of the warp must reach the shuffles below
    const T* b = static_cast<const T*>(sl.b) + slot * sl.stride_l + n * sl.stride_n;
    if constexpr (VEC) {
      // r_max is a multiple of V (checked by the launcher), so a chunk that starts below rank stays inside the
      // padded row; elements past rank are masked, never multiplied (the padding may hold anything, even NaN).
      constexpr int V = Vec<T>::kSize;
      for (int64_t j = static_cast<int64_t>(lig) * V; j < rank; j += static_cast<int64_t>(lanes) * V) {
        float bv[V];
        load_vec(b + j, bv);
#pragma unroll
        for (int e = 0; e < V; ++e)
          if (j + e < rank) acc = fmaf(bv[e], t_s[j + e], acc);
      }
    } else {
      for (int64_t j = lig; j < rank; j += lanes) acc = fmaf(to_float(b[j * sl.stride_r]), t_s[j], acc);
    }
  }
  acc = group_sum(acc, lanes);
  if (lig == 0 && n < sl.n) {
    T* y = static_cast<T*>(p.y) + m * p.stride_ym + (sl.y_offset + n) * p.stride_yn;
    *y = from_float<T>(to_float(*y) + acc);
  }
}

// Tiled variant: one block per (tile of one adapter's tokens, block of output columns, slice). Per pass, up to
// kTileTokens tokens' inputs are staged in shared memory ([kTileTokens][r_max]) and each lane group's B row is loaded
// once and applied to all of them, so B is read once per pass instead of once per token.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) bgmv_expand_tiled_kernel(const ExpandParams p, const int lanes,
                                                                     const int64_t col_blocks) {
  constexpr int TM = kTileTokens;
  LORA_DYNAMIC_SMEM(float, t_s);  // [TM][r_max] the pass's shrink outputs times the scale
  const int64_t tile = blockIdx.x / col_blocks;
  const int64_t cols_per_block = kThreads / lanes;
  const int64_t n0 = (blockIdx.x % col_blocks) * cols_per_block;
  const ExpandSlice sl = p.slices[blockIdx.y];
  if (n0 >= sl.n) return;
  const TileList& tl = p.tiles;
  const int64_t start = tl.tile_starts[tile];
  if (start < 0 || start >= tl.cap) return;
  const int64_t slot = tl.sorted_slots[start];
  if (slot < 0 || slot >= p.L) return;
  int64_t rank = p.ranks ? load_index(p.ranks, p.ranks_type, slot) : p.r_max;
  rank = rank < 0 ? 0 : (rank > p.r_max ? p.r_max : rank);
  if (rank == 0) return;

  const float scale = p.scales ? p.scales[slot * p.stride_scale_l + blockIdx.y * p.stride_scale_s] : 1.0f;
  const int lig = threadIdx.x & (lanes - 1);
  const int64_t n = n0 + threadIdx.x / lanes;
  const T* b = static_cast<const T*>(sl.b) + slot * sl.stride_l + (n < sl.n ? n : 0) * sl.stride_n;

  for (int64_t c0 = 0; c0 < tl.tile_m; c0 += TM) {
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

    for (int64_t idx = threadIdx.x; idx < TM * rank; idx += kThreads) {
      const int i = static_cast<int>(idx / rank);
      const int64_t j = idx % rank;
      const int64_t t = tok[i];
      t_s[i * p.r_max + j] =
          t >= 0 ? scale * load_any(p.buf, p.buf_dtype, blockIdx.y * p.stride_bs + t * p.stride_bm + j * p.stride_br)
                 : 0.0f;
    }
    __syncthreads();

    float acc[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) acc[i] = 0.0f;
    if (n < sl.n) {
      if constexpr (VEC) {
        constexpr int V = Vec<T>::kSize;
        for (int64_t j = static_cast<int64_t>(lig) * V; j < rank; j += static_cast<int64_t>(lanes) * V) {
          float bv[V];
          load_vec(b + j, bv);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            if (j + e >= rank) break;  // padding past the rank: masked, never multiplied
#pragma unroll
            for (int i = 0; i < TM; ++i) acc[i] = fmaf(bv[e], t_s[i * p.r_max + j + e], acc[i]);
          }
        }
      } else {
        for (int64_t j = lig; j < rank; j += lanes) {
          const float bv = to_float(b[j * sl.stride_r]);
#pragma unroll
          for (int i = 0; i < TM; ++i) acc[i] = fmaf(bv, t_s[i * p.r_max + j], acc[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const float v = group_sum(acc[i], lanes);
      if (lig == 0 && n < sl.n && tok[i] >= 0) {
        T* y = static_cast<T*>(p.y) + tok[i] * p.stride_ym + (sl.y_offset + n) * p.stride_yn;
        *y = from_float<T>(to_float(*y) + v);
      }
    }
    __syncthreads();  // t_s is refilled by the next pass
  }
}

int pow2_at_least(int64_t v) {
  int p = 1;
  while (p < v && p < 32) p <<= 1;
  return p;
}

template <typename T, bool VEC>
void launch_typed(const ExpandParams& p, int lanes, cudaStream_t stream) {
  int64_t max_n = 0;
  for (int s = 0; s < p.num_slices; ++s) max_n = std::max(max_n, p.slices[s].n);
  if (max_n == 0) return;
  const bool tiled = p.tiles.tile_starts != nullptr;
  const int64_t cols_per_block = kThreads / lanes;
  const int64_t col_blocks = (max_n + cols_per_block - 1) / cols_per_block;
  const int64_t blocks = (tiled ? p.tiles.num_tiles : p.M) * col_blocks;
  if (blocks > INT_MAX)
    throw CudaError("lora expand: tokens (tiles) * ceil(N / columns per block) exceeds the grid limit");
  if (blocks == 0) return;
  // Static limit of dynamic shared memory without opting in: 48 KiB.
  const size_t smem = static_cast<size_t>(p.r_max) * sizeof(float) * (tiled ? kTileTokens : 1);
  if (smem > 48 * 1024)
    throw CudaError("lora expand: r_max " + std::to_string(p.r_max) + " needs " + std::to_string(smem) +
                    " bytes of shared memory (over 48 KiB)");
  dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(p.num_slices));
  if (tiled) {
    auto kernel = bgmv_expand_tiled_kernel<T, VEC>;
    LORA_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, lanes, col_blocks);
    check_launch("bgmv_expand_tiled_kernel");
  } else {
    auto kernel = bgmv_expand_kernel<T, VEC>;
    LORA_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, lanes, col_blocks);
    check_launch("bgmv_expand_kernel");
  }
}

template <typename T>
bool aligned16(const void* ptr, int64_t stride) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

template <typename T>
void launch_dtype(const ExpandParams& p, cudaStream_t stream) {
  constexpr int V = Vec<T>::kSize;
  bool vec = p.r_max % V == 0;
  for (int s = 0; s < p.num_slices; ++s) {
    const ExpandSlice& sl = p.slices[s];
    vec = vec && sl.stride_r == 1 && aligned16<T>(sl.b, sl.stride_l) && aligned16<T>(sl.b, sl.stride_n);
  }
  if (vec) {
    launch_typed<T, true>(p, pow2_at_least((p.r_max + V - 1) / V), stream);
  } else {
    launch_typed<T, false>(p, pow2_at_least(p.r_max), stream);
  }
}

}  // namespace

void launch_expand(const ExpandParams& p, int dtype, int device, cudaStream_t stream) {
  if (p.num_slices < 1 || p.num_slices > kMaxSlices)
    throw CudaError("lora expand: number of slices must be in [1, " + std::to_string(kMaxSlices) + "], got " +
                    std::to_string(p.num_slices));
  if (p.M < 0 || p.r_max < 0 || p.L < 0) throw CudaError("lora expand: negative size");
  for (int s = 0; s < p.num_slices; ++s)
    if (p.slices[s].n < 0 || p.slices[s].y_offset < 0) throw CudaError("lora expand: negative slice size or offset");
  if (p.buf_dtype < kFloat32 || p.buf_dtype > kBFloat16) throw CudaError("lora expand: bad buffer dtype code");
  check_codes("lora expand", dtype, p.ids_type, p.ranks_type);
  if (p.M == 0 || p.r_max == 0) return;
  if (!p.buf || !p.ids || !p.y) throw CudaError("lora expand: null pointer for buf, ids or y");
  check_tiles("lora expand", p.tiles);
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
