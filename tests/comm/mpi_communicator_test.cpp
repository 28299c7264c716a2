// The MPI communicator under mpirun -np 1..4: point to point around a ring, all-to-all with uneven
// counts, reductions, splits, topology override, argument agreement and timeouts.
#include <gtest/gtest.h>

#include <cstdlib>
#include <numeric>
#include <random>

#include "longattn/communicator.hpp"
#include "longattn/error.hpp"

namespace longattn {
namespace {

std::unique_ptr<Communicator> world() { return make_mpi_world_communicator(); }

TEST(MpiCommunicator, RingSendReceiveCarriesEveryByte) {
  auto c = world();
  const int r = c->rank(), p = c->size();
  const std::size_t n = 100003;  // odd size
  std::vector<std::uint8_t> out(n), in(n, 0);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<std::uint8_t>((i * 31 + static_cast<std::size_t>(r) * 7) & 0xff);
  auto rq = c->irecv(in.data(), n, (r - 1 + p) % p, 5);
  auto sq = c->isend(out.data(), n, (r + 1) % p, 5);
  sq->wait();
  rq->wait();
  const int from = (r - 1 + p) % p;
  for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(in[i], static_cast<std::uint8_t>((i * 31 + static_cast<std::size_t>(from) * 7) & 0xff)) << i;
}

TEST(MpiCommunicator, AllToAllWithUnevenCounts) {
  auto c = world();
  const int r = c->rank(), p = c->size();
  auto count = [](int from, int to) { return static_cast<std::size_t>((from * 3 + to * 5) % 7); };  // includes zeros
  std::vector<std::size_t> sb(static_cast<std::size_t>(p)), so(sb.size()), rb(sb.size()), ro(sb.size());
  std::size_t st = 0, rt = 0;
  for (int q = 0; q < p; ++q) {
    sb[static_cast<std::size_t>(q)] = count(r, q);
    so[static_cast<std::size_t>(q)] = st;
    st += count(r, q);
    rb[static_cast<std::size_t>(q)] = count(q, r);
    ro[static_cast<std::size_t>(q)] = rt;
    rt += count(q, r);
  }
  std::vector<char> send(st + 1), recv(rt + 1, 0);
  for (int q = 0; q < p; ++q)
    for (std::size_t i = 0; i < count(r, q); ++i) send[so[static_cast<std::size_t>(q)] + i] = static_cast<char>(r * 16 + q);
  c->alltoallv(send.data(), sb, so, recv.data(), rb, ro);
  for (int q = 0; q < p; ++q)
    for (std::size_t i = 0; i < count(q, r); ++i) EXPECT_EQ(recv[ro[static_cast<std::size_t>(q)] + i], static_cast<char>(q * 16 + r));
}

TEST(MpiCommunicator, ReductionsBroadcastGather) {
  auto c = world();
  const int r = c->rank(), p = c->size();
  double v[2] = {static_cast<double>(r) + 0.5, -static_cast<double>(r)};
  c->allreduce(v, 2, ReduceType::f64, ReduceOp::sum);
  EXPECT_DOUBLE_EQ(v[0], p * (p - 1) / 2.0 + 0.5 * p);
  std::int64_t m = r * 10;
  c->allreduce(&m, 1, ReduceType::i64, ReduceOp::max);
  EXPECT_EQ(m, (p - 1) * 10);
  int token = r == 0 ? 4242 : 0;
  c->broadcast(&token, sizeof token, 0);
  EXPECT_EQ(token, 4242);
  std::vector<int> all(static_cast<std::size_t>(p));
  c->allgather(&r, all.data(), sizeof r);
  for (int q = 0; q < p; ++q) EXPECT_EQ(all[static_cast<std::size_t>(q)], q);
}

TEST(MpiCommunicator, SplitMakesIndependentGroups) {
  auto c = world();
  auto sub = c->split(c->rank() % 2, c->rank());
  EXPECT_EQ(sub->size(), (c->size() + 1 - c->rank() % 2) / 2);
  EXPECT_EQ(sub->rank(), c->rank() / 2);
  std::int64_t s = c->rank();
  sub->allreduce(&s, 1, ReduceType::i64, ReduceOp::sum);
  std::int64_t want = 0;
  for (int q = c->rank() % 2; q < c->size(); q += 2) want += q;
  EXPECT_EQ(s, want);
}

TEST(MpiCommunicator, NodeSizeOverrideSimulatesNodes) {
  setenv("LONGATTN_NODE_SIZE", "2", 1);
  auto c = world();
  unsetenv("LONGATTN_NODE_SIZE");
  const auto t = c->topology();
  EXPECT_EQ(t.node, c->rank() / 2);
  EXPECT_EQ(t.nodes, (c->size() + 1) / 2);
  EXPECT_EQ(t.local_rank, c->rank() % 2);
  auto real = world()->topology();
  EXPECT_EQ(real.nodes, 1);  // mpirun on one machine: one shared-memory domain
  EXPECT_EQ(real.local_size, c->size());
}

TEST(MpiCommunicator, DisagreeingArgumentsAreReportedOnEveryRank) {
  auto c = world();
  EXPECT_NO_THROW(require_same_on_all_ranks(*c, "flags", "same"));
  if (c->size() == 1) return;
  try {
    require_same_on_all_ranks(*c, "flags", c->rank() == 1 ? "--heads=4" : "--heads=8");
    FAIL() << "disagreement not detected";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("rank 1: --heads=4"), std::string::npos) << e.what();
  }
}

TEST(MpiCommunicator, MissingPeerTimesOutInsteadOfHanging) {
  auto c = world();
  c->set_timeout(std::chrono::seconds(1));
  int x = 0;
  auto req = c->irecv(&x, sizeof x, c->rank(), 999);  // nobody sends this
  try {
    req->wait();
    FAIL() << "wait returned without a sender";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::timeout);
  }
  req.reset();  // cancels the receive
  c->barrier();
  EXPECT_THROW(c->isend(&x, 4, c->size(), 1), Error);
}

}  // namespace
}  // namespace longattn
