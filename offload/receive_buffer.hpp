// A connection's payload buffer, its capacity counted against the server's memory limit (through
// FrameService), so that what peers announce in frame headers can never take the server past
// --memory-limit. Reused between frames while a peer streams (bulk appends then do not fault in a
// fresh buffer per frame); given back when it is large and the peer has gone quiet.
#pragma once

#include <cstddef>
#include <vector>

#include "offload/transport.hpp"

namespace longattn::offload {

// Buffers up to this size are kept between frames whatever the peer does.
inline constexpr std::size_t kKeepReceiveBufferBytes = std::size_t{1} << 20;
// A payload that did not fit is read and thrown away in pieces of this size.
inline constexpr std::size_t kDiscardPieceBytes = std::size_t{64} << 10;

class ReceiveBuffer {
 public:
  explicit ReceiveBuffer(FrameService& service) : service_(&service) {}
  ~ReceiveBuffer() { release(); }
  ReceiveBuffer(const ReceiveBuffer&) = delete;
  ReceiveBuffer& operator=(const ReceiveBuffer&) = delete;

  // Sizes the buffer for a payload of `bytes`; throws Error(out_of_capacity) when the memory limit
  // has no room for it (the buffer is then empty and nothing is counted).
  std::vector<std::byte>& size_for(std::size_t bytes);
  std::vector<std::byte>& bytes() noexcept { return data_; }
  // Between frames: gives a large buffer back unless `more_waiting` (the next frame has arrived).
  void settle(bool more_waiting) noexcept;
  void release() noexcept;

 private:
  FrameService* service_;
  std::vector<std::byte> data_;
  std::size_t counted_ = 0;  // >= data_.capacity(); more while a payload taken by the service may still be alive
};

}  // namespace longattn::offload
