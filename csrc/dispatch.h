// dtype dispatch for every kernel entry point, in one place: float64, float32, float16, bfloat16.
#pragma once

#include <ATen/Dispatch.h>

#define SA_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                           \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, \
                                  __VA_ARGS__)
