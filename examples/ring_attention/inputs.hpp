// ring_attention's inputs from --load: the .npy files read, checked against each other and the
// flags, and refused when a value is NaN or infinite (or becomes infinite in the chosen dtype).
// Non-finite inputs are refused rather than propagated: the kernels' treatment of NaN and
// infinities is not exact on every backend, and a wrong answer must never look like a right one.
// Generated inputs lie in [-1, 1), so they are always finite.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "longattn/dtype_convert.hpp"
#include "longattn/error.hpp"
#include "longattn/npy.hpp"
#include "options.hpp"

namespace longattn::ring_job {

// One input tensor [T, heads, dim] as f32, read whole from a file.
struct Input {
  std::string path;
  std::vector<std::int64_t> shape;
  std::vector<float> full;
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

// The first element that is not finite, or not finite once stored as `dtype`, refused with the
// file, the tensor's index and the value.
inline void require_finite(const Input& in, DType dtype) {
  const auto& s = in.shape;
  for (std::size_t i = 0; i < in.full.size(); ++i) {
    const float x = in.full[i];
    const float stored = stored_as(x, dtype);
    if (std::isfinite(x) && std::isfinite(stored)) continue;
    const auto flat = static_cast<std::int64_t>(i);
    const auto token = flat / (s[1] * s[2]), head = flat / s[2] % s[1], dim = flat % s[2];
    const std::string what = std::isfinite(x) ? fmt::format("{} does not fit in {} (it would become {})", x, to_string(dtype), stored)
                                              : fmt::format("is {}", x);
    throw Error(ErrorCode::invalid_argument,
                fmt::format("{}: element [token {}, head {}, dim {}] {}; inputs must be finite: clean or rescale the tensor "
                            "before saving it",
                            in.path, token, head, dim, what));
  }
}

inline Input load_input(const std::string& dir, const char* name, DType dtype) {
  const std::string path = dir + "/" + name;
  auto a = load_npy(path);
  if (a.shape.size() != 3)
    throw Error(ErrorCode::io, fmt::format("{}: expected 3 dimensions [tokens, heads, dim], got shape ({})", path, fmt::join(a.shape, ", ")));
  if (a.shape[0] < 1 || a.shape[1] < 1 || a.shape[2] < 1)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("{}: shape ({}) is empty; ring attention needs at least one token, head and dimension", path,
                            fmt::join(a.shape, ", ")));
  Input in{path, a.shape, std::move(a.data)};
  require_finite(in, dtype);
  return in;
}

// A shape flag given together with --load must say what the files say.
inline void require_flag_matches(bool given, const char* flag, std::int64_t flag_value, std::int64_t file_value, const Input& file,
                                 const char* what) {
  if (given && flag_value != file_value)
    throw Error(ErrorCode::invalid_argument,
                fmt::format("--{} {} contradicts {}, which holds {} {}; with --load the files set the shape: drop --{} or fix the file",
                            flag, flag_value, file.path, file_value, what, flag));
}

// Reads the files of --load, checks them against each other and the flags, and sets the shape.
inline Inputs load_inputs(Options& opt) {
  Inputs in;
  if (opt.load.empty()) return in;
  in.q = load_input(opt.load, "q.npy", opt.dtype);
  in.k = load_input(opt.load, "k.npy", opt.dtype);
  in.v = load_input(opt.load, "v.npy", opt.dtype);
  if (opt.backward) in.d_o = load_input(opt.load, "do.npy", opt.dtype);
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

}  // namespace longattn::ring_job
