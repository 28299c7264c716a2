// The TCP communicator as torchrun launches it: each test starts N = 2..4 processes of this binary
// with torchrun's variables (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
// LOCAL_WORLD_SIZE) and a scenario; each process runs the one test TcpLaunched.Worker (registered
// only in such processes, see main), which makes the
// communicator from the environment and checks one scenario: every operation of the interface,
// ring attention and every ParallelAttention strategy against the double reference, a peer that
// dies or hangs (an Error naming it, not a hang), communicators made and destroyed 30 times at once
// (and with a peer already gone or stopped from reading), a rendezvous that cannot complete. Bad
// environments are checked in this process.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "longattn/communicator.hpp"
#include "longattn/error.hpp"
#include "longattn/longattn.h"
#include "longattn/parallel_attention.hpp"
#include "support/ring_check.hpp"
#include "support/test_util.hpp"

namespace longattn {
namespace {

constexpr const char* kScenarioVariable = "TCP_TEST_SCENARIO";  // what a launched worker checks

// A TCP port nobody listens on now (the system's choice for a socket bound to port 0).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

struct Launch {
  Launch(int world_size, std::string what, std::vector<int> started = {})
      : world(world_size), scenario(std::move(what)), ranks(std::move(started)) {}
  int world;
  std::string scenario;
  std::vector<int> ranks;                           // which ranks to start (all when empty)
  std::map<int, std::map<std::string, std::string>> env_of;  // extra variables per rank
  std::map<std::string, std::string> env;           // extra variables for all
  std::vector<std::string> program;                 // another program instead of this binary's worker
  std::string rank0_stdout;                         // where rank 0's output goes (empty: inherited)
};

// Starts the ranks as processes of this binary and returns their exit codes (-1: killed after
// the deadline, which fails the test: a hang is exactly what must not happen).
std::vector<int> run(const Launch& l) {
  const int master_port = free_port() - 1;  // the rendezvous is at MASTER_PORT + 1
  std::vector<int> ranks = l.ranks;
  if (ranks.empty())
    for (int r = 0; r < l.world; ++r) ranks.push_back(r);
  std::vector<pid_t> children;
  for (int r : ranks) {
    const pid_t pid = fork();
    if (pid == 0) {
      std::map<std::string, std::string> vars{{"MASTER_ADDR", "127.0.0.1"},
                                              {"MASTER_PORT", std::to_string(master_port)},
                                              {"RANK", std::to_string(r)},
                                              {"WORLD_SIZE", std::to_string(l.world)},
                                              {"LOCAL_RANK", std::to_string(r)},
                                              {"LOCAL_WORLD_SIZE", std::to_string(l.world)},
                                              {"OMP_NUM_THREADS", "1"},
                                              {kScenarioVariable, l.scenario}};
      for (const auto& [k, v] : l.env) vars[k] = v;
      if (auto it = l.env_of.find(r); it != l.env_of.end())
        for (const auto& [k, v] : it->second) vars[k] = v;
      for (const auto& [k, v] : vars) setenv(k.c_str(), v.c_str(), 1);
      if (r == 0 && !l.rank0_stdout.empty()) {
        const int fd = ::open(l.rank0_stdout.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        ::dup2(fd, STDOUT_FILENO);
      }
      if (!l.program.empty()) {
        std::vector<char*> args;
        for (const auto& a : l.program) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        execv(args[0], args.data());
        std::_Exit(127);
      }
      const char* argv[] = {"/proc/self/exe", "--gtest_brief=1", nullptr};
      execv("/proc/self/exe", const_cast<char* const*>(argv));
      std::_Exit(127);
    }
    children.push_back(pid);
  }
  std::vector<int> codes(children.size(), -1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(180);
  std::size_t left = children.size();
  while (left > 0 && std::chrono::steady_clock::now() < deadline) {
    for (std::size_t i = 0; i < children.size(); ++i) {
      if (codes[i] != -1 || children[i] == 0) continue;
      int status = 0;
      if (waitpid(children[i], &status, WNOHANG) == children[i]) {
        codes[i] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        children[i] = 0;
        --left;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (std::size_t i = 0; i < children.size(); ++i)
    if (children[i] != 0) {
      kill(children[i], SIGKILL);
      waitpid(children[i], nullptr, 0);
      ADD_FAILURE() << "rank " << ranks[i] << " of scenario " << l.scenario << " hung and was killed";
    }
  return codes;
}

void expect_all_passed(const std::vector<int>& codes, const std::string& scenario) {
  for (std::size_t i = 0; i < codes.size(); ++i) EXPECT_EQ(codes[i], 0) << "process " << i << " of scenario " << scenario;
}

// ---- What the launched processes check, by scenario --------------------------------------------

std::uint64_t shared_seed(Communicator& comm) {
  std::uint64_t seed = test::fresh_seed();
  comm.broadcast(&seed, sizeof seed, 0);
  return seed;
}

// Bytes rank `from` sends to rank `to` in message `m`: reproducible on both sides.
std::vector<char> message(std::uint64_t seed, int from, int to, int m, std::size_t bytes) {
  std::mt19937_64 rng(seed ^ (static_cast<std::uint64_t>(from) << 40) ^ (static_cast<std::uint64_t>(to) << 20) ^ static_cast<std::uint64_t>(m));
  std::vector<char> out(bytes);
  for (auto& c : out) c = static_cast<char>(rng());
  return out;
}

void check_operations(Communicator& comm) {
  const int P = comm.size(), r = comm.rank();
  EXPECT_EQ(comm.backend_name(), "tcp");
  const Topology t = comm.topology();  // one host: one node of every rank
  EXPECT_EQ(t.nodes, 1);
  EXPECT_EQ(t.local_rank, r);
  EXPECT_EQ(t.local_size, P);
  const auto seed = shared_seed(comm);

  // Ring exchange, several messages of one tag (order kept), an empty one and a large one.
  const int next = (r + 1) % P, prev = (r + P - 1) % P;
  const std::vector<std::size_t> sizes{0, 1, 4096, 3u << 20};
  std::vector<std::vector<char>> got(sizes.size());
  std::vector<Request> reqs;
  for (std::size_t m = 0; m < sizes.size(); ++m) {
    got[m].resize(sizes[m]);
    reqs.push_back(comm.irecv(got[m].data(), sizes[m], prev, 5, nullptr));
  }
  for (std::size_t m = 0; m < sizes.size(); ++m) {
    const auto bytes = message(seed, r, next, static_cast<int>(m), sizes[m]);
    comm.isend(bytes.data(), bytes.size(), next, 5, nullptr)->wait();  // the send copies: the buffer may go
  }
  for (auto& q : reqs) q->wait();
  for (std::size_t m = 0; m < sizes.size(); ++m) EXPECT_EQ(got[m], message(seed, prev, r, static_cast<int>(m), sizes[m])) << "message " << m;

  // To itself.
  std::int64_t mine = 1000 + r, back = 0;
  auto self_recv = comm.irecv(&back, sizeof back, r, 9, nullptr);
  comm.isend(&mine, sizeof mine, r, 9, nullptr)->wait();
  self_recv->wait();
  EXPECT_EQ(back, mine);

  // alltoallv with different counts per pair (some zero), through the default batch.
  auto count = [&](int from, int to) { return static_cast<std::size_t>((from * 7 + to * 3) % 5) * 8; };
  std::vector<std::size_t> sb(P), so(P), rb(P), ro(P);
  std::size_t st = 0, rt = 0;
  for (int p = 0; p < P; ++p) {
    sb[p] = count(r, p), so[p] = st, st += sb[p];
    rb[p] = count(p, r), ro[p] = rt, rt += rb[p];
  }
  std::vector<char> send(st), recv(rt, 0);
  for (int p = 0; p < P; ++p) {
    const auto b = message(seed, r, p, 77, sb[p]);
    std::copy(b.begin(), b.end(), send.begin() + static_cast<std::ptrdiff_t>(so[p]));
  }
  comm.alltoallv(send.data(), sb, so, recv.data(), rb, ro);
  for (int p = 0; p < P; ++p)
    EXPECT_EQ(std::vector<char>(recv.begin() + static_cast<std::ptrdiff_t>(ro[p]), recv.begin() + static_cast<std::ptrdiff_t>(ro[p] + rb[p])),
              message(seed, p, r, 77, rb[p])) << "alltoallv from " << p;

  // Collectives.
  std::int64_t sum = r;
  comm.allreduce(&sum, 1, ReduceType::i64, ReduceOp::sum);
  EXPECT_EQ(sum, P * (P - 1) / 2);
  double mx[2] = {static_cast<double>(r) * 1.5, -static_cast<double>(r)};
  comm.allreduce(mx, 2, ReduceType::f64, ReduceOp::max);
  EXPECT_EQ(mx[0], (P - 1) * 1.5);
  EXPECT_EQ(mx[1], 0.0);
  float mn = 2.0f + static_cast<float>(r);
  comm.allreduce(&mn, 1, ReduceType::f32, ReduceOp::min);
  EXPECT_EQ(mn, 2.0f);
  char tag[6];
  std::snprintf(tag, sizeof tag, "r%04d", r);
  std::vector<char> all(6 * static_cast<std::size_t>(P));
  comm.allgather(tag, all.data(), 6);
  for (int p = 0; p < P; ++p) EXPECT_EQ(std::string(all.data() + 6 * p), fmt::format("r{:04d}", p));
  for (int root = 0; root < P; ++root) {
    auto b = message(seed, root, -1, 3, 1000);
    std::vector<char> buf = r == root ? b : std::vector<char>(1000, 0);
    comm.broadcast(buf.data(), buf.size(), root);
    EXPECT_EQ(buf, b) << "broadcast from " << root;
  }
  comm.barrier();
  require_same_on_all_ranks(comm, "the test's arguments", "same everywhere");
  EXPECT_THROW(require_same_on_all_ranks(comm, "the rank", std::to_string(r)), Error);

  // Split: even and odd ranks, in reverse order; the child's traffic does not mix with the parent's.
  auto child = comm.split(r % 2, -r);
  const int members = (P - r % 2 + 1) / 2;
  EXPECT_EQ(child->size(), members);
  EXPECT_EQ(child->rank(), members - 1 - r / 2);
  EXPECT_EQ(child->timeout(), comm.timeout());
  std::int64_t child_sum = r;
  child->allreduce(&child_sum, 1, ReduceType::i64, ReduceOp::sum);
  std::int64_t want = 0;
  for (int p = r % 2; p < P; p += 2) want += p;
  EXPECT_EQ(child_sum, want);
  std::int64_t parent_sum = 1;
  comm.allreduce(&parent_sum, 1, ReduceType::i64, ReduceOp::sum);
  EXPECT_EQ(parent_sum, P);
  if (child->size() > 1) {
    const int cn = (child->rank() + 1) % child->size(), cp = (child->rank() + child->size() - 1) % child->size();
    std::int64_t out = 500 + child->rank(), in = -1;
    auto q = child->irecv(&in, sizeof in, cp, 5, nullptr);
    child->isend(&out, sizeof out, cn, 5, nullptr)->wait();
    q->wait();
    EXPECT_EQ(in, 500 + cp);
  }
  EXPECT_THROW(comm.isend(&mine, 8, P, 0, nullptr), Error);
}

void check_attention(Communicator& comm) {
  const int P = comm.size();
  const int hq = 4, hkv = 2;
  for (auto [layout, causal] : {std::pair{Layout::zigzag, true}, {Layout::contiguous, false}, {Layout::striped, true}}) {
    test::RingCase shape{layout, causal, {0, 37, 38, 90}, hq, hkv, 16, DType::f32};
    test::check_ring_against_reference(comm, shape, shared_seed(comm));
    std::vector<test::ParallelCase> cases{{shape, Strategy::ring, 0}, {shape, Strategy::automatic, 0}};
    if (hq % P == 0) cases.push_back({shape, Strategy::ulysses, 0});
    if (P == 4) cases.push_back({shape, Strategy::hybrid, 2});
    for (const auto& c : cases) test::check_parallel_against_reference(comm, c, shared_seed(comm));
  }
}

// The last rank disappears without a word (as a crash would); the others' receive from it fails
// with Error(communication) naming it, and does so quickly (the connection closed, no timeout).
void check_dead_peer(Communicator& comm) {
  const int last = comm.size() - 1;
  comm.barrier();
  if (comm.rank() == last) std::_Exit(0);
  comm.set_timeout(std::chrono::seconds(60));
  std::int64_t x = 0;
  const auto start = std::chrono::steady_clock::now();
  try {
    comm.irecv(&x, sizeof x, last, 1, nullptr)->wait();
    ADD_FAILURE() << "a receive from a dead rank completed";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::communication) << e.what();
    EXPECT_NE(std::string(e.what()).find(fmt::format("rank {} (", last)), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("exit or crash"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  std::_Exit(::testing::Test::HasFailure() ? 1 : 0);  // peers are gone: no orderly teardown to wait for
}

// The last rank is alive but never answers: the others' wait ends with Error(timeout) naming it.
void check_stuck_peer(Communicator& comm) {
  const int last = comm.size() - 1;
  comm.barrier();
  if (comm.rank() == last) {
    std::this_thread::sleep_for(std::chrono::seconds(5));
    std::_Exit(0);
  }
  comm.set_timeout(std::chrono::seconds(1));
  std::int64_t x = 0;
  try {
    comm.irecv(&x, sizeof x, last, 1, nullptr)->wait();
    ADD_FAILURE() << "a receive from a silent rank completed";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::timeout) << e.what();
    EXPECT_NE(std::string(e.what()).find(fmt::format("rank {} (", last)), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("within 1 s"), std::string::npos) << e.what();
  }
  std::_Exit(::testing::Test::HasFailure() ? 1 : 0);
}

// The C API's communicator from the same environment, and a forward through it.
void check_capi() {
  longattn_comm* comm = nullptr;
  ASSERT_EQ(longattn_comm_create_tcp_from_env(1, &comm), LONGATTN_OK) << longattn_last_error();
  int rank = -1, size = 0;
  longattn_comm_rank(comm, &rank);
  longattn_comm_size(comm, &size);
  EXPECT_EQ(rank, std::atoi(std::getenv("RANK")));
  EXPECT_EQ(size, std::atoi(std::getenv("WORLD_SIZE")));
  longattn_context* ctx = nullptr;
  ASSERT_EQ(longattn_context_create("cpu", {LONGATTN_DEVICE_CPU, 0}, &ctx), LONGATTN_OK);
  longattn_attention_params p;
  longattn_attention_params_init(&p);
  const std::int32_t cu[] = {0, 50};
  p.cu_seqlens = cu;
  p.batch = 1;
  p.q_heads = p.kv_heads = 2;
  p.head_dim = 8;
  p.dtype = LONGATTN_DTYPE_F32;
  p.causal = 1;
  longattn_attention* a = nullptr;
  ASSERT_EQ(longattn_attention_create(ctx, comm, &p, &a), LONGATTN_OK) << longattn_last_error();
  longattn_attention_info info{};
  longattn_attention_get_info(a, &info);
  std::mt19937_64 rng(test::fresh_seed());
  auto q = test::random_tensor(rng, DType::f32, {info.local_tokens, 2, 8});
  auto o = test::poisoned_tensor(DType::f32, {info.local_tokens, 2, 8});
  auto lse = test::poisoned_tensor(DType::f32, {2, info.local_tokens});
  const std::int64_t qs[] = {info.local_tokens, 2, 8}, ls[] = {2, info.local_tokens};
  const longattn_device cpu{LONGATTN_DEVICE_CPU, 0};
  auto tq = longattn_tensor_contiguous(q.view.data, LONGATTN_DTYPE_F32, cpu, 3, qs);
  auto to = longattn_tensor_contiguous(o.view.data, LONGATTN_DTYPE_F32, cpu, 3, qs);
  auto tl = longattn_tensor_contiguous(lse.view.data, LONGATTN_DTYPE_F32, cpu, 2, ls);
  EXPECT_EQ(longattn_attention_forward(a, &tq, &tq, &tq, &to, &tl, nullptr), LONGATTN_OK) << longattn_last_error();
  for (float x : lse.to_f32()) EXPECT_TRUE(std::isfinite(x));  // causal: every row sees at least itself
  longattn_attention_destroy(a);
  longattn_context_destroy(ctx);
  longattn_comm_destroy(comm);
}

// One round's traffic: random messages of random sizes between every pair, an allreduce and a
// split's allreduce, each checked. Messages are large enough that some are still in flight when a
// fast rank starts tearing down.
void exchange_and_check(Communicator& comm, int round) {
  const int P = comm.size(), r = comm.rank();
  const auto seed = shared_seed(comm);
  const std::size_t bytes = 1 + seed % (256 * 1024);
  std::vector<std::vector<char>> got(static_cast<std::size_t>(P), std::vector<char>(bytes));
  std::vector<std::vector<char>> sent;
  std::vector<Request> requests;
  for (int p = 0; p < P; ++p) {
    if (p == r) continue;
    requests.push_back(comm.irecv(got[static_cast<std::size_t>(p)].data(), bytes, p, round, nullptr));
    sent.push_back(message(seed, r, p, round, bytes));
    requests.push_back(comm.isend(sent.back().data(), bytes, p, round, nullptr));
  }
  for (auto& q : requests) q->wait();
  for (int p = 0; p < P; ++p) {
    if (p != r) {
      EXPECT_EQ(got[static_cast<std::size_t>(p)], message(seed, p, r, round, bytes)) << "round " << round << " from " << p;
    }
  }
  std::int64_t sum = static_cast<std::int64_t>(seed % 1000) + r;
  comm.allreduce(&sum, 1, ReduceType::i64, ReduceOp::sum);
  EXPECT_EQ(sum, P * static_cast<std::int64_t>(seed % 1000) + P * (P - 1) / 2) << "round " << round;
  auto half = comm.split(r % 2, r);
  std::int64_t members = 1;
  half->allreduce(&members, 1, ReduceType::i64, ReduceOp::sum);
  EXPECT_EQ(members, (P + 1 - r % 2) / 2) << "round " << round;
}

// Every rank makes a communicator, uses it and destroys it, 30 times over. The ways a round ends:
// all at once after a barrier; each rank on its own after a random pause (as processes leaving a
// launcher at exit do), with a message every peer leaves unreceived; or with sends still queued
// when the communicator goes.
void check_teardown() {
  constexpr int kRounds = 30;
  std::mt19937_64 pause(test::fresh_seed());
  for (int round = 0; round < kRounds; ++round) {
    auto comm = make_tcp_communicator_from_env();
    exchange_and_check(*comm, round);
    const int P = comm->size(), r = comm->rank();
    std::vector<char> unread(64 * 1024, static_cast<char>(round));
    std::vector<Request> leftover;
    switch (round % 3) {
      case 0:
        comm->barrier();
        break;
      case 1:  // not waited for: the peer may be gone already, and the send fail
        for (int p = 0; p < P; ++p)
          if (p != r) comm->isend(unread.data(), unread.size(), p, 1 << 20, nullptr);
        std::this_thread::sleep_for(std::chrono::milliseconds(pause() % 50));
        break;
      case 2:
        comm->barrier();
        for (int p = 0; p < P; ++p)
          if (p != r) leftover.push_back(comm->isend(unread.data(), unread.size(), p, 1 << 21, nullptr));
        break;
    }
    comm.reset();
    if (::testing::Test::HasFailure()) return;
  }
}

// The last rank is gone before the others destroy their communicators (with a message to it still
// queued): destroying must neither crash nor wait for it.
void check_teardown_peer_gone() {
  auto comm = make_tcp_communicator_from_env();
  exchange_and_check(*comm, 0);
  const int last = comm->size() - 1;
  comm->barrier();
  if (comm->rank() == last) std::_Exit(0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // its exit reaches the others
  std::vector<char> bytes(1024, 7);
  auto queued = comm->isend(bytes.data(), bytes.size(), last, 3, nullptr);
  const auto start = std::chrono::steady_clock::now();
  comm.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
  std::_Exit(::testing::Test::HasFailure() ? 1 : 0);  // a peer is gone: no orderly end to agree on
}

// A live peer that stops reading (the whole process stopped, as a debugger or a stuck host would
// leave it) while this rank's message to it is too large for the socket buffers: destroying the
// communicator must give up after its timeout, not block on the write forever. Rank 1 stops
// itself; rank 0 resumes it once the destructor has returned, and rank 1 then just leaves.
void check_teardown_peer_not_reading() {
  auto comm = make_tcp_communicator_from_env();
  exchange_and_check(*comm, 0);
  std::int64_t pid = ::getpid();
  std::vector<std::int64_t> pids(static_cast<std::size_t>(comm->size()));
  comm->allgather(&pid, pids.data(), sizeof pid);
  comm->barrier();
  if (comm->rank() == 1) {
    ::raise(SIGSTOP);
    std::_Exit(0);  // the connection is gone by now: no orderly end to agree on
  }
  if (comm->rank() != 0) std::_Exit(0);
  // Rank 1 runs on this host: wait until the kernel reports it stopped ("T" in /proc/PID/stat).
  const auto stopped = [pid = pids[1]] {
    std::ifstream stat(fmt::format("/proc/{}/stat", pid));
    std::string fields((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    const auto after_name = fields.rfind(')');
    return after_name != std::string::npos && fields.size() > after_name + 2 && fields[after_name + 2] == 'T';
  };
  for (int i = 0; i < 500 && !stopped(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (!stopped()) {
    ::kill(static_cast<pid_t>(pids[1]), SIGCONT);
    ADD_FAILURE() << "rank 1 did not stop itself";
    std::_Exit(1);
  }
  std::vector<char> bytes(256 << 20, 5);  // far beyond what the kernel buffers on both sides
  auto queued = comm->isend(bytes.data(), bytes.size(), 1, 4, nullptr);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the sender is blocked in its write
  EXPECT_FALSE(queued->test()) << "the message to a stopped peer was written in full";
  const auto start = std::chrono::steady_clock::now();
  queued.reset();  // the request shares the connections: the last owner gone closes them
  comm.reset();
  const auto took = std::chrono::steady_clock::now() - start;
  ::kill(static_cast<pid_t>(pids[1]), SIGCONT);
  EXPECT_GE(took, std::chrono::seconds(2)) << "the destructor did not wait for the queued message at all";
  EXPECT_LT(took, std::chrono::seconds(15)) << "the destructor waited past its bound (LONGATTN_COMM_TIMEOUT_S=3)";
  std::_Exit(::testing::Test::HasFailure() ? 1 : 0);
}

// A rendezvous that cannot complete: the caught error must be the expected one.
void check_failed_rendezvous(ErrorCode want, const std::string& words) {
  try {
    auto comm = make_tcp_communicator_from_env();
    ADD_FAILURE() << "the communicator was made";
  } catch (const Error& e) {
    if (std::atoi(std::getenv("RANK")) == 0) {
      EXPECT_EQ(e.code(), want) << e.what();
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  }
}

void run_worker() {
  const std::string scenario = std::getenv(kScenarioVariable);
  if (scenario == "capi") return check_capi();
  if (scenario == "missing_rank") return check_failed_rendezvous(ErrorCode::timeout, "rank(s) 2 of 3");
  if (scenario == "world_mismatch") return check_failed_rendezvous(ErrorCode::invalid_argument, "WORLD_SIZE=3 but rank 0 has WORLD_SIZE=2");
  if (scenario == "teardown") return check_teardown();
  if (scenario == "teardown_peer_gone") return check_teardown_peer_gone();
  if (scenario == "teardown_peer_not_reading") return check_teardown_peer_not_reading();
  auto comm = make_tcp_communicator_from_env();
  EXPECT_EQ(comm->rank(), std::atoi(std::getenv("RANK")));
  EXPECT_EQ(comm->size(), std::atoi(std::getenv("WORLD_SIZE")));
  if (scenario == "nodes_of_two") {
    const Topology t = comm->topology();
    EXPECT_EQ(t.node, comm->rank() / 2);
    EXPECT_EQ(t.nodes, 2);
    EXPECT_EQ(t.local_rank, comm->rank() % 2);
    EXPECT_EQ(t.local_size, 2);
  } else if (scenario == "operations") check_operations(*comm);
  else if (scenario == "attention") check_attention(*comm);
  else if (scenario == "dead_peer") check_dead_peer(*comm);
  else if (scenario == "stuck_peer") check_stuck_peer(*comm);
  else FAIL() << "unknown scenario " << scenario;
  // Every rank's verdict before anyone leaves, so that no rank sees a peer's exit as a failure.
  std::int64_t failed = ::testing::Test::HasFailure() ? 1 : 0;
  comm->allreduce(&failed, 1, ReduceType::i64, ReduceOp::max);
}

// ---- The launcher tests ----------------------------------------------------------------------

class TcpRanks : public ::testing::TestWithParam<int> {};

TEST_P(TcpRanks, EveryOperation) { expect_all_passed(run(Launch(GetParam(), "operations")), "operations"); }
TEST_P(TcpRanks, RingAndEveryStrategyAgainstTheReference) { expect_all_passed(run(Launch(GetParam(), "attention")), "attention"); }
TEST_P(TcpRanks, DeadPeerIsNamedNotWaitedFor) { expect_all_passed(run(Launch(GetParam(), "dead_peer")), "dead_peer"); }
TEST_P(TcpRanks, CApiOverTcp) { expect_all_passed(run(Launch(GetParam(), "capi")), "capi"); }
TEST_P(TcpRanks, RepeatedTeardownAtTheSameMoment) { expect_all_passed(run(Launch(GetParam(), "teardown")), "teardown"); }
TEST_P(TcpRanks, TeardownWithAPeerGoneIsQuick) {
  Launch l(GetParam(), "teardown_peer_gone");
  l.env["LONGATTN_COMM_TIMEOUT_S"] = "20";
  expect_all_passed(run(l), "teardown_peer_gone");
}
INSTANTIATE_TEST_SUITE_P(Ranks, TcpRanks, ::testing::Values(2, 3, 4));

TEST(Tcp, TeardownWithAPeerThatStoppedReadingIsBounded) {
  Launch l(3, "teardown_peer_not_reading");
  l.env["LONGATTN_COMM_TIMEOUT_S"] = "3";
  expect_all_passed(run(l), "teardown_peer_not_reading");
}

TEST(Tcp, SimulatedNodesFromNodeSize) {
  Launch l(4, "nodes_of_two");
  l.env["LONGATTN_NODE_SIZE"] = "2";
  expect_all_passed(run(l), "nodes_of_two");
}

TEST(Tcp, StuckPeerTimesOutNamingIt) { expect_all_passed(run(Launch(3, "stuck_peer")), "stuck_peer"); }

TEST(Tcp, MissingRankTimesOutNamingIt) {
  Launch l(3, "missing_rank", {0, 1});
  l.env["LONGATTN_COMM_TIMEOUT_S"] = "2";
  expect_all_passed(run(l), "missing_rank");
}

TEST(Tcp, DifferentWorldSizesAreRefused) {
  Launch l(2, "world_mismatch");
  l.env_of[1]["WORLD_SIZE"] = "3";
  l.env["LONGATTN_COMM_TIMEOUT_S"] = "20";
  expect_all_passed(run(l), "world_mismatch");
}

#ifdef LONGATTN_RING_ATTENTION_PROGRAM
// The example job picks the TCP communicator by itself under torchrun's variables, and passes its
// oracle check with every strategy over it.
TEST(Tcp, RingAttentionProgramUnderTorchrunVariables) {
  for (const char* strategy : {"ring", "ulysses", "auto"}) {
    Launch l(2, "program");
    l.program = {LONGATTN_RING_ATTENTION_PROGRAM, "--device", "cpu", "--seq-len", "301", "--heads", "4", "--kv-heads", "2",
                 "--head-dim", "16", "--causal", "--backward", "--check", "--strategy", strategy,
                 "--seed", std::to_string(test::fresh_seed() % 1000000)};
    l.rank0_stdout = ::testing::TempDir() + "tcp_ring_attention_stdout.txt";
    expect_all_passed(run(l), std::string("ring_attention --strategy ") + strategy);
    std::ifstream out(l.rank0_stdout);
    std::stringstream text;
    text << out.rdbuf();
    EXPECT_NE(text.str().find("RESULT {"), std::string::npos) << text.str();
    EXPECT_NE(text.str().find("\"check\":\"passed\""), std::string::npos) << text.str();
  }
}
#endif

// Sets variables for one scope and restores them.
class ScopedEnv {
 public:
  explicit ScopedEnv(std::map<std::string, std::optional<std::string>> vars) {
    for (const auto& [k, v] : vars) {
      const char* old = std::getenv(k.c_str());
      saved_[k] = old ? std::optional<std::string>(old) : std::nullopt;
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
  }
  ~ScopedEnv() {
    for (const auto& [k, v] : saved_) {
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

void expect_refused(std::map<std::string, std::optional<std::string>> vars, const std::string& words) {
  std::map<std::string, std::optional<std::string>> base{{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}, {"RANK", "0"},
                                                         {"WORLD_SIZE", "2"}, {"LOCAL_RANK", std::nullopt}, {"LOCAL_WORLD_SIZE", std::nullopt}};
  for (const auto& [k, v] : vars) base[k] = v;
  ScopedEnv env(base);
  try {
    tcp_rendezvous_from_env();
    ADD_FAILURE() << "accepted; expected a refusal with '" << words << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
  }
}

TEST(Tcp, BadEnvironmentIsOneClearError) {
  expect_refused({{"MASTER_ADDR", std::nullopt}}, "MASTER_ADDR is not set: launch with torchrun");
  expect_refused({{"RANK", std::nullopt}}, "RANK is not set");
  expect_refused({{"WORLD_SIZE", "two"}}, "WORLD_SIZE='two' is not an integer");
  expect_refused({{"RANK", "2"}}, "RANK='2' is not an integer in [0, WORLD_SIZE=2)");
  expect_refused({{"MASTER_PORT", "70000"}}, "MASTER_PORT='70000'");
  expect_refused({{"MASTER_PORT", "65535"}}, "plus the port offset 1 is not a TCP port");
  expect_refused({{"LOCAL_WORLD_SIZE", "2"}, {"LOCAL_RANK", "2"}}, "LOCAL_RANK='2' is not an integer in [0, LOCAL_WORLD_SIZE=2)");
  ScopedEnv good({{"MASTER_ADDR", "node-a"}, {"MASTER_PORT", "29500"}, {"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                  {"LOCAL_WORLD_SIZE", "2"}});
  const auto where = tcp_rendezvous_from_env(7);
  EXPECT_EQ(where.master_addr, "node-a");
  EXPECT_EQ(where.master_port, 29507);
  EXPECT_EQ(where.rank, 3);
  EXPECT_EQ(where.world_size, 8);
  EXPECT_EQ(where.local_rank, 1);
  EXPECT_EQ(where.local_world_size, 2);
  EXPECT_TRUE(torchrun_environment_present());
  longattn_comm* comm = nullptr;
  ScopedEnv no_rank({{"RANK", std::nullopt}});
  EXPECT_FALSE(torchrun_environment_present());
  EXPECT_EQ(longattn_comm_create_tcp_from_env(1, &comm), LONGATTN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(longattn_last_error()).find("RANK is not set"), std::string::npos) << longattn_last_error();
}

TEST(Tcp, OneRankNeedsNoNetwork) {
  ScopedEnv env({{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "1"}, {"RANK", "0"}, {"WORLD_SIZE", "1"}});
  auto comm = make_tcp_communicator_from_env();
  EXPECT_EQ(comm->size(), 1);
  test::check_parallel_against_reference(*comm, {{Layout::zigzag, true, {0, 33}, 2, 1, 16, DType::f32}, Strategy::ring, 0},
                                         test::fresh_seed());
}

// The worker as a test of its own, so that its EXPECTs decide the process's exit code.
class Worker : public ::testing::Test {
  void TestBody() override { run_worker(); }
};

}  // namespace
}  // namespace longattn

// A process started by the launcher runs only the worker; others run the launcher tests (the
// worker is not registered there, so test listings never show it).
int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (std::getenv(longattn::kScenarioVariable)) {
    ::testing::RegisterTest("TcpLaunched", "Worker", nullptr, nullptr, __FILE__, __LINE__,
                            []() -> ::testing::Test* { return new longattn::Worker; });
    GTEST_FLAG_SET(filter, "TcpLaunched.Worker");
  }
  return RUN_ALL_TESTS();
}
