// .npy reader/writer for float32 C-order arrays. The header is parsed strictly: anything we do not
// understand is an error naming the file, never a silent misread.
#include "longattn/npy.hpp"

#include <cstring>
#include <fstream>
#include <regex>

#include "common/check.hpp"

namespace longattn {
namespace {

constexpr char kMagic[] = "\x93NUMPY";

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::io, fmt::format("{}: {}", path, what));
}

}  // namespace

NpyArray load_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open (does the file exist and is it readable?)");
  char magic[6];
  unsigned char ver[2];
  if (!in.read(magic, 6) || std::memcmp(magic, kMagic, 6) != 0) fail(path, "not a .npy file (bad magic)");
  if (!in.read(reinterpret_cast<char*>(ver), 2)) fail(path, "truncated header");
  std::uint32_t header_len = 0;
  if (ver[0] == 1) {
    unsigned char b[2];
    if (!in.read(reinterpret_cast<char*>(b), 2)) fail(path, "truncated header");
    header_len = b[0] | (b[1] << 8);
  } else if (ver[0] == 2 || ver[0] == 3) {
    unsigned char b[4];
    if (!in.read(reinterpret_cast<char*>(b), 4)) fail(path, "truncated header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<std::uint32_t>(b[3]) << 24);
  } else {
    fail(path, fmt::format("unsupported .npy version {}", ver[0]));
  }
  if (header_len > (1u << 20)) fail(path, "header is implausibly large");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) fail(path, "truncated header");

  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'descr'\\s*:\\s*'([^']*)'"))) fail(path, "header has no 'descr'");
  if (m[1] != "<f4" && m[1] != "=f4")
    fail(path, fmt::format("dtype '{}' is not float32; save with np.save(path, a.astype(np.float32))", m[1].str()));
  if (!std::regex_search(header, m, std::regex("'fortran_order'\\s*:\\s*(True|False)"))) fail(path, "header has no 'fortran_order'");
  if (m[1] == "True") fail(path, "Fortran-ordered arrays are not supported; save np.ascontiguousarray(a)");
  if (!std::regex_search(header, m, std::regex("'shape'\\s*:\\s*\\(([^)]*)\\)"))) fail(path, "header has no 'shape'");

  NpyArray arr;
  const std::string dims = m[1];
  std::int64_t count = 1;
  const std::regex number("\\d+");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), number); it != std::sregex_iterator(); ++it) {
    const auto d = std::stoll(it->str());
    if (d < 0 || d > (std::int64_t{1} << 40)) fail(path, "dimension out of range");
    arr.shape.push_back(d);
    count *= d;
    if (count > (std::int64_t{1} << 40)) fail(path, "array too large");
  }
  arr.data.resize(static_cast<std::size_t>(count));
  if (!in.read(reinterpret_cast<char*>(arr.data.data()), static_cast<std::streamsize>(count * 4)))
    fail(path, fmt::format("truncated data: expected {} float32 values", count));
  return arr;
}

void save_npy(const std::string& path, const float* data, const std::vector<std::int64_t>& shape) {
  std::string dims;
  std::int64_t count = 1;
  for (auto d : shape) {
    dims += std::to_string(d) + ",";
    count *= d;
  }
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream out(path, std::ios::binary);
  if (!out) fail(path, "cannot create (does the directory exist and is it writable?)");
  out.write(kMagic, 6);
  const unsigned char ver[2] = {1, 0};
  out.write(reinterpret_cast<const char*>(ver), 2);
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff), static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<const char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * 4));
  if (!out) fail(path, "write failed (disk full?)");
}

}  // namespace longattn
