// ring_attention's inputs from --load: the .npy files opened and checked against each other and
// the flags, then each rank's rows read, every value refused when it is NaN or infinite (or
// becomes infinite in the chosen dtype).
// Non-finite inputs are refused rather than propagated: the kernels' treatment of NaN and
// infinities is not exact on every backend, and a wrong answer must never look like a right one.
// Generated inputs lie in [-1, 1), so they are always finite.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "longattn/layout.hpp"
#include "longattn/npy.hpp"
#include "options.hpp"

namespace longattn::ring_job {

// One input file [T, heads, dim]: opened and checked first (header, shape), then read once,
// streaming, keeping only this rank's rows, so no rank holds a whole input.
struct Input {
  std::string path;
  std::optional<NpyReader> file;  // open until the rows are read
  std::vector<std::int64_t> shape;
  std::vector<float> rows;  // this rank's rows in local order, [n, heads * dim]
};

struct Inputs {
  std::optional<Input> q, k, v, d_o;
};

// x as the ring will see it once stored in `dtype`.
inline float stored_as(float x, DType dtype) {
  switch (dtype) {
    case DType::f32: return x;
    case DType::bf16: return bf16_to_f32(f32_to_bf16(x));
    case DType::f16: return f16_to_f32(f32_to_f16(x));
  }
  return x;
}

// Refuses a value that is not finite, or not finite once stored as `dtype`, naming the file and
// its place in the tensor.
inline void require_finite(const Input& in, std::int64_t flat, float x, DType dtype) {
  const float stored = stored_as(x, dtype);
  if (std::isfinite(x) && std::isfinite(stored)) return;
  const auto& s = in.shape;
  const auto token = flat / (s[1] * s[2]), head = flat / s[2] % s[1], dim = flat % s[2];
  const std::string what = std::isfinite(x) ? fmt::format("{} does not fit in {} (it would become {})", x, to_string(dtype), stored)
                                            : fmt::format("is {}", x);
  throw Error(ErrorCode::invalid_argument,
              fmt::format("{}: element [token {}, head {}, dim {}] {}; inputs must be finite: clean or rescale the tensor before "
                          "saving it",
                          in.path, token, head, dim, what));
}

inline Input open_input(const std::string& dir, const char* name) {
  Input in;
  in.path = dir + "/" + name;
  in.file.emplace(in.path);
  in.shape = in.file->shape();
  if (in.shape.size() != 3)
    throw Error(ErrorCode::io,
                fmt::format("{}: expected 3 dimensions [tokens, heads, dim], got shape ({})", in.path, fmt::join(in.shape, ", ")));
  if (in.shape[0] < 1 || in.shape[1] < 1 || in.shape[2] < 1)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("{}: shape ({}) is empty; ring attention needs at least one token, head and dimension", in.path,
                            fmt::join(in.shape, ", ")));
  return in;
}

// Reads the whole file once, in pieces: every value is checked (so the first bad one is named
// whichever rank holds it) and the rows of `shard` are kept.
inline void read_shard_rows(Input& in, const RankShard& shard, DType dtype) {
  const std::int64_t tokens = in.shape[0], width = in.shape[1] * in.shape[2];
  const auto& wanted = shard.global_index;  // increasing in every layout
  if (!std::is_sorted(wanted.begin(), wanted.end()))
    throw Error(ErrorCode::internal, "the shard's tokens are not in increasing order");
  in.rows.resize(wanted.size() * static_cast<std::size_t>(width));
  const std::int64_t chunk_rows = std::max<std::int64_t>(1, (std::int64_t{8} << 20) / width);
  std::vector<float> chunk(static_cast<std::size_t>(std::min(chunk_rows, tokens) * width));
  std::size_t next = 0;  // next wanted row
  for (std::int64_t first = 0; first < tokens; first += chunk_rows) {
    const std::int64_t count = std::min(chunk_rows, tokens - first);
    in.file->read(chunk.data(), count * width);
    for (std::int64_t i = 0; i < count * width; ++i) require_finite(in, first * width + i, chunk[static_cast<std::size_t>(i)], dtype);
    for (; next < wanted.size() && wanted[next] < first + count; ++next)
      std::copy_n(chunk.begin() + (wanted[next] - first) * width, width, in.rows.begin() + static_cast<std::ptrdiff_t>(next) * width);
  }
  in.file.reset();
}

// A shape flag given together with --load must say what the files say.
inline void require_flag_matches(bool given, const char* flag, std::int64_t flag_value, std::int64_t file_value, const Input& file,
                                 const char* what) {
  if (given && flag_value != file_value)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("--{} {} contradicts {}, which holds {} {}; with --load the files set the shape: drop --{} or fix the file",
                            flag, flag_value, file.path, file_value, what, flag));
}

// Opens the files of --load, checks their shapes against each other and the flags, and sets the
// shape; nothing the size of the data is read yet.
inline Inputs open_inputs(Options& opt) {
  Inputs in;
  if (opt.load.empty()) return in;
  in.q = open_input(opt.load, "q.npy");
  in.k = open_input(opt.load, "k.npy");
  in.v = open_input(opt.load, "v.npy");
  if (opt.backward) in.d_o = open_input(opt.load, "do.npy");
  const auto& qs = in.q->shape;
  if (in.k->shape != in.v->shape)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("k.npy and v.npy shapes differ: [{}] vs [{}]", fmt::join(in.k->shape, ","), fmt::join(in.v->shape, ",")));
  if (in.k->shape[0] != qs[0] || in.k->shape[2] != qs[2])
    throw Error(ErrorCode::invalid_argument,
                fmt::format("q.npy [{}] and k.npy [{}] disagree in tokens or head dim", fmt::join(qs, ","), fmt::join(in.k->shape, ",")));
  if (in.d_o && in.d_o->shape != qs)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("do.npy [{}] must have q.npy's shape [{}]", fmt::join(in.d_o->shape, ","), fmt::join(qs, ",")));
  if (qs[0] >= (std::int64_t{1} << 31) || qs[1] > 4096 || in.k->shape[1] > 4096 || qs[2] > 1024)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("{} [{}] is outside the supported sizes (tokens < 2^31, heads <= 4096, head dim <= 1024)", in.q->path,
                            fmt::join(qs, ",")));
  require_flag_matches(opt.given_seq_len, "seq-len", opt.seq_len, qs[0], *in.q, "tokens");
  require_flag_matches(opt.given_heads, "heads", opt.heads, qs[1], *in.q, "heads");
  require_flag_matches(opt.given_kv_heads, "kv-heads", opt.kv_heads, in.k->shape[1], *in.k, "heads");
  require_flag_matches(opt.given_head_dim, "head-dim", opt.head_dim, qs[2], *in.q, "dimensions per head");
  opt.seq_len = qs[0];
  opt.heads = static_cast<int>(qs[1]);
  opt.kv_heads = static_cast<int>(in.k->shape[1]);
  opt.head_dim = static_cast<int>(qs[2]);
  return in;
}

// This rank's rows of every opened file (after the memory estimate said they fit).
inline void read_inputs(Inputs& in, const RankShard& shard, DType dtype) {
  for (auto* file : {&in.q, &in.k, &in.v, &in.d_o})
    if (*file) read_shard_rows(**file, shard, dtype);
}

}  // namespace longattn::ring_job
