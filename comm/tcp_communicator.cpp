// The TCP communicator: launch without MPI (torchrun, or any launcher that sets torchrun's
// variables). Host memory only; point to point over the transport's mesh, collectives through
// rank 0 of the communicator (gather, then send back), which is plenty for the small agreement
// and bootstrap messages they carry here (the NCCL unique id, argument checks).
#include <algorithm>
#include <cerrno>
#include <climits>
#include <optional>
#include <cstdlib>
#include <cstring>

#include "comm/tcp_transport.hpp"
#include "common/check.hpp"
#include "longattn/communicator.hpp"
#include "longattn/config.hpp"
#include "longattn/log.hpp"

namespace longattn {
namespace comm {
namespace {

// Outside any tag a caller uses, so collectives never match a caller's pending message.
constexpr int kCollectiveTag = INT_MIN + 1;

std::uint64_t mix(std::uint64_t x) {  // splitmix64's finalizer: distinct ids for distinct splits
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

class TcpRequest final : public CommRequest {
 public:
  TcpRequest(std::shared_ptr<TcpTransport> transport, std::shared_ptr<TcpOperation> op, std::string what, int peer,
             std::chrono::seconds timeout)
      : transport_(std::move(transport)), op_(std::move(op)), what_(std::move(what)), peer_(peer), timeout_(timeout) {}
  ~TcpRequest() override { transport_->cancel(op_); }
  void wait() override { transport_->wait(op_, timeout_, what_, peer_); }
  bool test() override { return transport_->test(op_); }

 private:
  std::shared_ptr<TcpTransport> transport_;
  std::shared_ptr<TcpOperation> op_;
  std::string what_;
  int peer_;
  std::chrono::seconds timeout_;
};

class TcpCommunicator final : public Communicator {
 public:
  TcpCommunicator(std::shared_ptr<TcpTransport> transport, std::uint64_t id, std::vector<int> members)
      : transport_(std::move(transport)), id_(id), members_(std::move(members)) {
    rank_ = static_cast<int>(std::find(members_.begin(), members_.end(), transport_->rank()) - members_.begin());
    topology_ = discover_topology();
  }
  // The last communicator over the transport decides how long its teardown may wait for peers.
  ~TcpCommunicator() override { transport_->set_teardown_bound(timeout()); }
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(members_.size()); }
  std::string backend_name() const override { return "tcp"; }
  Topology topology() const override { return topology_; }

  Request isend(const void* buf, std::size_t bytes, int peer, int tag, void*) override {
    const int global = global_rank(peer);
    return std::make_unique<TcpRequest>(transport_, transport_->send(id_, global, tag, buf, bytes),
                                        fmt::format("send of {} bytes (tag {}) to", bytes, tag), global, timeout());
  }
  Request irecv(void* buf, std::size_t bytes, int peer, int tag, void*) override {
    const int global = global_rank(peer);
    return std::make_unique<TcpRequest>(transport_, transport_->receive(id_, global, tag, buf, bytes),
                                        fmt::format("receive of {} bytes (tag {}) from", bytes, tag), global, timeout());
  }

  void allreduce(void* buf, std::size_t count, ReduceType type, ReduceOp op) override {
    const std::size_t esize = type == ReduceType::f32 ? 4 : 8;
    const auto all = gather_at_root(buf, count * esize);
    if (rank_ == 0) {
      auto reduce = [&](auto* out, auto zero) {
        using T = decltype(zero);
        for (int r = 1; r < size(); ++r) {
          const auto* x = reinterpret_cast<const T*>(all.data() + static_cast<std::size_t>(r) * count * esize);
          for (std::size_t i = 0; i < count; ++i)
            out[i] = op == ReduceOp::sum ? out[i] + x[i] : op == ReduceOp::max ? std::max(out[i], x[i]) : std::min(out[i], x[i]);
        }
      };
      if (type == ReduceType::f32) reduce(static_cast<float*>(buf), float{});
      else if (type == ReduceType::f64) reduce(static_cast<double*>(buf), double{});
      else reduce(static_cast<std::int64_t*>(buf), std::int64_t{});
    }
    broadcast(buf, count * esize, 0);
  }
  void allgather(const void* send, void* recv, std::size_t bytes_each) override {
    auto all = gather_at_root(send, bytes_each);
    if (rank_ == 0 && !all.empty()) std::memcpy(recv, all.data(), all.size());
    broadcast(recv, bytes_each * static_cast<std::size_t>(size()), 0);
  }
  void broadcast(void* buf, std::size_t bytes, int root) override {
    LONGATTN_INVALID(root >= 0 && root < size(), "broadcast root {} is outside [0, {})", root, size());
    if (rank_ == root) {
      std::vector<Request> sends;
      for (int r = 0; r < size(); ++r)
        if (r != root) sends.push_back(isend(buf, bytes, r, kCollectiveTag, nullptr));
      for (auto& s : sends) s->wait();
    } else {
      irecv(buf, bytes, root, kCollectiveTag, nullptr)->wait();
    }
  }
  void barrier() override {
    std::int64_t nothing = 0;
    allreduce(&nothing, 1, ReduceType::i64, ReduceOp::sum);
  }

  std::unique_ptr<Communicator> split(int color, int key) const override {
    std::int64_t mine[3] = {color, key, rank_};
    std::vector<std::int64_t> all(3 * static_cast<std::size_t>(size()));
    const_cast<TcpCommunicator*>(this)->allgather(mine, all.data(), sizeof mine);
    std::vector<std::tuple<std::int64_t, std::int64_t, int>> chosen;  // key, rank, global rank
    for (int r = 0; r < size(); ++r) {
      const auto* v = all.data() + 3 * static_cast<std::size_t>(r);
      if (v[0] == color) chosen.emplace_back(v[1], v[2], members_[static_cast<std::size_t>(r)]);
    }
    std::sort(chosen.begin(), chosen.end());
    std::vector<int> members;
    for (const auto& c : chosen) members.push_back(std::get<2>(c));
    const std::uint64_t child = mix(id_ ^ mix(static_cast<std::uint64_t>(splits_) * 0x10001ULL + static_cast<std::uint32_t>(color)));
    ++splits_;
    auto sub = std::make_unique<TcpCommunicator>(transport_, child, std::move(members));
    sub->set_timeout(timeout());
    return sub;
  }

 private:
  int global_rank(int peer) const {
    LONGATTN_INVALID(peer >= 0 && peer < size(), "peer rank {} is outside [0, {})", peer, size());
    return members_[static_cast<std::size_t>(peer)];
  }

  // Every rank's `bytes` at rank 0 in rank order (empty elsewhere).
  std::vector<char> gather_at_root(const void* mine, std::size_t bytes) {
    if (rank_ != 0) {
      isend(mine, bytes, 0, kCollectiveTag, nullptr)->wait();
      return {};
    }
    std::vector<char> all(bytes * static_cast<std::size_t>(size()));
    if (bytes) std::memcpy(all.data(), mine, bytes);
    std::vector<Request> receives;
    for (int r = 1; r < size(); ++r) receives.push_back(irecv(all.data() + static_cast<std::size_t>(r) * bytes, bytes, r, kCollectiveTag, nullptr));
    for (auto& q : receives) q->wait();
    return all;
  }

  // Nodes are the members' host names in order of first appearance; LONGATTN_NODE_SIZE groups
  // consecutive ranks instead, to simulate nodes on one machine.
  Topology discover_topology() const {
    const int n = size();
    if (const long node_size = env_int("LONGATTN_NODE_SIZE"); node_size > 0) {
      const int ns = static_cast<int>(node_size);
      return {rank_ / ns, (n + ns - 1) / ns, rank_ % ns, std::min(ns, n - rank_ / ns * ns)};
    }
    std::vector<std::string> hosts;
    for (int g : members_) hosts.push_back(transport_->hostnames()[static_cast<std::size_t>(g)]);
    std::vector<std::string> distinct;
    for (const auto& h : hosts)
      if (std::find(distinct.begin(), distinct.end(), h) == distinct.end()) distinct.push_back(h);
    const auto& mine = hosts[static_cast<std::size_t>(rank_)];
    Topology t;
    t.nodes = static_cast<int>(distinct.size());
    t.node = static_cast<int>(std::find(distinct.begin(), distinct.end(), mine) - distinct.begin());
    t.local_size = static_cast<int>(std::count(hosts.begin(), hosts.end(), mine));
    t.local_rank = static_cast<int>(std::count(hosts.begin(), hosts.begin() + rank_, mine));
    return t;
  }

  std::shared_ptr<TcpTransport> transport_;
  std::uint64_t id_;
  std::vector<int> members_;  // global ranks, in this communicator's rank order
  int rank_ = 0;
  Topology topology_;
  mutable long splits_ = 0;
};

// An integer variable of torchrun's; Error(invalid_argument) naming it when missing or malformed.
std::optional<long> env_integer(const char* name, bool required, long lowest, long highest, const char* range) {
  const char* text = std::getenv(name);
  if (!text || !*text) {
    LONGATTN_REQUIRE(!required, ErrorCode::invalid_argument,
                     "{} is not set: launch with torchrun (which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE), or set "
                     "them for every process", name);
    return std::nullopt;
  }
  errno = 0;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  LONGATTN_REQUIRE(errno == 0 && end && *end == '\0' && value >= lowest && value <= highest, ErrorCode::invalid_argument,
                   "{}='{}' is not an integer in {}", name, text, range);
  return value;
}

}  // namespace
}  // namespace comm

bool torchrun_environment_present() {
  for (const char* name : {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"}) {
    const char* v = std::getenv(name);
    if (!v || !*v) return false;
  }
  return true;
}

TcpRendezvous tcp_rendezvous_from_env(int port_offset) {
  TcpRendezvous where;
  const char* addr = std::getenv("MASTER_ADDR");
  LONGATTN_REQUIRE(addr && *addr, ErrorCode::invalid_argument,
                   "MASTER_ADDR is not set: launch with torchrun (which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE), "
                   "or set them for every process");
  where.master_addr = addr;
  const long world = *comm::env_integer("WORLD_SIZE", true, 1, 1 << 20, "[1, 1048576]");
  where.world_size = static_cast<int>(world);
  where.rank = static_cast<int>(*comm::env_integer("RANK", true, 0, world - 1, fmt::format("[0, WORLD_SIZE={})", world).c_str()));
  const long port = *comm::env_integer("MASTER_PORT", true, 1, 65535, "[1, 65535]");
  LONGATTN_INVALID(port_offset >= 0 && port + port_offset <= 65535,
                   "MASTER_PORT={} plus the port offset {} is not a TCP port: choose a MASTER_PORT below {}", port, port_offset,
                   65535 - std::max(port_offset, 0) + 1);
  where.master_port = static_cast<int>(port + port_offset);
  if (auto local_size = comm::env_integer("LOCAL_WORLD_SIZE", false, 1, world, fmt::format("[1, WORLD_SIZE={}]", world).c_str())) {
    where.local_world_size = static_cast<int>(*local_size);
    if (auto local = comm::env_integer("LOCAL_RANK", false, 0, *local_size - 1, fmt::format("[0, LOCAL_WORLD_SIZE={})", *local_size).c_str()))
      where.local_rank = static_cast<int>(*local);
  } else if (auto local = comm::env_integer("LOCAL_RANK", false, 0, world - 1, fmt::format("[0, WORLD_SIZE={})", world).c_str())) {
    where.local_rank = static_cast<int>(*local);
  }
  return where;
}

std::unique_ptr<Communicator> make_tcp_communicator(const TcpRendezvous& where) {
  // The timeout is the base class's (LONGATTN_COMM_TIMEOUT_S): read it before the mesh is built,
  // so that the rendezvous is bounded by it too.
  const std::chrono::seconds timeout(env_int("LONGATTN_COMM_TIMEOUT_S"));
  set_log_rank(where.rank);
  auto io = std::make_unique<boost::asio::io_context>();
  auto mesh = comm::build_mesh(*io, where, timeout);
  auto transport = std::make_shared<comm::TcpTransport>(std::move(io), std::move(mesh));
  std::vector<int> everyone(static_cast<std::size_t>(where.world_size));
  for (int r = 0; r < where.world_size; ++r) everyone[static_cast<std::size_t>(r)] = r;
  auto world = std::make_unique<comm::TcpCommunicator>(std::move(transport), 1, std::move(everyone));
  const Topology t = world->topology();
  if (where.local_world_size > 0 && where.local_world_size != t.local_size)
    logger(Subsystem::comm).warn("LOCAL_WORLD_SIZE={} but {} ranks share this host name; the host names decide the nodes "
                                 "(LONGATTN_NODE_SIZE overrides both)", where.local_world_size, t.local_size);
  logger(Subsystem::comm).debug("TCP communicator: rank {}/{}, node {}/{}", where.rank, where.world_size, t.node, t.nodes);
  return world;
}

std::unique_ptr<Communicator> make_tcp_communicator_from_env(int port_offset) {
  return make_tcp_communicator(tcp_rendezvous_from_env(port_offset));
}

}  // namespace longattn
