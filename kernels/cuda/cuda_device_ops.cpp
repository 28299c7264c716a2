// Device operations on CUDA memory: what the "cuda" and "cudnn" backends run on. Everything joins
// the caller's stream; the element-wise kernels are elementwise.cu's.
#include "common/check.hpp"
#include "kernels/cuda/cuda_backends.hpp"
#include "kernels/cuda/cuda_common.hpp"
#include "kernels/cuda/flash_params.hpp"

namespace longattn::kernels {
namespace cuda {

CudaDeviceBuffer::CudaDeviceBuffer(std::size_t bytes) : bytes_(bytes) {
  if (bytes > 0) LONGATTN_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
}
CudaDeviceBuffer::~CudaDeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}

}  // namespace cuda

namespace {

using namespace cuda;

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

class CudaDeviceOps final : public DeviceOps {
 public:
  std::unique_ptr<DeviceBuffer> allocate(std::size_t bytes) override { return std::make_unique<CudaDeviceBuffer>(bytes); }
  void fill(TensorView dst, float value, void* stream) override {
    launch_fill(dst.data, dst.dtype, dst.numel(), value, as_stream(stream));
  }
  void add_into(TensorView dst, TensorView src, void* stream) override {
    LONGATTN_INVALID(dst.dtype == DType::f32 && dst.numel() == src.numel(), "add_into: dst {} must be fp32 and match src {}",
                     dst.describe(), src.describe());
    launch_add_into(dst.as<float>(), src.data, src.dtype, dst.numel(), as_stream(stream));
  }
  void convert(TensorView dst, TensorView src, void* stream) override {
    LONGATTN_INVALID(dst.numel() == src.numel(), "convert: {} and {} differ in size", dst.describe(), src.describe());
    if (dst.dtype == src.dtype) {
      copy_bytes(dst.data, src.data, dst.bytes(), stream);
    } else {
      launch_convert(dst.data, dst.dtype, src.data, src.dtype, dst.numel(), as_stream(stream));
    }
  }
  void copy_bytes(void* dst, const void* src, std::size_t bytes, void* stream) override {
    if (bytes == 0) return;
    LONGATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(stream)));
  }
  void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
               std::size_t rows, void* stream) override {
    if (width == 0 || rows == 0) return;
    LONGATTN_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, cudaMemcpyDefault, as_stream(stream)));
  }
  void synchronize(void* stream) override { LONGATTN_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream))); }
};

}  // namespace

DeviceOps& cuda_device_ops() {
  static CudaDeviceOps ops;
  return ops;
}

}  // namespace longattn::kernels
