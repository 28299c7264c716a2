// The server's KV cache: per (client, sequence) and layer, a list of fixed-size pages in host
// memory (the page layout the decode kernel reads), from a page pool that enforces a global memory
// limit and a per-client limit. Running out is a clear Error(out_of_capacity) for that request
// only; everyone else keeps being served. Thread-safe: attends hold shared locks on their
// sequences while the kernel runs, appends an exclusive one. With device "cuda" the KV lives in GPU
// memory instead of pages (gpu_kv.hpp), under the same limits and checks.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/cpu_decode.hpp"
#include "offload/gpu_kv.hpp"
#include "offload/protocol.hpp"

namespace longattn::offload {

// Fixed-size pages with a free list per size, so steady decode (pages filled and dropped at the
// same rate) stops calling the allocator. Cached free pages count against the limit: the limit is
// what the process really holds.
class PagePool {
 public:
  PagePool(std::size_t memory_limit, std::size_t per_client_limit);
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  // Throws Error(out_of_capacity) when the global or the client's limit would be passed.
  std::byte* allocate(std::uint64_t client, std::size_t bytes);
  void release(std::uint64_t client, std::byte* page, std::size_t bytes) noexcept;

  // The server's receive buffers hold frames on their way in: not KV, but memory the process holds
  // all the same, so they count against the same limit (a peer cannot announce its way past it).
  // Throws Error(out_of_capacity) when `bytes` more would pass the limit.
  void reserve_buffer(std::size_t bytes);
  void release_buffer(std::size_t bytes) noexcept;
  // KV held elsewhere (GPU memory) counted like pages: the same limits, the same errors.
  void charge(std::uint64_t client, std::size_t bytes);
  void uncharge(std::uint64_t client, std::size_t bytes) noexcept;

  std::size_t memory_limit() const noexcept { return limit_; }
  std::size_t in_use() const noexcept;    // bytes held by sequences
  std::size_t reserved() const noexcept;  // in use + cached free pages
  std::size_t buffers() const noexcept;   // bytes of receive buffers

 private:
  // Frees cached pages until `bytes` more fit under the limit (or none are left); under mu_.
  void trim_cache_for(std::size_t bytes);
  std::size_t held() const noexcept { return in_use_ + cached_ + buffers_; }  // under mu_

  mutable std::mutex mu_;
  std::size_t limit_, client_limit_;
  std::size_t in_use_ = 0, cached_ = 0, buffers_ = 0;
  std::unordered_map<std::uint64_t, std::size_t> per_client_;
  std::map<std::size_t, std::vector<std::byte*>> free_;
};

struct KvStoreOptions {
  std::size_t memory_limit = std::size_t{1} << 30;
  std::size_t per_client_limit = 0;  // 0 = the memory limit
  int page_tokens = 64;  // 64 tokens: one page per kv head is >= 8 KiB of contiguous rows at head_dim 64
  std::string device = "cpu";  // "cuda": KV in GPU memory, attention by the cuda backend
};

// One sequence as an operator sees it (the admin listing).
struct SequenceInfo {
  std::uint64_t client = 0, seq = 0;
  std::uint32_t layers = 0;
  std::size_t token_layers = 0;  // tokens held, summed over layers
  std::size_t bytes = 0;         // page bytes held
};

struct AttendStats {
  double kernel_seconds = 0;
  std::size_t kv_bytes_read = 0;
};

class KvStore {
 public:
  explicit KvStore(const KvStoreOptions& opt);
  ~KvStore();

  int page_tokens() const noexcept { return opt_.page_tokens; }

  // Idempotent: opening an existing sequence with the same geometry is fine, another geometry is
  // an error (drop it first).
  void open(std::uint64_t client, const Open& m);
  // Appends tokens [start, start + tokens) to one layer and returns the layer's length. A repeat of
  // an append already applied (start + tokens <= length) changes nothing; a gap is an error.
  std::int64_t append(std::uint64_t client, const Append& m);
  bool drop(std::uint64_t client, std::uint64_t seq);
  // Copies tokens [m.start, m.start + n) of one layer out as an export reply whose k and v point
  // into `k` and `v`: n is m.tokens cut to what the layer holds and to what fits max_kv_bytes (k and
  // v together). Throws when m.start is not below the layer's length or one token does not fit.
  ExportReply read(std::uint64_t client, const Export& m, std::size_t max_kv_bytes, std::vector<std::byte>& k,
                   std::vector<std::byte>& v) const;
  // Drops every sequence of `client`; returns how many there were.
  std::size_t drop_client(std::uint64_t client);
  std::vector<SequenceInfo> list() const;
  // Runs the decode kernel for one attend request; o [total_q, q_heads, head_dim] and
  // lse [q_heads, total_q] f32.
  AttendStats attend(std::uint64_t client, const Attend& m, float* o, float* lse, int threads);

  struct Stats {
    std::size_t sequences = 0, tokens = 0, bytes_in_use = 0, bytes_reserved = 0, memory_limit = 0, receive_buffers = 0;
  };
  Stats stats() const;
  PagePool& pool() noexcept { return pool_; }  // the server's receive buffers count against it too

 private:
  struct Layer {
    std::vector<std::byte*> pages;
    std::int64_t length = 0;
    GpuLayerKv gpu;  // device "cuda" only
  };
  struct Sequence {
    Open geom;
    std::uint64_t client = 0;
    PagePool* pool = nullptr;
    std::size_t page_bytes = 0;
    std::shared_mutex mu;
    bool dropped = false;  // under mu: an append that raced with drop must not add tokens
    std::vector<Layer> layers;
    ~Sequence();
  };
  using Key = std::pair<std::uint64_t, std::uint64_t>;  // (client, sequence)

  std::shared_ptr<Sequence> find(std::uint64_t client, std::uint64_t seq) const;

  AttendStats attend_on_gpu(const Attend& m, const std::vector<std::shared_ptr<Sequence>>& seqs, const float* q, float* o, float* lse);

  KvStoreOptions opt_;
  PagePool pool_;
  std::unique_ptr<GpuAttention> gpu_;  // device "cuda" only
  mutable std::mutex mu_;
  std::map<Key, std::shared_ptr<Sequence>> seqs_;
  std::atomic<std::size_t> tokens_{0};
};

// "64G", "512M", "1.5T", "4096" (bytes) -> bytes; throws Error(invalid_argument).
std::size_t parse_size(const std::string& text);
std::string format_bytes(std::size_t bytes);

}  // namespace longattn::offload
