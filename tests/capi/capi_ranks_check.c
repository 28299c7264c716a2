/* A C program (C99) over the C API: the same random inputs through a 1-rank run (each process alone
 * on MPI_COMM_SELF) and an N-rank run (MPI_COMM_WORLD under mpirun -np N), for every strategy and
 * layout, causal and full, on a packed GQA batch with an empty sequence; every local output and
 * gradient of the N-rank run must match the 1-rank run's rows. Also checks the refusal of a strided
 * tensor. Prints one line per failure and ends with RESULT {json}; exits non-zero on any failure. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "longattn/longattn.h"

#define HEAD_DIM 8

static int failures = 0;
static int world_rank = 0;

static void fail(const char* what, const char* detail) {
  ++failures;
  fprintf(stderr, "rank %d: FAIL %s: %s\n", world_rank, what, detail);
}

static int ok(longattn_status status, const char* what) {
  if (status == LONGATTN_OK) return 1;
  fail(what, longattn_last_error());
  return 0;
}

/* xorshift64*: the same stream on every rank from the shared seed. */
static uint64_t rng_state;
static float uniform(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return (float)((rng_state * 2685821657736338717ULL) >> 40) / (float)(1ULL << 24) * 2.0f - 1.0f;
}

static float* random_floats(int64_t count) {
  float* p = malloc((size_t)(count > 0 ? count : 1) * sizeof(float));
  int64_t i;
  for (i = 0; i < count; ++i) p[i] = uniform();
  return p;
}

static longattn_tensor tensor3(float* data, int64_t rows, int heads) {
  const longattn_device cpu = {LONGATTN_DEVICE_CPU, 0};
  int64_t shape[3];
  shape[0] = rows;
  shape[1] = heads;
  shape[2] = HEAD_DIM;
  return longattn_tensor_contiguous(data, LONGATTN_DTYPE_F32, cpu, 3, shape);
}

static longattn_tensor tensor2(float* data, int heads, int64_t rows) {
  const longattn_device cpu = {LONGATTN_DEVICE_CPU, 0};
  int64_t shape[2];
  shape[0] = heads;
  shape[1] = rows;
  return longattn_tensor_contiguous(data, LONGATTN_DTYPE_F32, cpu, 2, shape);
}

/* Largest |a - b| over n values, with two equal infinities (rows that see no key) counting as 0. */
static double max_diff(const float* a, const float* b, int64_t n) {
  double worst = 0;
  int64_t i;
  for (i = 0; i < n; ++i) {
    double d = (isinf(a[i]) && a[i] == b[i]) ? 0.0 : fabs((double)a[i] - (double)b[i]);
    if (d != d) d = INFINITY;
    if (d > worst) worst = d;
  }
  return worst;
}

/* All of one run's tensors: inputs, outputs, gradients, for `rows` tokens. */
struct run_tensors {
  float *q, *k, *v, *d_o, *o, *lse, *dq, *dk, *dv;
};

static void alloc_outputs(struct run_tensors* t, int64_t rows, int hq, int hkv) {
  t->o = calloc((size_t)(rows * hq * HEAD_DIM + 1), sizeof(float));
  t->lse = calloc((size_t)(rows * hq + 1), sizeof(float));
  t->dq = calloc((size_t)(rows * hq * HEAD_DIM + 1), sizeof(float));
  t->dk = calloc((size_t)(rows * hkv * HEAD_DIM + 1), sizeof(float));
  t->dv = calloc((size_t)(rows * hkv * HEAD_DIM + 1), sizeof(float));
}

static void free_run(struct run_tensors* t) {
  free(t->q); free(t->k); free(t->v); free(t->d_o); free(t->o); free(t->lse); free(t->dq); free(t->dk); free(t->dv);
}

static int forward_backward(longattn_attention* a, struct run_tensors* t, int64_t rows, int hq, int hkv) {
  longattn_tensor q = tensor3(t->q, rows, hq), k = tensor3(t->k, rows, hkv), v = tensor3(t->v, rows, hkv);
  longattn_tensor o = tensor3(t->o, rows, hq), lse = tensor2(t->lse, hq, rows), d_o = tensor3(t->d_o, rows, hq);
  longattn_tensor dq = tensor3(t->dq, rows, hq), dk = tensor3(t->dk, rows, hkv), dv = tensor3(t->dv, rows, hkv);
  return ok(longattn_attention_forward(a, &q, &k, &v, &o, &lse, NULL), "forward") &&
         ok(longattn_attention_backward(a, &q, &k, &v, &o, &lse, &d_o, &dq, &dk, &dv, NULL), "backward");
}

/* Rows of `rank`'s shard of a whole-batch [total, heads, D] array, into a new array. */
static float* rows_of(longattn_attention* a, int rank, float* global, int64_t total, int64_t rows, int heads) {
  float* local = malloc((size_t)(rows * heads * HEAD_DIM + 1) * sizeof(float));
  longattn_tensor g = tensor3(global, total, heads), l = tensor3(local, rows, heads);
  ok(longattn_attention_shard(a, rank, &g, &l), "shard");
  return local;
}

static void check_case(longattn_comm* self, longattn_comm* world, longattn_context* ctx, longattn_strategy strategy,
                       int ulysses, longattn_layout layout, int causal, const int32_t* cu, int batch, int hq, int hkv,
                       uint64_t seed) {
  const int64_t total = cu[batch];
  char label[160], detail[160];
  longattn_attention_params p;
  longattn_attention *single = NULL, *parallel = NULL;
  struct run_tensors whole, part;
  longattn_attention_info info;
  int64_t* index;
  double worst_o, worst_lse = 0, worst_grad = 0;
  int h, i;

  sprintf(label, "strategy %d U %d layout %d %s h %dx%d tokens %lld seed %llu", (int)strategy, ulysses, (int)layout,
          causal ? "causal" : "full", hq, hkv, (long long)total, (unsigned long long)seed);
  longattn_attention_params_init(&p);
  p.cu_seqlens = cu;
  p.batch = batch;
  p.q_heads = hq;
  p.kv_heads = hkv;
  p.head_dim = HEAD_DIM;
  p.dtype = LONGATTN_DTYPE_F32;
  p.causal = causal;
  p.layout = layout;
  if (!ok(longattn_attention_create(ctx, self, &p, &single), label)) return;
  p.strategy = strategy;
  p.ulysses_size = ulysses;
  if (!ok(longattn_attention_create(ctx, world, &p, &parallel), label)) {
    longattn_attention_destroy(single);
    return;
  }
  longattn_attention_get_info(parallel, &info);

  rng_state = seed;
  whole.q = random_floats(total * hq * HEAD_DIM);
  whole.k = random_floats(total * hkv * HEAD_DIM);
  whole.v = random_floats(total * hkv * HEAD_DIM);
  whole.d_o = random_floats(total * hq * HEAD_DIM);
  alloc_outputs(&whole, total, hq, hkv);
  forward_backward(single, &whole, total, hq, hkv);

  part.q = rows_of(parallel, world_rank, whole.q, total, info.local_tokens, hq);
  part.k = rows_of(parallel, world_rank, whole.k, total, info.local_tokens, hkv);
  part.v = rows_of(parallel, world_rank, whole.v, total, info.local_tokens, hkv);
  part.d_o = rows_of(parallel, world_rank, whole.d_o, total, info.local_tokens, hq);
  alloc_outputs(&part, info.local_tokens, hq, hkv);
  forward_backward(parallel, &part, info.local_tokens, hq, hkv);

  {
    float* want = rows_of(parallel, world_rank, whole.o, total, info.local_tokens, hq);
    worst_o = max_diff(part.o, want, info.local_tokens * hq * HEAD_DIM);
    free(want);
  }
  index = malloc((size_t)(info.local_tokens + 1) * sizeof(int64_t));
  ok(longattn_attention_shard_index(parallel, world_rank, NULL, index, NULL, info.local_tokens), "shard_index");
  for (h = 0; h < hq; ++h)
    for (i = 0; i < info.local_tokens; ++i) {
      const float got = part.lse[h * info.local_tokens + i], want = whole.lse[h * total + index[i]];
      const double d = (isinf(got) && got == want) ? 0.0 : fabs((double)got - (double)want);
      if (!(d <= worst_lse)) worst_lse = d;
    }
  {
    float* grads[3];
    float* wholes[3];
    const int heads[3] = {hq, hkv, hkv};
    int g;
    grads[0] = part.dq; grads[1] = part.dk; grads[2] = part.dv;
    wholes[0] = whole.dq; wholes[1] = whole.dk; wholes[2] = whole.dv;
    for (g = 0; g < 3; ++g) {
      float* want = rows_of(parallel, world_rank, wholes[g], total, info.local_tokens, heads[g]);
      const double d = max_diff(grads[g], want, info.local_tokens * heads[g] * HEAD_DIM);
      if (!(d <= worst_grad)) worst_grad = d;
      free(want);
    }
  }
  if (!(worst_o <= 1e-5 && worst_lse <= 1e-5 && worst_grad <= 1e-4)) {
    sprintf(detail, "N-rank vs 1-rank: o %.3g, lse %.3g, gradients %.3g", worst_o, worst_lse, worst_grad);
    fail(label, detail);
  }
  free(index);
  free_run(&whole);
  free_run(&part);
  longattn_attention_destroy(parallel);
  longattn_attention_destroy(single);
}

/* A transposed (strided) view is refused on every rank with a message naming it. */
static void check_strided_refusal(longattn_comm* world, longattn_context* ctx) {
  const int32_t cu[2] = {0, 12};
  longattn_attention_params p;
  longattn_attention* a = NULL;
  longattn_attention_info info;
  float *q, *o, *lse;
  longattn_tensor tq, to, tl, strided;
  longattn_attention_params_init(&p);
  p.cu_seqlens = cu;
  p.batch = 1;
  p.q_heads = p.kv_heads = 2;
  p.head_dim = HEAD_DIM;
  p.dtype = LONGATTN_DTYPE_F32;
  if (!ok(longattn_attention_create(ctx, world, &p, &a), "strided: create")) return;
  longattn_attention_get_info(a, &info);
  q = random_floats(info.local_tokens * 2 * HEAD_DIM);
  o = random_floats(info.local_tokens * 2 * HEAD_DIM);
  lse = random_floats(info.local_tokens * 2);
  tq = tensor3(q, info.local_tokens, 2);
  to = tensor3(o, info.local_tokens, 2);
  tl = tensor2(lse, 2, info.local_tokens);
  strided = tq;
  if (world_rank == 0) {
    strided.strides[1] = 1; /* heads and head_dim interleaved: not what the kernels read */
    strided.strides[2] = 2;
  }
  if (longattn_attention_forward(a, &tq, &tq, &strided, &to, &tl, NULL) != LONGATTN_ERROR_INVALID_ARGUMENT)
    fail("strided tensor", "was not refused with LONGATTN_ERROR_INVALID_ARGUMENT");
  else if (!strstr(longattn_last_error(), "tensor 'v'") || !strstr(longattn_last_error(), "contiguous"))
    fail("strided tensor's message", longattn_last_error());
  free(q);
  free(o);
  free(lse);
  longattn_attention_destroy(a);
}

int main(void) {
  longattn_comm *world = NULL, *self = NULL;
  longattn_context* ctx = NULL;
  const longattn_device cpu = {LONGATTN_DEVICE_CPU, 0};
  const longattn_layout layouts[3] = {LONGATTN_LAYOUT_CONTIGUOUS, LONGATTN_LAYOUT_ZIGZAG, LONGATTN_LAYOUT_STRIPED};
  int32_t cu[5];
  int size = 1, cases = 0, l, causal, failed_anywhere = 0, hq, hkv;
  uint64_t seed;

  if (longattn_abi_version() != LONGATTN_ABI_VERSION) fail("abi version", "the library and the header differ");
  /* C lets any int live in an enum: the library must answer it, not misread it. */
  if (strcmp(longattn_status_name((longattn_status)99), "unknown status") != 0) fail("status name of 99", longattn_status_name((longattn_status)99));
  if (!ok(longattn_comm_create_mpi_world(&world), "MPI world communicator")) return 1;
  longattn_comm_rank(world, &world_rank);
  longattn_comm_size(world, &size);
  if (!ok(longattn_comm_create_mpi(MPI_Comm_c2f(MPI_COMM_SELF), &self), "MPI_COMM_SELF communicator")) return 1;
  if (!ok(longattn_context_create("cpu", cpu, &ctx), "context")) return 1;

  seed = (uint64_t)time(NULL) * 2654435761ULL + (uint64_t)clock();
  MPI_Bcast(&seed, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD);
  if (world_rank == 0) printf("capi_ranks_check: %d ranks, seed %llu\n", size, (unsigned long long)seed);
  rng_state = seed | 1;
  /* A packed batch: an empty sequence and three of random lengths, 1..40 tokens. */
  cu[0] = 0;
  cu[1] = 0;
  cu[2] = cu[1] + 1 + (int32_t)((uniform() + 1.0f) * 19.5f);
  cu[3] = cu[2] + 1 + (int32_t)((uniform() + 1.0f) * 19.5f);
  cu[4] = cu[3] + 1 + (int32_t)((uniform() + 1.0f) * 19.5f);
  hq = size == 3 ? 6 : 4; /* every Ulysses size of these ranks divides the query heads */
  hkv = size == 3 ? 3 : 2;

  for (causal = 0; causal <= 1; ++causal) {
    for (l = 0; l < 3; ++l) {
      check_case(self, world, ctx, LONGATTN_STRATEGY_RING, 0, layouts[l], causal, cu, 4, hq, hkv, seed + (uint64_t)++cases);
      check_case(self, world, ctx, LONGATTN_STRATEGY_AUTO, 0, layouts[l], causal, cu, 4, hq, hkv, seed + (uint64_t)++cases);
      if (size % 2 == 0)
        check_case(self, world, ctx, LONGATTN_STRATEGY_HYBRID, 2, layouts[l], causal, cu, 4, hq, hkv, seed + (uint64_t)++cases);
    }
    check_case(self, world, ctx, LONGATTN_STRATEGY_ULYSSES, 0, LONGATTN_LAYOUT_ZIGZAG, causal, cu, 4, hq, hkv, seed + (uint64_t)++cases);
  }
  check_strided_refusal(world, ctx);

  MPI_Allreduce(&failures, &failed_anywhere, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  longattn_context_destroy(ctx);
  longattn_comm_destroy(self);
  longattn_comm_destroy(world);
  if (world_rank == 0)
    printf("RESULT {\"program\": \"capi_ranks_check\", \"ranks\": %d, \"cases\": %d, \"failures\": %d, \"seed\": %llu}\n", size,
           cases, failed_anywhere, (unsigned long long)seed);
  return failed_anywhere ? 1 : 0;
}
