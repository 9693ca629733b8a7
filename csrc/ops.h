// The harmony ops' device implementations (schemas in register.cpp).
//   gram(A[], V[]) -> [B, 3] fp32         per-row (A·V, A·A, V·V) summed over buckets
//   combine(A[], V[], ca, cv, out[], acc)  out_k (+)= Σ_i ca_i A_k[i] + cv_i V_k[i]
//   ghost_dots(X, Ga, Gb, method) -> [B, 3] fp32, method 0 = Gram form, 1 = instantiate form
#pragma once

#include <ATen/core/Tensor.h>

namespace harmony::cpu {
at::Tensor gram(at::TensorList A, at::TensorList V);
void combine(at::TensorList A, at::TensorList V, const at::Tensor& ca, const at::Tensor& cv, at::TensorList out,
             bool accumulate);
at::Tensor ghost_dots(const at::Tensor& X, const at::Tensor& Ga, const at::Tensor& Gb, int64_t method);
}  // namespace harmony::cpu
