// Where a call's runtime dtype and head dim become the template arguments of the kernels built for
// them (16-bit inputs; head dims 64 and 128), so each launcher lists its instantiations once.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/check.hpp"
#include "longattn/tensor.hpp"

namespace longattn::kernels::cuda {

// launch.template operator()<T>() with T the element type of a 16-bit dtype: bf16, else fp16 (the
// backends admit nothing else to these kernels).
template <class Launch>
void dispatch_16bit(DType dtype, Launch&& launch) {
  if (dtype == DType::bf16) launch.template operator()<__nv_bfloat16>();
  else launch.template operator()<__half>();
}

// launch.template operator()<T, D>() for the head dims that are built.
template <class Launch>
void dispatch_16bit_head_dim(DType dtype, int head_dim, Launch&& launch) {
  if (head_dim != 64 && head_dim != 128) throw_unsupported("cuda attention: only head_dim 64 and 128 are built");
  dispatch_16bit(dtype, [&]<class T>() {
    if (head_dim == 64) launch.template operator()<T, 64>();
    else launch.template operator()<T, 128>();
  });
}

}  // namespace longattn::kernels::cuda
