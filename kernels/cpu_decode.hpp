// The CPU decode kernel: a batch of decode queries (one or a few tokens per sequence) over paged
// KV caches in host memory. Memory-bound by nature, so the whole design is about reading each KV
// byte once: all query heads of a kv head (GQA group) and all query tokens of a sequence share one
// pass over that head's keys and values; sequences x KV chunks (x blocks of kv heads where the
// groups are large) are spread over threads, the AVX-512 path reading each chunk's pages front to
// back, and the chunk partials are joined with the LSE merge of DESIGN.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "longattn/tensor.hpp"

namespace longattn::kernels {

// Page layout (one page = page_tokens consecutive tokens of one sequence and layer):
//   K block [kv_heads][page_tokens][head_dim], then V block [kv_heads][page_tokens][head_dim],
// in kv_dtype. A kv head's rows are contiguous inside a page, so one pass streams them.
struct DecodeLayout {
  int q_heads = 0, kv_heads = 0, head_dim = 0;
  DType kv_dtype = DType::bf16;
  int page_tokens = 64;  // multiple of kDecodeBlockTokens

  std::size_t page_bytes() const noexcept {
    return 2 * static_cast<std::size_t>(kv_heads) * page_tokens * head_dim * dtype_size(kv_dtype);
  }
};

inline constexpr int kDecodeBlockTokens = 16;  // tokens scored together: one AVX-512 vector of scores
inline constexpr int kDecodeMaxHeadDim = 512;

// One sequence's stored KV (for one layer) and its query tokens.
struct DecodeSequence {
  const std::byte* const* pages = nullptr;  // ceil(length / page_tokens) pages
  std::int64_t length = 0;                  // tokens stored
  std::int64_t kv_start = 0;                // absolute position of stored token 0 (token-range shards)
  std::int64_t q_begin = 0;                 // its query rows: q[q_begin, q_begin + q_count)
  int q_count = 0;
};

struct DecodeArgs {
  DecodeLayout layout;
  const DecodeSequence* seqs = nullptr;
  int num_seqs = 0;
  std::int64_t total_q = 0;
  const float* q = nullptr;                  // [total_q, q_heads, head_dim]
  const std::int64_t* q_positions = nullptr;  // [total_q] absolute positions (causal); null = see all
  float scale = 0.0f;                        // 0 => 1 / sqrt(head_dim)
  int threads = 0;                           // 0 => OpenMP default
  std::int64_t chunk_tokens = 0;             // 0 => chosen from the work size; else a multiple of 16
  float* o = nullptr;                        // [total_q, q_heads, head_dim] f32
  float* lse = nullptr;                      // [q_heads, total_q] f32, natural log; -inf (and o = 0) for no key
};

// Ordered: each level may run every path below it. avx512_bf16 = AVX-512 plus AVX512_BF16 (bf16 K
// scored with vdpbf16ps); avx512 forces the plain AVX-512 path on such CPUs.
enum class DecodeIsa { generic, avx2, avx512, avx512_bf16 };
const char* to_string(DecodeIsa isa) noexcept;

// The best instruction set this CPU supports (checked at run time with __builtin_cpu_supports).
DecodeIsa best_decode_isa() noexcept;

// Runs the kernel; `isa` may force a lower path (tests run every path the CPU has). Throws
// Error(invalid_argument) for inconsistent arguments.
void cpu_decode(const DecodeArgs& args);
void cpu_decode(const DecodeArgs& args, DecodeIsa isa);

// Bytes of KV the call reads (what GB/s figures divide by).
std::size_t decode_kv_bytes(const DecodeArgs& args) noexcept;

}  // namespace longattn::kernels
