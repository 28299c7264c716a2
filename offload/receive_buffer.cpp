// Counted receive buffers (see receive_buffer.hpp).
#include "offload/receive_buffer.hpp"

namespace longattn::offload {

std::vector<std::byte>& ReceiveBuffer::size_for(std::size_t bytes) {
  if (bytes > data_.capacity()) {
    // Free the old buffer before counting the new one: growing in place could hold both, and
    // resizing an existing vector may round its capacity up past what was counted.
    release();
    service_->reserve_receive_buffer(bytes);
    counted_ = bytes;
  }
  data_.resize(bytes);
  return data_;
}

void ReceiveBuffer::settle(bool more_waiting) noexcept {
  if (counted_ > kKeepReceiveBufferBytes && !more_waiting) release();
}

void ReceiveBuffer::release() noexcept {
  std::vector<std::byte>().swap(data_);
  if (counted_ > 0) service_->release_receive_buffer(counted_);
  counted_ = 0;
}

}  // namespace longattn::offload
