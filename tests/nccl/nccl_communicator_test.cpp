// The NCCL communicator under mpirun, one GPU per rank: point to point around a ring on device
// buffers, batched posts, all-to-all(v) with uneven counts, sub-communicators, and a peer that never
// answers (a timeout with a clear error, not a hang). Skips where fewer GPUs than ranks are visible
// (NCCL refuses two ranks on one GPU), so it is part of `make test` everywhere and runs for real on a
// machine with several GPUs: `mpirun -np 2 build/bin/test_nccl`.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <chrono>
#include <cstdlib>
#include <random>
#include <vector>

#include "longattn/communicator.hpp"
#include "longattn/error.hpp"

namespace longattn {
namespace {

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

std::unique_ptr<Communicator> world() { return make_mpi_world_communicator(); }

// Why this process cannot run the suite, or empty. Every rank decides the same way (the smallest
// device count wins), so no rank is left waiting in a collective the others skipped.
std::string skip_reason(Communicator& host) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  std::int64_t least = devices;
  host.allreduce(&least, 1, ReduceType::i64, ReduceOp::min);
  if (!nccl_available() || least == 0) return "no CUDA device visible (or no NCCL in this build)";
  if (host.topology().local_size > least)
    return "fewer GPUs than ranks on this node (" + std::to_string(least) + " for " + std::to_string(host.topology().local_size) +
           "); NCCL needs one GPU per rank";
  return {};
}

#define SKIP_WITHOUT_GPUS(host)              \
  do {                                       \
    const auto why_ = skip_reason(host);     \
    if (!why_.empty()) GTEST_SKIP() << why_; \
  } while (0)

// A fresh seed per run, the same on every rank (each rank derives its own bytes from it and can
// therefore predict what any peer sent).
std::uint64_t shared_seed(Communicator& host) {
  std::uint64_t seed = std::random_device{}();
  host.broadcast(&seed, sizeof seed, 0);
  return seed;
}

std::vector<std::uint8_t> bytes_of(std::uint64_t seed, int from, int to, std::size_t n) {
  std::mt19937_64 g(seed ^ (static_cast<std::uint64_t>(from) * 0x9E3779B97F4A7C15ULL) ^ (static_cast<std::uint64_t>(to) << 17));
  std::vector<std::uint8_t> v(n);
  for (auto& b : v) b = static_cast<std::uint8_t>(g());
  return v;
}

struct DeviceBytes {
  void* ptr = nullptr;
  explicit DeviceBytes(std::size_t n) {
    if (cudaMalloc(&ptr, n ? n : 1) != cudaSuccess) throw Error(ErrorCode::out_of_capacity, "cudaMalloc failed in the test");
  }
  ~DeviceBytes() { cudaFree(ptr); }
  char* get() const { return static_cast<char*>(ptr); }
};

TEST(NcclCommunicator, RingSendReceiveCarriesEveryByteOnDeviceBuffers) {
  auto host = world();
  SKIP_WITHOUT_GPUS(*host);
  auto nccl = make_nccl_communicator(*host);
  EXPECT_EQ(nccl->backend_name(), "nccl");
  const int r = nccl->rank(), p = nccl->size();
  const int next = (r + 1) % p, prev = (r - 1 + p) % p;
  const std::uint64_t seed = shared_seed(*host);
  const std::size_t n = 1000003;  // odd, not a multiple of any vector width
  const auto out = bytes_of(seed, r, next, n);
  DeviceBytes send(n), recv(n);
  cudaStream_t s;
  CUDA_OK(cudaStreamCreate(&s));
  CUDA_OK(cudaMemcpyAsync(send.get(), out.data(), n, cudaMemcpyHostToDevice, s));
  CUDA_OK(cudaMemsetAsync(recv.get(), 0xA5, n, s));
  // One batch with both directions, as the ring posts it (deadlock-free whatever the rank order).
  auto req = nccl->post({{P2POp::Kind::send, send.get(), n, next, 0}, {P2POp::Kind::recv, recv.get(), n, prev, 0}}, s);
  req->wait();  // stream-ordered: the copy below runs after the transfer
  std::vector<std::uint8_t> in(n);
  CUDA_OK(cudaMemcpyAsync(in.data(), recv.get(), n, cudaMemcpyDeviceToHost, s));
  nccl->synchronize(s);
  CUDA_OK(cudaStreamSynchronize(s));
  EXPECT_EQ(in, bytes_of(seed, prev, r, n));
  CUDA_OK(cudaStreamDestroy(s));
}

TEST(NcclCommunicator, AllToAllWithUnevenAndEmptyCounts) {
  auto host = world();
  SKIP_WITHOUT_GPUS(*host);
  auto nccl = make_nccl_communicator(*host);
  const int r = nccl->rank(), p = nccl->size();
  const std::uint64_t seed = shared_seed(*host);
  auto count = [](int from, int to) { return static_cast<std::size_t>(((from * 3 + to * 5) % 7) * 4099); };  // zeros included
  const auto up = static_cast<std::size_t>(p);
  std::vector<std::size_t> sb(up), so(up), rb(up), ro(up);
  std::size_t st = 0, rt = 0;
  std::vector<std::uint8_t> send_host;
  for (int q = 0; q < p; ++q) {
    const auto uq = static_cast<std::size_t>(q);
    sb[uq] = count(r, q), so[uq] = st, st += sb[uq];
    rb[uq] = count(q, r), ro[uq] = rt, rt += rb[uq];
    const auto part = bytes_of(seed, r, q, sb[uq]);
    send_host.insert(send_host.end(), part.begin(), part.end());
  }
  DeviceBytes send(st), recv(rt);
  CUDA_OK(cudaMemcpy(send.get(), send_host.data(), st, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(recv.get(), 0x5A, rt ? rt : 1));
  nccl->alltoallv(send.get(), sb, so, recv.get(), rb, ro, nullptr);
  nccl->synchronize(nullptr);
  std::vector<std::uint8_t> in(rt);
  CUDA_OK(cudaMemcpy(in.data(), recv.get(), rt, cudaMemcpyDeviceToHost));
  for (int q = 0; q < p; ++q) {
    const auto uq = static_cast<std::size_t>(q);
    const auto want = bytes_of(seed, q, r, rb[uq]);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), in.begin() + static_cast<std::ptrdiff_t>(ro[uq]))) << "bytes from rank " << q;
  }
}

TEST(NcclCommunicator, SplitRenumbersRanksAndCarriesData) {
  auto host = world();
  SKIP_WITHOUT_GPUS(*host);
  auto nccl = make_nccl_communicator(*host);
  // One group, ranks in reverse order: sub rank = p - 1 - world rank.
  auto sub = nccl->split(0, nccl->size() - 1 - nccl->rank());
  ASSERT_EQ(sub->size(), nccl->size());
  ASSERT_EQ(sub->rank(), nccl->size() - 1 - nccl->rank());
  const int r = sub->rank(), p = sub->size();
  const std::size_t n = 65537;
  const std::uint64_t seed = shared_seed(*host);
  DeviceBytes send(n), recv(n);
  const auto out = bytes_of(seed, r, (r + 1) % p, n);
  CUDA_OK(cudaMemcpy(send.get(), out.data(), n, cudaMemcpyHostToDevice));
  sub->post({{P2POp::Kind::send, send.get(), n, (r + 1) % p, 0}, {P2POp::Kind::recv, recv.get(), n, (r - 1 + p) % p, 0}}, nullptr)->wait();
  sub->synchronize(nullptr);
  std::vector<std::uint8_t> in(n);
  CUDA_OK(cudaMemcpy(in.data(), recv.get(), n, cudaMemcpyDeviceToHost));
  EXPECT_EQ(in, bytes_of(seed, (r - 1 + p) % p, r, n));
}

TEST(NcclCommunicator, PeerOutsideTheCommunicatorIsRefused) {
  auto host = world();
  SKIP_WITHOUT_GPUS(*host);
  auto nccl = make_nccl_communicator(*host);
  DeviceBytes buf(16);
  EXPECT_THROW(nccl->isend(buf.get(), 16, nccl->size(), 0, nullptr), Error);
  EXPECT_THROW(nccl->irecv(buf.get(), 16, -1, 0, nullptr), Error);
}

// Last on purpose: the communicator of rank 0 ends aborted. Rank 0 sends to rank 1, which never
// receives: the post (whose first use of a peer must connect to it) or synchronize() must give up
// after the communicator's timeout with a timeout error that says what to check, instead of hanging the
// job; later use of that communicator is refused, and both ranks leave cleanly (no hang in the
// destructors either).
TEST(NcclCommunicator, PeerThatNeverReceivesIsATimeoutNotAHang) {
  auto host = world();
  SKIP_WITHOUT_GPUS(*host);
  if (host->size() < 2) GTEST_SKIP() << "needs two ranks";
  {
    auto nccl = make_nccl_communicator(*host);
    // Rank 0 gives up fast; the others wait longer for it at the barrier below.
    nccl->set_timeout(std::chrono::seconds(host->rank() == 0 ? 3 : 20));
    const std::size_t n = std::size_t{256} << 20;  // far above any eager buffer: cannot complete alone
    DeviceBytes buf(n);
    CUDA_OK(cudaMemset(buf.get(), 1, n));
    if (nccl->rank() == 0) {
      const auto t0 = std::chrono::steady_clock::now();
      try {
        auto req = nccl->isend(buf.get(), n, 1, 0, nullptr);
        nccl->synchronize(nullptr);
        ADD_FAILURE() << "a send nobody receives completed";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::timeout) << e.what();
        EXPECT_NE(std::string(e.what()).find("LONGATTN_COMM_TIMEOUT_S"), std::string::npos) << e.what();
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_GE(s, 2.5) << "gave up before the deadline";
      EXPECT_LT(s, 30.0) << "the timeout took " << s << " s";
      EXPECT_THROW(nccl->isend(buf.get(), 16, 1, 0, nullptr), Error);  // the communicator is gone
    }
    host->barrier();
  }
}

}  // namespace
}  // namespace longattn
