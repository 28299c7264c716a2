// .npy reader/writer for float32 C-order arrays. The header is parsed strictly: anything we do not
// understand is an error naming the file, never a silent misread.
#include "longattn/npy.hpp"

#include <algorithm>
#include <charconv>
#include <cstring>
#include <fstream>

#include <fmt/ranges.h>

#include "common/check.hpp"

namespace longattn {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::int64_t kMaxElements = std::int64_t{1} << 40;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::io, fmt::format("{}: {}", path, what));
}

std::string trimmed(const std::string& s) {
  const auto first = s.find_first_not_of(" \t"), last = s.find_last_not_of(" \t");
  return first == std::string::npos ? "" : s.substr(first, last - first + 1);
}

// The value of 'key' in the header's dictionary text: between `open` and `close` when open is not
// 0 ('descr': '<f4', 'shape': (2, 3)), else up to `close` or the closing brace ('fortran_order':
// False), trimmed.
std::string header_value(const std::string& path, const std::string& header, const std::string& key, char open, char close) {
  const auto at = header.find("'" + key + "'");
  if (at == std::string::npos) fail(path, fmt::format("header has no '{}'", key));
  auto pos = header.find_first_not_of(" \t", at + key.size() + 2);
  if (pos == std::string::npos || header[pos] != ':') fail(path, fmt::format("header has no value for '{}'", key));
  pos = header.find_first_not_of(" \t", pos + 1);
  if (pos == std::string::npos) fail(path, fmt::format("header has no value for '{}'", key));
  if (open) {
    if (header[pos] != open) fail(path, fmt::format("header's '{}' does not start with {}", key, open));
    const auto end = header.find(close, pos + 1);
    if (end == std::string::npos) fail(path, fmt::format("header's '{}' has no closing {}", key, close));
    return header.substr(pos + 1, end - pos - 1);
  }
  auto end = header.find_first_of(std::string(1, close) + "}", pos);
  if (end == std::string::npos) end = header.size();
  return trimmed(header.substr(pos, end - pos));
}

// The text between the parentheses of 'shape': (d0, d1, ...): decimal integers separated by
// commas, a trailing comma allowed ("(5,)"), "()" for a scalar. Anything else is refused, since a
// misread dimension would reinterpret the data silently.
std::vector<std::int64_t> parse_shape(const std::string& path, const std::string& text) {
  std::vector<std::int64_t> shape;
  std::string items = trimmed(text);
  if (items.empty()) return shape;
  if (items.back() == ',') items.pop_back();
  for (std::size_t start = 0;;) {
    const std::size_t comma = std::min(items.find(',', start), items.size());
    const std::string item = trimmed(items.substr(start, comma - start));
    if (item.empty()) fail(path, fmt::format("shape ({}) has an empty dimension", text));
    if (item[0] == '-') fail(path, fmt::format("shape ({}) has a negative dimension {}; dimensions are sizes", text, item));
    std::uint64_t value = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), value);
    const bool whole = end == item.data() + item.size();
    if (ec == std::errc::result_out_of_range || (ec == std::errc() && whole && value > static_cast<std::uint64_t>(kMaxElements)))
      fail(path, fmt::format("shape ({}) has dimension {}, more than the 2^40 values a file may hold", text, item));
    if (ec != std::errc() || !whole) fail(path, fmt::format("shape ({}) has '{}' where a non-negative integer belongs", text, item));
    shape.push_back(static_cast<std::int64_t>(value));
    if (comma == items.size()) break;
    start = comma + 1;
  }
  return shape;
}

}  // namespace

NpyReader::NpyReader(const std::string& path) : path_(path), in_(path, std::ios::binary) {
  auto& in = in_;
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

  const std::string descr = header_value(path, header, "descr", '\'', '\'');
  if (descr != "<f4" && descr != "=f4")
    fail(path, fmt::format("dtype '{}' is not float32; save with np.save(path, a.astype(np.float32))", descr));
  const std::string fortran = header_value(path, header, "fortran_order", 0, ',');
  if (fortran != "True" && fortran != "False") fail(path, fmt::format("header has 'fortran_order': {}, not True or False", fortran));
  if (fortran == "True") fail(path, "Fortran-ordered arrays are not supported; save np.ascontiguousarray(a)");
  shape_ = parse_shape(path, header_value(path, header, "shape", '(', ')'));
  std::int64_t count = 1;
  for (const auto d : shape_) {
    if (d != 0 && count > kMaxElements / d)
      fail(path, fmt::format("shape ({}) holds more than 2^40 values; split the array", fmt::join(shape_, ", ")));
    count *= d;
  }
  size_ = count;
  // Compare with the bytes actually there before anything is allocated or read: a wrong header
  // must cost neither memory nor a half-done job.
  const auto data_begin = in.tellg();
  in.seekg(0, std::ios::end);
  const auto available = static_cast<std::int64_t>(in.tellg() - data_begin);
  in.seekg(data_begin);
  if (available < count * 4)
    fail(path, fmt::format("truncated data: expected {} float32 values ({} bytes) for shape ({}), the file holds {} bytes", count,
                           count * 4, fmt::join(shape_, ", "), available));
}

void NpyReader::read(float* out, std::int64_t count) {
  if (count < 0 || count > size_ - position_)
    fail(path_, fmt::format("reading {} values at value {} runs past its {} values", count, position_, size_));
  if (!in_.read(reinterpret_cast<char*>(out), static_cast<std::streamsize>(count * 4)))
    fail(path_, fmt::format("read failed at value {} of {}", position_, size_));
  position_ += count;
}

NpyArray load_npy(const std::string& path) {
  NpyReader reader(path);
  NpyArray arr;
  arr.shape = reader.shape();
  try {
    arr.data.resize(static_cast<std::size_t>(reader.size()));
  } catch (const std::bad_alloc&) {
    fail(path, fmt::format("not enough memory for its {} float32 values", reader.size()));
  }
  reader.read(arr.data.data(), reader.size());
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
