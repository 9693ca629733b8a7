// The harmony ops' device implementations (schemas in register.cpp), one out= signature each:
//   gram(A[], V[], out!)                   out [B, 3] fp32 += per-row (A·V, A·A, V·V) summed over buckets
//   combine(A[], V[], ca, cv, out![], acc)  out_k (+)= Σ_i ca_i A_k[i] + cv_i V_k[i]
//   ghost_dots(X, Ga, Gb, out!, method)    out [B, 3] fp32 += per-sample dots; method "gram" or "instantiate"
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace harmony::cpu {
void gram(at::TensorList A, at::TensorList V, const at::Tensor& out);
void combine(at::TensorList A, at::TensorList V, const at::Tensor& ca, const at::Tensor& cv, at::TensorList out,
             bool accumulate);
void ghost_dots(const at::Tensor& X, const at::Tensor& Ga, const at::Tensor& Gb, const at::Tensor& out,
                c10::string_view method);
}  // namespace harmony::cpu
