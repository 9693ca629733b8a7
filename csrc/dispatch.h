// Dtype switch over the three supported element types (float32, bfloat16, float16).
#pragma once

#include <ATen/core/Tensor.h>

#define HARMONY_CASE_TYPE(enum_type, cpp_type, NAME, ...) \
  case enum_type: {                                       \
    using NAME = cpp_type;                                \
    __VA_ARGS__;                                          \
    break;                                                \
  }

// HARMONY_DISPATCH(dtype, "op", T, body): runs body with T = float, c10::BFloat16 or c10::Half.
#define HARMONY_DISPATCH(dtype, op, NAME, ...)                                                  \
  switch (dtype) {                                                                              \
    HARMONY_CASE_TYPE(at::kFloat, float, NAME, __VA_ARGS__)                                     \
    HARMONY_CASE_TYPE(at::kBFloat16, c10::BFloat16, NAME, __VA_ARGS__)                          \
    HARMONY_CASE_TYPE(at::kHalf, c10::Half, NAME, __VA_ARGS__)                                  \
    default:                                                                                    \
      TORCH_CHECK(false, op, ": dtype ", dtype, " is not supported (float32, bfloat16, float16)"); \
  }
