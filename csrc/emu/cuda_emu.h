// Host emulation of the few CUDA device features the kernels of csrc/ use, so that the kernels and their launchers
// can be compiled by a host C++ compiler (g++ -DLORA_CUDA_EMULATION) and checked against the reference on a machine
// without a GPU (tests/test_cuda_ext.py does this in CI). Not a CUDA implementation: one block at a time, one
// std::thread per CUDA thread, barriers for __syncthreads and for warp shuffles. Every lane of a warp must take part
// in a shuffle and every thread of a block in __syncthreads, as CUDA requires; a kernel that breaks that rule
// deadlocks here instead of giving wrong answers on a GPU.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers only"
#endif

// Must come before the CUDA headers, which leave an already defined __shared__ alone: a function-local static is
// shared by every thread of the (single, running) block, as __shared__ memory is.
#define __shared__ static
#define __launch_bounds__(...)

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstddef>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lora_cuda_emu {

struct Block {
  explicit Block(unsigned threads, size_t smem)
      : sync(threads), exch(threads), dynamic_smem(smem / sizeof(float) + 1) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      const unsigned lanes = std::min(32u, threads - 32 * w);
      warps.emplace_back(new std::barrier<>(lanes));
    }
  }
  ~Block() {
    for (auto* w : warps) delete w;
  }
  std::barrier<> sync;
  std::vector<std::barrier<>*> warps;
  std::vector<float> exch;
  std::vector<float> dynamic_smem;
};

// Set by a 16-byte load from an address that is not 16-byte aligned (a GPU faults with "misaligned address");
// check_launch turns it into the same error.
inline std::atomic<bool> misaligned_vector_load{false};

inline thread_local Block* tl_block = nullptr;
inline thread_local uint3 tl_thread{0, 0, 0};
inline thread_local uint3 tl_block_idx{0, 0, 0};

// Runs the grid one block at a time on block.x host threads (spawned once per launch). After each block every thread
// meets at `done`, so the next block starts with the barriers in step; shared memory keeps its stale contents across
// blocks, as it may on a GPU.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  Block blk(block.x, smem);
  std::barrier<> done(block.x);
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t)
    threads.emplace_back([&, t] {
      tl_block = &blk;
      tl_thread = uint3{t, 0, 0};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            tl_block_idx = uint3{x, y, z};
            kernel(args...);
            done.arrive_and_wait();
          }
    });
  for (auto& th : threads) th.join();
}

}  // namespace lora_cuda_emu

#define threadIdx (::lora_cuda_emu::tl_thread)
#define blockIdx (::lora_cuda_emu::tl_block_idx)

inline void __syncthreads() { lora_cuda_emu::tl_block->sync.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask, int width = 32) {
  auto* blk = lora_cuda_emu::tl_block;
  const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
  blk->exch[t] = v;
  blk->warps[warp]->arrive_and_wait();
  // CUDA: source lane = lane ^ lane_mask; a source beyond the lane's width-segment returns the lane's own value.
  const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  const float out = (src / width == lane / width) ? blk->exch[warp * 32 + src] : v;
  blk->warps[warp]->arrive_and_wait();
  return out;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

using std::fmaf;

#define LORA_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(lora_cuda_emu::tl_block->dynamic_smem.data())
#define LORA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::lora_cuda_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
