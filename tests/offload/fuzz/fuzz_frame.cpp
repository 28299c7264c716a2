// libFuzzer target for the offload frame decoder: any byte string must either decode or be refused
// with Error(protocol) -- never crash, read out of bounds (ASan), overflow (UBSan) or throw
// anything else. Inputs are tried as a whole frame and as the payload of every message type.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "offload/protocol.hpp"

using namespace longattn;
using namespace longattn::offload;

template <class F>
static void refused_or_fine(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    if (e.code() != ErrorCode::protocol) std::abort();  // the decoder may only say "protocol"
  }
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  Limits lim;
  lim.max_payload = 1u << 20;
  refused_or_fine([&] { validate_frame(in, lim); });
  refused_or_fine([&] { (void)decode_hello(in, lim); });
  refused_or_fine([&] { (void)decode_hello_reply(in, lim); });
  refused_or_fine([&] { (void)decode_open(in, lim); });
  refused_or_fine([&] { (void)decode_append(in, lim); });
  refused_or_fine([&] { (void)decode_append_reply(in, lim); });
  refused_or_fine([&] { (void)decode_attend(in, lim); });
  refused_or_fine([&] { (void)decode_attend_reply(in, lim); });
  refused_or_fine([&] { (void)decode_append_attend(in, lim); });
  refused_or_fine([&] { (void)decode_drop(in, lim); });
  refused_or_fine([&] { (void)decode_export(in, lim); });
  refused_or_fine([&] { (void)decode_export_reply(in, lim); });
  refused_or_fine([&] { (void)decode_error(in, lim); });
  return 0;
}
