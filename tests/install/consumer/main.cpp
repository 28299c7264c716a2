// A program outside the tree: links the installed longattn through find_package and runs a tiny
// ring forward on one rank against the reference backend.
#include <cmath>
#include <cstdio>
#include <vector>

#include <longattn/backend.hpp>
#include <longattn/ring.hpp>

int main(int argc, char** argv) {
  longattn::MpiSession mpi(&argc, &argv);
  auto world = longattn::make_mpi_world_communicator();
  const std::int64_t T = 50, H = 2, D = 16;
  auto plan = longattn::ShardPlan::single_sequence(T, longattn::Layout::zigzag, world->size());
  longattn::RingAttention ring(*world, plan, {.causal = true}, longattn::make_backend("cpu"));
  const auto n = plan.local_tokens(world->rank());
  std::vector<float> q(static_cast<std::size_t>(n * H * D)), o(q.size()), lse(static_cast<std::size_t>(H * n));
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(static_cast<float>(i));
  longattn::TensorView qv(q.data(), longattn::DType::f32, {n, H, D});
  ring.forward(qv, qv, qv, longattn::TensorView(o.data(), longattn::DType::f32, {n, H, D}),
               longattn::TensorView(lse.data(), longattn::DType::f32, {H, n}));
  for (float x : lse)
    if (!std::isfinite(x)) return 1;
  std::printf("consumer ok: %s backend, %lld local tokens\n", ring.backend().name().c_str(), static_cast<long long>(n));
  return 0;
}
