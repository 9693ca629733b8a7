// Input checks of the C++ bindings, shared by the CPU and CUDA implementations of the harmony ops.
// harmony.ops validates every call before it reaches a backend (harmony/ops/_checks.py, the one place whose
// messages users see); these checks guard the C++ entry points themselves, which torch.ops.harmony.* exposes to
// any caller, so a malformed call fails in a TORCH_CHECK (RuntimeError naming the op and the shapes) instead of
// reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include <c10/util/string_view.h>

namespace harmony {

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Checks two bucket lists A, V ([B, P_k] each, pairwise equal shapes, one dtype and device) and
// returns B. The kernels read rows as contiguous runs, so callers make the buckets contiguous.
inline int64_t check_buckets(const char* op, at::TensorList A, at::TensorList V, c10::DeviceType device_type) {
  TORCH_CHECK(A.size() == V.size(), op, ": A has ", A.size(), " buckets but V has ", V.size());
  TORCH_CHECK(!A.empty(), op, ": needs at least one bucket");
  const at::Tensor& a0 = A[0];
  TORCH_CHECK(a0.dim() == 2, op, ": A[0] must be [B, P], got shape ", a0.sizes());
  const int64_t B = a0.size(0);
  TORCH_CHECK(supported_dtype(a0.scalar_type()), op, ": dtype ", a0.scalar_type(),
              " is not supported (float32, bfloat16, float16)");
  TORCH_CHECK(a0.device().type() == device_type, op, ": expected ", device_type, " tensors, got ", a0.device());
  for (size_t k = 0; k < A.size(); ++k) {
    const at::Tensor& a = A[k];
    const at::Tensor& v = V[k];
    TORCH_CHECK(a.dim() == 2 && v.dim() == 2 && a.sizes() == v.sizes(), op, ": A[", k, "] has shape ", a.sizes(),
                " but V[", k, "] has shape ", v.sizes(), " (both must be the same [B, P])");
    TORCH_CHECK(a.size(0) == B, op, ": A[", k, "] has ", a.size(0), " rows but A[0] has ", B, " (shape ",
                a.sizes(), " vs ", a0.sizes(), ")");
    TORCH_CHECK(a.scalar_type() == a0.scalar_type() && v.scalar_type() == a0.scalar_type(), op,
                ": all buckets must share one dtype; A[0] is ", a0.scalar_type(), ", A[", k, "] is ", a.scalar_type(),
                ", V[", k, "] is ", v.scalar_type());
    TORCH_CHECK(a.device() == a0.device() && v.device() == a0.device(), op, ": all buckets must be on ", a0.device(),
                "; A[", k, "] is on ", a.device(), ", V[", k, "] is on ", v.device());
  }
  return B;
}

// Contiguous copies where needed (documented: rows must be contiguous for the kernels).
inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> r;
  r.reserve(ts.size());
  for (const auto& t : ts) r.push_back(t.contiguous());
  return r;
}

// ca, cv: [B] float coefficients on the buckets' device; returned as contiguous fp32.
inline at::Tensor check_coeffs(const char* op, const char* name, const at::Tensor& c, int64_t B, const at::Device& dev) {
  TORCH_CHECK(c.dim() == 1 && c.size(0) == B, op, ": ", name, " must be [B] = [", B, "], got shape ", c.sizes());
  TORCH_CHECK(at::isFloatingType(c.scalar_type()), op, ": ", name, " must be a float tensor, got ", c.scalar_type());
  TORCH_CHECK(c.device() == dev, op, ": ", name, " is on ", c.device(), " but the buckets are on ", dev);
  return c.to(at::kFloat).contiguous();
}

// out buckets of combine: [P_k] matching A[k], contiguous (they are written in place), fp32/bf16/fp16.
inline void check_combine_out(const char* op, at::TensorList A, at::TensorList out) {
  TORCH_CHECK(out.size() == A.size(), op, ": out has ", out.size(), " buckets but A has ", A.size());
  for (size_t k = 0; k < A.size(); ++k) {
    const at::Tensor& o = out[k];
    TORCH_CHECK(o.dim() == 1 && o.size(0) == A[k].size(1), op, ": out[", k, "] must be [P] = [", A[k].size(1),
                "] to match A[", k, "] of shape ", A[k].sizes(), ", got shape ", o.sizes());
    TORCH_CHECK(supported_dtype(o.scalar_type()), op, ": out[", k, "] dtype ", o.scalar_type(),
                " is not supported (float32, bfloat16, float16)");
    TORCH_CHECK(o.scalar_type() == out[0].scalar_type(), op, ": all out buckets must share one dtype; out[0] is ",
                out[0].scalar_type(), ", out[", k, "] is ", o.scalar_type());
    TORCH_CHECK(o.device() == A[k].device(), op, ": out[", k, "] is on ", o.device(), " but A[", k, "] is on ",
                A[k].device());
    TORCH_CHECK(o.is_contiguous(), op, ": out[", k, "] must be contiguous (it is written in place)");
  }
}

// out of gram / ghost_dots: [B, 3] fp32 on the inputs' device (any strides: it is added into element by element).
inline void check_dots_out(const char* op, const at::Tensor& out, int64_t B, const at::Device& dev) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == B && out.size(1) == 3 && out.scalar_type() == at::kFloat, op,
              ": out must be [B, 3] = [", B, ", 3] float32, got shape ", out.sizes(), " ", out.scalar_type());
  TORCH_CHECK(out.device() == dev, op, ": out is on ", out.device(), " but the inputs are on ", dev);
}

// ghost_dots' method: true for "gram" (via X Xᵀ and Ga Gbᵀ), false for "instantiate" (GaᵀX tile by tile).
inline bool ghost_gram_form(const char* op, c10::string_view method) {
  TORCH_CHECK(method == "gram" || method == "instantiate", op, ": method must be \"gram\" or \"instantiate\", got \"",
              std::string(method), "\"");
  return method == "gram";
}

// ghost_dots: X [B, T, Din], Ga and Gb [B, T, Dout], one dtype and device; out [B, 3] fp32 there.
inline void check_ghost(const char* op, const at::Tensor& X, const at::Tensor& Ga, const at::Tensor& Gb,
                        const at::Tensor& out, c10::DeviceType device_type) {
  TORCH_CHECK(X.dim() == 3 && Ga.dim() == 3 && Gb.dim() == 3, op,
              ": X must be [B, T, Din] and Ga, Gb [B, T, Dout]; got shapes ", X.sizes(), ", ", Ga.sizes(), ", ",
              Gb.sizes());
  TORCH_CHECK(Ga.sizes() == Gb.sizes(), op, ": Ga has shape ", Ga.sizes(), " but Gb has ", Gb.sizes());
  TORCH_CHECK(X.size(0) == Ga.size(0) && X.size(1) == Ga.size(1), op, ": X has shape ", X.sizes(), " but Ga has ",
              Ga.sizes(), " (B and T must match)");
  TORCH_CHECK(supported_dtype(X.scalar_type()), op, ": dtype ", X.scalar_type(),
              " is not supported (float32, bfloat16, float16)");
  TORCH_CHECK(Ga.scalar_type() == X.scalar_type() && Gb.scalar_type() == X.scalar_type(), op,
              ": X, Ga, Gb must share one dtype; got ", X.scalar_type(), ", ", Ga.scalar_type(), ", ",
              Gb.scalar_type());
  TORCH_CHECK(X.device().type() == device_type && Ga.device() == X.device() && Gb.device() == X.device(), op,
              ": X, Ga, Gb must be ", device_type, " tensors on one device; got ", X.device(), ", ", Ga.device(), ", ",
              Gb.device());
  check_dots_out(op, out, X.size(0), X.device());
}

}  // namespace harmony
