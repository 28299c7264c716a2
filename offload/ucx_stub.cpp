// The UCX transport where longattn was built without UCX: every factory says so.
#include "offload/transport.hpp"

namespace longattn::offload {

bool ucx_available() noexcept { return false; }

std::unique_ptr<ServerTransport> make_ucx_server(const std::string&, int, FrameService&) {
  throw Error(ErrorCode::unsupported, "transport 'ucx' is not available in this build (built without UCX headers); use tcp");
}

std::unique_ptr<UcxClientEngine> make_ucx_client(std::function<void(std::function<void()>)>) {
  throw Error(ErrorCode::unsupported, "transport 'ucx' is not available in this build (built without UCX headers); use tcp");
}

}  // namespace longattn::offload
