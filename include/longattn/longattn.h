/* The C API of longattn: distributed exact attention for any language or framework that can call C.
 *
 * A thin layer over the C++ API (parallel_attention.hpp, ring.hpp, communicator.hpp): opaque
 * handles, status codes with a per-thread message, and tensor descriptors. Plain C99; no C++
 * exception ever crosses it. docs/c-api.md is the reference page, with a complete example.
 *
 * Rules that hold for every function:
 *  - Every function that can fail returns a longattn_status; LONGATTN_OK is 0. On failure,
 *    longattn_last_error() returns a message saying what was wrong and what to do, and out
 *    parameters are left untouched.
 *  - Handles are created by longattn_*_create* and released by the matching *_destroy (NULL is
 *    accepted and ignored). The library never keeps a pointer to a caller's tensor memory after a
 *    call returns (on GPUs: after the work it queued on the given stream has run).
 *  - A handle may be used by one thread at a time. Different handles may be used from different
 *    threads, except that collective calls over one communicator must not overlap.
 *  - "Collective" calls must be made by every rank of the communicator, in the same order, with
 *    the same parameters where noted. An input wrong on one rank makes the call fail on every rank
 *    with the same message, rather than leave the others waiting.
 */
#ifndef LONGATTN_LONGATTN_H
#define LONGATTN_LONGATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes. It grows whenever a function's signature, a struct's
 * leading fields or an enum's values change incompatibly; compare with longattn_abi_version(). */
#define LONGATTN_ABI_VERSION 1

/* Outcome of a call. The codes mirror longattn::ErrorCode. */
typedef enum longattn_status {
  LONGATTN_OK = 0,
  LONGATTN_ERROR_INVALID_ARGUMENT = 1, /* a value passed is wrong: shape, dtype, layout, option, NULL */
  LONGATTN_ERROR_UNSUPPORTED = 2,      /* valid, but this build or backend cannot do it (no NCCL, no GPU) */
  LONGATTN_ERROR_IO = 3,               /* a file is missing, unreadable or malformed (machine file) */
  LONGATTN_ERROR_COMMUNICATION = 4,    /* a peer failed, disagreed or went away */
  LONGATTN_ERROR_TIMEOUT = 5,          /* a peer did not answer within the communicator's timeout */
  LONGATTN_ERROR_OUT_OF_CAPACITY = 6,  /* a memory or size limit was reached (a full GPU too) */
  LONGATTN_ERROR_PROTOCOL = 7,         /* a malformed message on the wire */
  LONGATTN_ERROR_UNAUTHORIZED = 8,     /* a peer did not present the right credentials */
  LONGATTN_ERROR_INTERNAL = 9          /* a bug in longattn (or an unexpected C++ exception): please report it */
} longattn_status;

/* Element types. */
typedef enum longattn_dtype { LONGATTN_DTYPE_F32 = 0, LONGATTN_DTYPE_BF16 = 1, LONGATTN_DTYPE_F16 = 2 } longattn_dtype;

typedef enum longattn_device_kind { LONGATTN_DEVICE_CPU = 0, LONGATTN_DEVICE_CUDA = 1 } longattn_device_kind;

/* Where memory lives: the CPU (index 0), or CUDA device `index`. */
typedef struct longattn_device {
  longattn_device_kind kind;
  int index;
} longattn_device;

/* How a sequence is spread over the ranks of a ring (layout.hpp): contiguous slices, zigzag
 * (chunks r and 2P-1-r of 2P, balanced under a causal mask) or striped (token t on rank t mod P). */
typedef enum longattn_layout {
  LONGATTN_LAYOUT_CONTIGUOUS = 0,
  LONGATTN_LAYOUT_ZIGZAG = 1,
  LONGATTN_LAYOUT_STRIPED = 2
} longattn_layout;

/* Sequence-parallel strategy (parallel_attention.hpp): a ring over all ranks; Ulysses (head
 * all-to-all over all ranks); hybrid U x R (Ulysses inside groups of U ranks, a ring over the R
 * groups); automatic (U and R from the cost model for this shape and machine). */
typedef enum longattn_strategy {
  LONGATTN_STRATEGY_RING = 0,
  LONGATTN_STRATEGY_ULYSSES = 1,
  LONGATTN_STRATEGY_HYBRID = 2,
  LONGATTN_STRATEGY_AUTO = 3
} longattn_strategy;

/* A tensor the caller owns, described, never copied: `data` points at element [0, ..., 0];
 * `shape` and `strides` (in elements, not bytes) have `ndim` meaningful entries (1..4). The
 * kernels read dense row-major tensors only: strides must be those of a contiguous tensor (a
 * dimension of extent 1 may have any stride), otherwise the call fails with
 * LONGATTN_ERROR_INVALID_ARGUMENT; pass a contiguous copy instead. longattn_tensor_contiguous()
 * fills the strides for you. `data` may be NULL only when the tensor has no elements. */
typedef struct longattn_tensor {
  void* data;
  longattn_dtype dtype;
  longattn_device device;
  int ndim;
  int64_t shape[4];
  int64_t strides[4];
} longattn_tensor;

/* Opaque handles. */
typedef struct longattn_comm longattn_comm;           /* a communicator: which ranks take part, how bytes move */
typedef struct longattn_context longattn_context;     /* the local attention backend and the device it runs on */
typedef struct longattn_attention longattn_attention; /* one attention problem planned over a communicator */

/* ---- Version and errors ------------------------------------------------------------------ */

/* LONGATTN_ABI_VERSION of the library actually linked. */
int longattn_abi_version(void);
/* The library's release, "major.minor.patch". Static storage; never NULL. */
const char* longattn_version_string(void);
/* The message of the last failed call on this thread ("" when none failed yet). Valid until the
 * next failing call on the same thread. Never NULL. */
const char* longattn_last_error(void);
/* A short name for a status ("ok", "invalid_argument", ...). Static storage; never NULL. */
const char* longattn_status_name(longattn_status status);

/* ---- Tensor descriptors ------------------------------------------------------------------ */

/* A descriptor of a dense row-major tensor: the strides are computed from `shape`.
 * data:   the first element (may be NULL when a dimension is 0).
 * dtype:  element type.
 * device: where `data` lives.
 * ndim:   number of dimensions, 1..4 (others give a descriptor with ndim 0, refused by every call).
 * shape:  ndim extents, each >= 0. */
longattn_tensor longattn_tensor_contiguous(void* data, longattn_dtype dtype, longattn_device device, int ndim,
                                           const int64_t* shape);

/* ---- Communicators ----------------------------------------------------------------------- */

/* A communicator over every process of the MPI job (MPI_COMM_WORLD). Initializes MPI (thread
 * level MULTIPLE) when nobody has; MPI initialized here is finalized when the process exits.
 * out: receives the handle; destroy it with longattn_comm_destroy. */
longattn_status longattn_comm_create_mpi_world(longattn_comm** out);

/* A communicator over an MPI communicator of the caller's, given by its Fortran handle
 * (MPI_Comm_c2f(comm) in C, comm.py2f() in mpi4py), so that no MPI header type crosses this
 * ABI. Collective over that communicator. longattn works on its own duplicate, so the caller's
 * communicator may be freed afterwards. MPI must be initialized.
 * out: receives the handle. */
longattn_status longattn_comm_create_mpi(int64_t mpi_fortran_handle, longattn_comm** out);

/* A communicator over TCP for jobs launched without MPI (torchrun, or any launcher that sets its
 * variables): MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE (required), LOCAL_RANK, LOCAL_WORLD_SIZE
 * (optional). Rank 0 listens for the rendezvous at MASTER_PORT + port_offset (torch's own store
 * may hold MASTER_PORT itself: 1 is a good offset); every rank then connects to every other.
 * Collective over WORLD_SIZE processes. Host memory only (bootstrap NCCL from it for GPUs). A
 * missing or malformed variable is LONGATTN_ERROR_INVALID_ARGUMENT naming it; a rank that never
 * joins, LONGATTN_ERROR_TIMEOUT after LONGATTN_COMM_TIMEOUT_S. out: receives the handle. */
longattn_status longattn_comm_create_tcp_from_env(int port_offset, longattn_comm** out);

/* NCCL over GPU buffers, one GPU per rank (picked from the local rank), bootstrapped through
 * `host` (an MPI or TCP communicator, used for the NCCL unique id and for host-side agreement).
 * Collective. `host` must outlive the result. LONGATTN_ERROR_UNSUPPORTED where longattn was built
 * without NCCL. out: receives the handle. */
longattn_status longattn_comm_create_nccl(longattn_comm* host, longattn_comm** out);

/* Releases a communicator (NULL is ignored). Not collective; every attention object made over it
 * must be destroyed first. A TCP communicator lets queued messages be written for at most its
 * timeout, then closes the connections (logging a warning naming the peers that did not read). */
void longattn_comm_destroy(longattn_comm* comm);

/* This process's rank in `comm`, 0..size-1. */
longattn_status longattn_comm_rank(const longattn_comm* comm, int* rank);
/* The number of ranks in `comm`. */
longattn_status longattn_comm_size(const longattn_comm* comm, int* size);
/* The longest one wait may block before failing with LONGATTN_ERROR_TIMEOUT (a dead or stuck
 * peer), in seconds, >= 1. The default is LONGATTN_COMM_TIMEOUT_S. */
longattn_status longattn_comm_set_timeout(longattn_comm* comm, int seconds);

/* ---- Context ----------------------------------------------------------------------------- */

/* The local attention backend every attention object made with this context runs.
 * backend: "auto" (or NULL: the fastest for the device), "cpu", "reference" (double-precision
 *          oracle, slow), "cuda", "cudnn" (where built); LONGATTN_BACKEND overrides "auto".
 * device:  where the tensors of every call will live. For CUDA, `index` names the device the
 *          caller has made current; tensors on another device are refused.
 * out:     receives the handle; destroy it with longattn_context_destroy after every attention
 *          object made with it. */
longattn_status longattn_context_create(const char* backend, longattn_device device, longattn_context** out);
void longattn_context_destroy(longattn_context* context);

/* ---- Distributed attention --------------------------------------------------------------- */

/* What is attended and how. Initialize with longattn_attention_params_init, then set fields;
 * `struct_size` lets later versions add fields at the end without breaking callers. Every field
 * must be the same on every rank. */
typedef struct longattn_attention_params {
  size_t struct_size;          /* sizeof(longattn_attention_params), set by _init */
  const int32_t* cu_seqlens;   /* prefix sums of the whole (global) batch: batch + 1 entries, from 0,
                                  non-decreasing. One sequence of T tokens: {0, T}. Copied. */
  int batch;                   /* number of sequences, >= 1 */
  int q_heads;                 /* query heads */
  int kv_heads;                /* key/value heads; q_heads % kv_heads == 0 (GQA/MQA) */
  int head_dim;                /* elements per head */
  longattn_dtype dtype;        /* of q, k, v */
  int causal;                  /* nonzero: each token attends to the tokens before it in its sequence */
  float scale;                 /* softmax scale; 0 means 1/sqrt(head_dim) */
  longattn_layout layout;      /* over all ranks (ring) or over the ring dimension (hybrid) */
  longattn_strategy strategy;  /* default LONGATTN_STRATEGY_RING */
  int ulysses_size;            /* hybrid's U (divides the ranks and q_heads); 0: one node's ranks */
  const char* machine_file;    /* automatic's machine model file, or NULL for the built-in model */
  longattn_dtype gradient_transport; /* dtype of the ring backward's travelling dK/dV: F32 or BF16 */
} longattn_attention_params;

/* Defaults: one empty sequence to be set, 1 head, head_dim 64, BF16, not causal, scale 0, zigzag,
 * ring, ulysses_size 0, no machine file, F32 gradient transport. */
void longattn_attention_params_init(longattn_attention_params* params);

/* Plans `params` over `comm` with `context`'s backend. Collective; the parameters are checked to
 * agree on every rank. Fails with LONGATTN_ERROR_INVALID_ARGUMENT naming the valid choices when the
 * strategy cannot run the shape (a Ulysses size that does not divide the ranks or the heads).
 * `context` and `comm` must outlive the result. out: receives the handle. */
longattn_status longattn_attention_create(longattn_context* context, longattn_comm* comm,
                                          const longattn_attention_params* params, longattn_attention** out);
void longattn_attention_destroy(longattn_attention* attention);

/* What the object runs, after automatic made its choice. */
typedef struct longattn_attention_info {
  longattn_strategy strategy; /* never LONGATTN_STRATEGY_AUTO */
  int ulysses_size;           /* U: ranks per Ulysses group (1 for a ring) */
  int ring_size;              /* R = ranks / U */
  int64_t total_tokens;       /* tokens of the whole batch */
  int64_t local_tokens;       /* tokens this rank holds (rows of its q, k, v, o) */
} longattn_attention_info;
longattn_status longattn_attention_get_info(const longattn_attention* attention, longattn_attention_info* info);

/* Why this strategy: for automatic the candidates and their modelled times. Owned by the object,
 * valid while it lives. */
longattn_status longattn_attention_choice_reason(const longattn_attention* attention, const char** reason);

/* Which tokens rank `rank` holds, in its local order (sequence by sequence, positions increasing).
 * rank:          0..size-1 (any rank's shard can be asked for, on any rank).
 * tokens:        receives the count n (may be NULL).
 * global_index:  NULL, or room for `capacity` entries: the packed index in the whole batch of each
 *                local token.
 * positions:     NULL, or room for `capacity` entries: the position of each token in its sequence.
 * capacity:      entries the arrays can take; must be >= n when either array is given. */
longattn_status longattn_attention_shard_index(const longattn_attention* attention, int rank, int64_t* tokens,
                                               int64_t* global_index, int32_t* positions, int64_t capacity);

/* Copies rank `rank`'s rows out of a whole-batch tensor, and back. Token-major tensors only:
 * global [total_tokens, ...], local [local_tokens of rank, ...], same dtype and trailing
 * dimensions, both in CPU memory (for GPU tensors, gather with the indices of
 * longattn_attention_shard_index on the device). Unshard writes only rank's rows of `global`. */
longattn_status longattn_attention_shard(const longattn_attention* attention, int rank, const longattn_tensor* global,
                                         const longattn_tensor* local);
longattn_status longattn_attention_unshard(const longattn_attention* attention, int rank, const longattn_tensor* local,
                                           const longattn_tensor* global);

/* Forward on this rank's shard. Collective. With n = local_tokens:
 * q:   [n, q_heads, head_dim], the params' dtype.     k, v: [n, kv_heads, head_dim], same dtype.
 * o:   [n, q_heads, head_dim], q's dtype or F32 (written).
 * lse: [q_heads, n] F32 (written): natural-log log-sum-exp of each row's scaled scores; -inf (and
 *      o = 0) for a row that attends to nothing. Keep o and lse for the backward.
 * stream: the cudaStream_t the work is queued on, on GPUs (NULL: the default stream); ignored on
 *      CPUs. The call returns once the work is queued (CUDA) or done (CPU). A first call with a
 *      stream the object has not seen prepares it on every rank (collective, like the call). */
longattn_status longattn_attention_forward(longattn_attention* attention, const longattn_tensor* q,
                                           const longattn_tensor* k, const longattn_tensor* v, const longattn_tensor* o,
                                           const longattn_tensor* lse, void* stream);

/* Backward. Collective. q, k, v, o, lse as given to and returned by the forward; d_o: the gradient
 * of o, shaped like o (q's dtype or F32). Written: dq [n, q_heads, head_dim], dk and dv
 * [n, kv_heads, head_dim], each in q's dtype or F32. stream: as for the forward. */
longattn_status longattn_attention_backward(longattn_attention* attention, const longattn_tensor* q,
                                            const longattn_tensor* k, const longattn_tensor* v, const longattn_tensor* o,
                                            const longattn_tensor* lse, const longattn_tensor* d_o,
                                            const longattn_tensor* dq, const longattn_tensor* dk,
                                            const longattn_tensor* dv, void* stream);

/* ---- Balanced variable-length batches (varlen_attention.hpp) ------------------------------ */

/* A packed batch of sequences of very different lengths, planned over the ranks so that attention
 * is balanced (short sequences whole on one rank, medium ones over a group of a node's ranks, the
 * longest over nodes), with the remap between the two layouts a trainer uses:
 *  - the linear layout: the packed batch cut into `size` contiguous slices (what linear layers,
 *    norms and embeddings want: equal tokens per rank); rank r holds global rows
 *    [linear_begin(r), linear_begin(r) + linear_tokens(r)), slices differing by at most one token;
 *  - the attention layout: the plan's rows per rank (what attention wants: equal work per rank).
 * A step is: remap q, k, v to the attention layout, attention forward, remap o back; in the
 * backward, remap d_o to the attention layout, attention backward, remap dq, dk, dv back. */

/* How a batch is spread over the ranks:
 *   HIERARCHICAL: the cost-model planner (one rank, a group inside a node, or whole nodes);
 *   PER_SEQUENCE_ZIGZAG: every sequence cut into 2P zigzag chunks over all P ranks (one ring);
 *   WHOLE_SEQUENCES: every sequence whole on one rank, longest first onto the least loaded. */
typedef enum longattn_balance {
  LONGATTN_BALANCE_HIERARCHICAL = 0,
  LONGATTN_BALANCE_PER_SEQUENCE_ZIGZAG = 1,
  LONGATTN_BALANCE_WHOLE_SEQUENCES = 2
} longattn_balance;

typedef struct longattn_varlen longattn_varlen; /* a balanced batch: its plan, remap and attention */

/* What is planned. Initialize with longattn_varlen_params_init, then set fields; every field must
 * be the same on every rank (checked). */
typedef struct longattn_varlen_params {
  size_t struct_size;          /* sizeof(longattn_varlen_params), set by _init */
  const int32_t* cu_seqlens;   /* prefix sums of the whole batch: batch + 1 entries, from 0, non-decreasing
                                  (empty sequences allowed). Copied. */
  int batch;                   /* number of sequences, >= 1 */
  int q_heads;                 /* query heads */
  int kv_heads;                /* key/value heads; q_heads % kv_heads == 0 */
  int head_dim;                /* elements per head */
  longattn_dtype dtype;        /* of q, k, v */
  int causal;                  /* nonzero: each token attends to the tokens before it in its sequence */
  float scale;                 /* softmax scale; 0 means 1/sqrt(head_dim) */
  longattn_balance balance;    /* default LONGATTN_BALANCE_HIERARCHICAL */
  int gpus_per_node;           /* ranks per node, dividing the ranks; 0: the communicator's topology */
  int64_t cap_tokens;          /* most tokens one rank may hold in the attention layout; 0: no cap */
  const char* machine;         /* the cost model's built-in machine, "h100", "h200" or "cpu"; NULL: "cpu"
                                  for a CPU context, "h100" for a CUDA one */
  const char* machine_file;    /* rates and links replacing the built-in machine's, or NULL */
  longattn_dtype gradient_transport; /* dtype of the rings' travelling dK/dV in the backward: F32 or BF16 */
} longattn_varlen_params;

/* Defaults: one empty sequence to be set, 1 head, head_dim 64, BF16, causal, scale 0,
 * hierarchical, topology's node size, no cap, default machine, no machine file, F32 transport. */
void longattn_varlen_params_init(longattn_varlen_params* params);

/* Plans the batch over `comm` and prepares its remap and attention with `context`'s backend.
 * Collective; the parameters are checked to agree on every rank, and a refusal is the same
 * LONGATTN_ERROR_INVALID_ARGUMENT on every rank (a sequence or the batch that cannot fit under the
 * cap, ranks that are not whole nodes, heads that are not GQA, an unknown balance or machine).
 * `context` and `comm` must outlive the result. out: receives the handle. */
longattn_status longattn_varlen_create(longattn_context* context, longattn_comm* comm,
                                       const longattn_varlen_params* params, longattn_varlen** out);
/* Releases the handle (NULL is ignored). Not collective. */
void longattn_varlen_destroy(longattn_varlen* varlen);

/* This rank's figures, and the plan's modelled balance. */
typedef struct longattn_varlen_info {
  int64_t total_tokens;     /* tokens of the whole batch */
  int64_t linear_begin;     /* this rank's first global row in the linear layout */
  int64_t linear_tokens;    /* rows of this rank's tensors in the linear layout */
  int64_t attention_tokens; /* rows of this rank's q, k, v, o (and columns of lse) in the attention layout */
  int groups;               /* groups of ranks the plan runs (one per rank-set sharing sequences) */
  double modelled_imbalance; /* the cost model's slowest rank over the mean rank, >= 1 */
} longattn_varlen_info;
longattn_status longattn_varlen_get_info(const longattn_varlen* varlen, longattn_varlen_info* info);

/* Rank `rank`'s slice of the linear layout (any rank can be asked for, on any rank).
 * begin:  receives its first global row (may be NULL).   tokens: receives its row count (may be NULL). */
longattn_status longattn_varlen_linear_rows(const longattn_varlen* varlen, int rank, int64_t* begin, int64_t* tokens);

/* Which tokens rank `rank` holds in the attention layout, in its local order.
 * rank:          0..size-1 (any rank can be asked for, on any rank).
 * tokens:        receives the count n (may be NULL).
 * global_index:  NULL, or room for `capacity` entries: the packed index in the whole batch of each row.
 * positions:     NULL, or room for `capacity` entries: each row's position in its sequence.
 * capacity:      entries the arrays can take; must be >= n when either array is given. */
longattn_status longattn_varlen_attention_index(const longattn_varlen* varlen, int rank, int64_t* tokens,
                                                int64_t* global_index, int32_t* positions, int64_t capacity);

/* Moves rows from the linear layout to the attention layout: one all-to-all with variable counts.
 * Collective. Any token-major tensor: q, k, v or other activations in the forward, d_o in the
 * backward (the backward of to_linear is to_attention of the gradient, and the other way round).
 * linear:    [linear_tokens, ...] (read).   attention: [attention_tokens, ...] (written);
 *            the same dtype, the same dimensions after the first, both on the context's device.
 * stream:    the cudaStream_t the work is queued on, on GPUs (NULL: the default stream); ignored on
 *            CPUs. The call returns once the work is queued (CUDA) or done (CPU). */
longattn_status longattn_varlen_to_attention(longattn_varlen* varlen, const longattn_tensor* linear,
                                             const longattn_tensor* attention, void* stream);
/* The inverse: attention [attention_tokens, ...] (read) to linear [linear_tokens, ...] (written):
 * o in the forward, dq, dk, dv in the backward. Collective; stream as above. */
longattn_status longattn_varlen_to_linear(longattn_varlen* varlen, const longattn_tensor* attention,
                                          const longattn_tensor* linear, void* stream);

/* Attention forward on the attention layout. Collective. With n = attention_tokens:
 * q [n, q_heads, head_dim] and k, v [n, kv_heads, head_dim] in the params' dtype; o [n, q_heads,
 * head_dim] in it or F32 (written); lse [q_heads, n] F32 (written; -inf and o = 0 for an empty row).
 * stream: as for longattn_attention_forward (a first call with a new stream prepares it on every
 * rank, collectively). */
longattn_status longattn_varlen_forward(longattn_varlen* varlen, const longattn_tensor* q, const longattn_tensor* k,
                                        const longattn_tensor* v, const longattn_tensor* o, const longattn_tensor* lse,
                                        void* stream);
/* Backward on the attention layout. Collective. q, k, v, o, lse as given to and returned by the
 * forward; d_o shaped like o; written: dq [n, q_heads, head_dim], dk and dv [n, kv_heads, head_dim],
 * each in the params' dtype or F32. stream: as for the forward. */
longattn_status longattn_varlen_backward(longattn_varlen* varlen, const longattn_tensor* q, const longattn_tensor* k,
                                         const longattn_tensor* v, const longattn_tensor* o, const longattn_tensor* lse,
                                         const longattn_tensor* d_o, const longattn_tensor* dq,
                                         const longattn_tensor* dk, const longattn_tensor* dv, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* LONGATTN_LONGATTN_H */
