// Reading and writing NumPy .npy files (format 1.0/2.0, little-endian float32, C order), so jobs
// can take inputs from and hand results to Python.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace longattn {

struct NpyArray {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

// A .npy file read in order, a part at a time, so a program can keep only the rows it needs.
// The constructor checks the header and that the file holds all the data it promises; every error
// is an Error(io) naming the file.
class NpyReader {
 public:
  explicit NpyReader(const std::string& path);
  const std::vector<std::int64_t>& shape() const noexcept { return shape_; }
  std::int64_t size() const noexcept { return size_; }  // values in the array
  const std::string& path() const noexcept { return path_; }
  // The next `count` values in file (C) order.
  void read(float* out, std::int64_t count);

 private:
  std::string path_;
  std::ifstream in_;
  std::vector<std::int64_t> shape_;
  std::int64_t size_ = 0, position_ = 0;
};

// Throws Error(io) naming the file and what is wrong with it (missing, not .npy, not float32,
// Fortran order, truncated).
NpyArray load_npy(const std::string& path);

struct NpyIntegerArray {
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> data;
};
// An array of integers (offsets, lengths, indices): int32 or int64, or float32 whose every value is
// an integer of at most 2^24 (where float32 is still exact). Throws Error(io) naming the file (and
// the value, for an inexact float32).
NpyIntegerArray load_npy_integers(const std::string& path);
void save_npy(const std::string& path, const float* data, const std::vector<std::int64_t>& shape);

}  // namespace longattn
