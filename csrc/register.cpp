// The harmony op library: schemas, CPU implementations, and the harmony._C Python module
// (build facts for `python -m harmony.info`). CUDA implementations register themselves in csrc/cuda/*.cu.
#include <torch/extension.h>

#include <string>

#include "cpu/simd.h"
#include "ops.h"

// Written by setup.py into the build folder; absent when the sources are compiled some other way.
#if __has_include("harmony_build_info.h")
#include "harmony_build_info.h"
#endif
#ifndef HARMONY_BUILD_WITH_CUDA
#define HARMONY_BUILD_WITH_CUDA 0
#define HARMONY_BUILD_CUDA_ARCHS ""
#define HARMONY_BUILD_CXX_FLAGS "unknown"
#define HARMONY_BUILD_NVCC_FLAGS ""
#define HARMONY_BUILD_TORCH "unknown"
#define HARMONY_BUILD_CUDA_VERSION ""
#define HARMONY_BUILD_REASON "built outside setup.py"
#endif

// One out= signature per op, shared by every backend (the Triton ops in harmony/ops/ have the same schemas):
// each op ADDS into (gram, ghost_dots) or writes (combine) its caller's out and returns nothing.
TORCH_LIBRARY(harmony, m) {
  m.def("gram(Tensor[] A, Tensor[] V, Tensor(a!) out) -> ()");
  m.def("combine(Tensor[] A, Tensor[] V, Tensor ca, Tensor cv, Tensor(a!)[] out, bool accumulate) -> ()");
  m.def("ghost_dots(Tensor X, Tensor Ga, Tensor Gb, Tensor(a!) out, str method) -> ()");
}

TORCH_LIBRARY_IMPL(harmony, CPU, m) {
  m.impl("gram", &harmony::cpu::gram);
  m.impl("combine", &harmony::cpu::combine);
  m.impl("ghost_dots", &harmony::cpu::ghost_dots);
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["with_cuda"] = static_cast<bool>(HARMONY_BUILD_WITH_CUDA);
  d["cuda_archs"] = std::string(HARMONY_BUILD_CUDA_ARCHS);
  d["cuda_version"] = std::string(HARMONY_BUILD_CUDA_VERSION);
  d["cxx_flags"] = std::string(HARMONY_BUILD_CXX_FLAGS);
  d["nvcc_flags"] = std::string(HARMONY_BUILD_NVCC_FLAGS);
  d["torch"] = std::string(HARMONY_BUILD_TORCH);
  d["reason"] = std::string(HARMONY_BUILD_REASON);
  d["compiler"] = std::string(__VERSION__);
  d["simd"] = std::string(HARMONY_SIMD_AVX2 ? "avx2+fma+f16c" : "portable (no AVX2)");
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

// Whether this processor runs the instructions the CPU kernels were compiled for.
pybind11::tuple cpu_runs_build() {
#if HARMONY_SIMD_AVX2 && defined(__GNUC__)
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return pybind11::make_tuple(ok, ok ? "" : "this CPU lacks AVX2/FMA/F16C, which the extension was compiled for");
#else
  return pybind11::make_tuple(true, "");
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "harmony kernels: importing this module registers torch.ops.harmony.{gram,combine,ghost_dots}";
  m.def("build_info", &build_info, "How this extension was built (dict)");
  m.def("cpu_runs_build", &cpu_runs_build, "(ok, why) whether this CPU supports the compiled SIMD level");
}
