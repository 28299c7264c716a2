// Reading and writing NumPy .npy files (format 1.0/2.0, little-endian float32, C order), so jobs
// can take inputs from and hand results to Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace longattn {

struct NpyArray {
  std::vector<std::int64_t> shape;
  std::vector<float> data;
};

// Throws Error(io) naming the file and what is wrong with it (missing, not .npy, not float32,
// Fortran order, truncated).
NpyArray load_npy(const std::string& path);
void save_npy(const std::string& path, const float* data, const std::vector<std::int64_t>& shape);

}  // namespace longattn
