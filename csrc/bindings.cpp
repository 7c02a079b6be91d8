// pybind11 module lora_kernels._C_lora: the CUDA kernels of csrc/ behind plain integers (pointers, sizes, element
// strides, dtype codes, device index, stream handle). No libtorch: the Python side (lora_kernels/cuda.py) checks the
// tensors and passes tensor.data_ptr(), tensor.stride() and torch.cuda.current_stream().cuda_stream.
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "lora_cuda.h"

namespace py = pybind11;
using namespace lora_cuda;

namespace {

template <typename Ptr>
Ptr as_ptr(uint64_t v) {
  return reinterpret_cast<Ptr>(static_cast<uintptr_t>(v));
}

// cudaGetDeviceCount fails (rather than returning 0) on a machine without a GPU or a driver: report that as a
// CudaError carrying the runtime's own message, and clear it so that later calls do not see it again.
int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw CudaError(std::string("no CUDA device: cudaGetDeviceCount returned ") + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")");
  }
  return n;
}

int runtime_version() {
  int v = 0;
  check_cuda(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

// 0 when no driver is installed (that is not an error for this call).
int driver_version() {
  int v = 0;
  check_cuda(cudaDriverGetVersion(&v), "cudaDriverGetVersion");
  return v;
}

void synchronize(int device) {
  DeviceGuard guard(device);
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

TileList make_tiles(uint64_t sorted_tokens, uint64_t sorted_slots, uint64_t tile_starts, int64_t cap,
                    int64_t num_tiles, int64_t tile_m) {
  TileList t{};
  t.sorted_tokens = as_ptr<const int32_t*>(sorted_tokens);
  t.sorted_slots = as_ptr<const int32_t*>(sorted_slots);
  t.tile_starts = as_ptr<const int32_t*>(tile_starts);
  t.cap = cap;
  t.num_tiles = num_tiles;
  t.tile_m = tile_m;
  return t;
}

using ShrinkSliceArg = std::tuple<uint64_t, int64_t, int64_t, int64_t>;                  // A, stride_l, _r, _k
using ExpandSliceArg = std::tuple<uint64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;  // B, strides, n, y_offset

void shrink(uint64_t x, std::tuple<int64_t, int64_t> x_strides, int64_t M, int64_t K, int dtype,
            const std::vector<ShrinkSliceArg>& a_slices, int64_t L, int64_t r_max, uint64_t ids, int64_t stride_id,
            int ids_type, uint64_t ranks, int ranks_type, uint64_t scales,
            std::tuple<int64_t, int64_t> scale_strides, uint64_t out,
            std::tuple<int64_t, int64_t, int64_t> out_strides, int out_dtype, int device, uint64_t stream,
            uint64_t sorted_tokens, uint64_t sorted_slots, uint64_t tile_starts, int64_t cap, int64_t num_tiles,
            int64_t tile_m) {
  if (a_slices.empty() || a_slices.size() > static_cast<size_t>(kMaxSlices))
    throw CudaError("lora shrink: between 1 and " + std::to_string(kMaxSlices) + " slices, got " +
                    std::to_string(a_slices.size()));
  ShrinkParams p{};
  p.x = as_ptr<const void*>(x);
  std::tie(p.stride_xm, p.stride_xk) = x_strides;
  p.M = M;
  p.K = K;
  p.r_max = r_max;
  p.L = L;
  p.ids = as_ptr<const void*>(ids);
  p.stride_id = stride_id;
  p.ids_type = ids_type;
  p.ranks = as_ptr<const void*>(ranks);
  p.ranks_type = ranks_type;
  p.scales = as_ptr<const float*>(scales);
  std::tie(p.stride_scale_l, p.stride_scale_s) = scale_strides;
  p.out = as_ptr<void*>(out);
  p.out_dtype = out_dtype;
  std::tie(p.stride_os, p.stride_om, p.stride_or) = out_strides;
  p.num_slices = static_cast<int>(a_slices.size());
  for (int s = 0; s < p.num_slices; ++s) {
    uint64_t a;
    std::tie(a, p.slices[s].stride_l, p.slices[s].stride_r, p.slices[s].stride_k) = a_slices[s];
    p.slices[s].a = as_ptr<const void*>(a);
  }
  p.tiles = make_tiles(sorted_tokens, sorted_slots, tile_starts, cap, num_tiles, tile_m);
  launch_shrink(p, dtype, device, as_ptr<cudaStream_t>(stream));
}

void expand(uint64_t buf, std::tuple<int64_t, int64_t, int64_t> buf_strides, int buf_dtype, int64_t M, int64_t r_max,
            const std::vector<ExpandSliceArg>& b_slices, uint64_t y, std::tuple<int64_t, int64_t> y_strides, int dtype,
            int64_t L, uint64_t ids, int64_t stride_id, int ids_type, uint64_t ranks, int ranks_type, uint64_t scales,
            std::tuple<int64_t, int64_t> scale_strides, int device, uint64_t stream, uint64_t sorted_tokens,
            uint64_t sorted_slots, uint64_t tile_starts, int64_t cap, int64_t num_tiles, int64_t tile_m) {
  if (b_slices.empty() || b_slices.size() > static_cast<size_t>(kMaxSlices))
    throw CudaError("lora expand: between 1 and " + std::to_string(kMaxSlices) + " slices, got " +
                    std::to_string(b_slices.size()));
  ExpandParams p{};
  p.buf = as_ptr<const void*>(buf);
  p.buf_dtype = buf_dtype;
  std::tie(p.stride_bs, p.stride_bm, p.stride_br) = buf_strides;
  p.y = as_ptr<void*>(y);
  std::tie(p.stride_ym, p.stride_yn) = y_strides;
  p.M = M;
  p.r_max = r_max;
  p.L = L;
  p.ids = as_ptr<const void*>(ids);
  p.stride_id = stride_id;
  p.ids_type = ids_type;
  p.ranks = as_ptr<const void*>(ranks);
  p.ranks_type = ranks_type;
  p.scales = as_ptr<const float*>(scales);
  std::tie(p.stride_scale_l, p.stride_scale_s) = scale_strides;
  p.num_slices = static_cast<int>(b_slices.size());
  for (int s = 0; s < p.num_slices; ++s) {
    uint64_t b;
    ExpandSlice& sl = p.slices[s];
    std::tie(b, sl.stride_l, sl.stride_n, sl.stride_r, sl.n, sl.y_offset) = b_slices[s];
    sl.b = as_ptr<const void*>(b);
  }
  p.tiles = make_tiles(sorted_tokens, sorted_slots, tile_starts, cap, num_tiles, tile_m);
  launch_expand(p, dtype, device, as_ptr<cudaStream_t>(stream));
}

}  // namespace

// The host-emulation build of the tests compiles this file under another module name (Python caches extension
// modules by name, so two builds named _C_lora could not be loaded side by side).
#ifndef LORA_CUDA_MODULE_NAME
#define LORA_CUDA_MODULE_NAME _C_lora
#endif

PYBIND11_MODULE(LORA_CUDA_MODULE_NAME, m) {
  m.doc() = "lora_kernels CUDA extension: BGMV-style multi-adapter shrink/expand (raw pointers, no libtorch)";
  py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.attr("MAX_SLICES") = kMaxSlices;
  m.attr("DTYPE_FLOAT32") = static_cast<int>(kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(kBFloat16);
  m.attr("INDEX_INT32") = static_cast<int>(kInt32);
  m.attr("INDEX_INT64") = static_cast<int>(kInt64);
#ifdef LORA_CUDA_ARCHS
  m.attr("CUDA_ARCHS") = LORA_CUDA_ARCHS;
#else
  m.attr("CUDA_ARCHS") = "";
#endif

  m.def("device_count", &device_count,
        "Number of CUDA devices; raises CudaError('no CUDA device: ...') when there is no GPU or no driver.");
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was linked with (e.g. 13000).");
  m.def("driver_version", &driver_version, "Latest CUDA version the installed driver supports; 0 without a driver.");
  m.def("synchronize", &synchronize, py::arg("device"), "cudaDeviceSynchronize on `device`, errors raised.");
  m.def("shrink", &shrink, py::arg("x"), py::arg("x_strides"), py::arg("M"), py::arg("K"), py::arg("dtype"),
        py::arg("a_slices"), py::arg("L"), py::arg("r_max"), py::arg("ids"), py::arg("stride_id"),
        py::arg("ids_type"), py::arg("ranks"), py::arg("ranks_type"), py::arg("scales"), py::arg("scale_strides"),
        py::arg("out"),
        py::arg("out_strides"), py::arg("out_dtype"), py::arg("device"), py::arg("stream"),
        py::arg("sorted_tokens") = 0, py::arg("sorted_slots") = 0, py::arg("tile_starts") = 0,
        py::arg("cap") = 0, py::arg("num_tiles") = 0, py::arg("tile_m") = 0,
        "out[s, m, j] = scale[id, s] * x[m] . A_s[id, j] for j < rank[id], else 0; id = ids[m], -1 = none. With a "
        "tile list (tile_starts != 0) only tiles of valid slots are written: zero `out` first.");
  m.def("expand", &expand, py::arg("buf"), py::arg("buf_strides"), py::arg("buf_dtype"), py::arg("M"),
        py::arg("r_max"), py::arg("b_slices"), py::arg("y"), py::arg("y_strides"), py::arg("dtype"), py::arg("L"),
        py::arg("ids"), py::arg("stride_id"), py::arg("ids_type"), py::arg("ranks"), py::arg("ranks_type"),
        py::arg("scales"), py::arg("scale_strides"), py::arg("device"), py::arg("stream"),
        py::arg("sorted_tokens") = 0, py::arg("sorted_slots") = 0, py::arg("tile_starts") = 0,
        py::arg("cap") = 0, py::arg("num_tiles") = 0, py::arg("tile_m") = 0,
        "y[m, off_s + n] += scale[id, s] * buf[s, m, :rank] . B_s[id, n, :rank]; tokens with id -1 untouched.");
}
