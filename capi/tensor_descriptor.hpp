// C tensor descriptors to C++ tensor views, with the checks the kernels rely on (a known dtype
// and device, 1..4 dimensions, memory where there are elements, dense row-major strides).
#pragma once

#include <string>

#include "longattn/longattn.h"
#include "longattn/tensor.hpp"

namespace longattn::capi {

// The C enums' values (read with enum_value) as C++ types; Error(invalid_argument) on a value
// outside the enum.
DType to_dtype(int dtype);
Device to_device(const longattn_device& d);

// Empty when `desc` can be read as a TensorView, else what is wrong with it and what to do,
// naming the tensor `name`. A null `desc` is a problem too.
std::string descriptor_problem(const char* name, const longattn_tensor* desc);

// The view of a descriptor that descriptor_problem() accepted.
TensorView to_view(const longattn_tensor& desc);

}  // namespace longattn::capi
