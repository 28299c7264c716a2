// .npy reader/writer for float32 C-order arrays, and a reader of integer arrays (int32, int64, or
// float32 holding exact integers). The header is parsed strictly: anything we do not
// understand is an error naming the file, never a silent misread.
#include "longattn/npy.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
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

namespace {

// Reads the magic, version and header of an open .npy file, leaving `in` at the first data byte;
// returns the header's dtype ('descr') and sets `shape` and `count` (values in the array).
std::string read_header(const std::string& path, std::ifstream& in, std::vector<std::int64_t>& shape, std::int64_t& count) {
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
  const std::string fortran = header_value(path, header, "fortran_order", 0, ',');
  if (fortran != "True" && fortran != "False") fail(path, fmt::format("header has 'fortran_order': {}, not True or False", fortran));
  if (fortran == "True") fail(path, "Fortran-ordered arrays are not supported; save np.ascontiguousarray(a)");
  shape = parse_shape(path, header_value(path, header, "shape", '(', ')'));
  count = 1;
  for (const auto d : shape) {
    if (d != 0 && count > kMaxElements / d)
      fail(path, fmt::format("shape ({}) holds more than 2^40 values; split the array", fmt::join(shape, ", ")));
    count *= d;
  }
  return descr;
}

// Compares with the bytes actually there before anything is allocated or read: a wrong header
// must cost neither memory nor a half-done job.
void check_data_present(const std::string& path, std::ifstream& in, const std::vector<std::int64_t>& shape, std::int64_t count,
                        int element_bytes, const char* type_name) {
  const auto data_begin = in.tellg();
  in.seekg(0, std::ios::end);
  const auto available = static_cast<std::int64_t>(in.tellg() - data_begin);
  in.seekg(data_begin);
  if (available < count * element_bytes)
    fail(path, fmt::format("truncated data: expected {} {} values ({} bytes) for shape ({}), the file holds {} bytes", count,
                           type_name, count * element_bytes, fmt::join(shape, ", "), available));
}

}  // namespace

NpyReader::NpyReader(const std::string& path) : path_(path), in_(path, std::ios::binary) {
  const std::string descr = read_header(path, in_, shape_, size_);
  if (descr != "<f4" && descr != "=f4")
    fail(path, fmt::format("dtype '{}' is not float32; save with np.save(path, a.astype(np.float32))", descr));
  check_data_present(path, in_, shape_, size_, 4, "float32");
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

NpyIntegerArray load_npy_integers(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  NpyIntegerArray arr;
  std::int64_t count = 0;
  const std::string descr = read_header(path, in, arr.shape, count);
  const char kind = descr.size() == 3 && (descr[0] == '<' || descr[0] == '=' || descr[0] == '|') ? descr[1] : '?';
  const int bytes = descr.size() == 3 ? descr[2] - '0' : 0;
  const bool integer = kind == 'i' && (bytes == 4 || bytes == 8), single = kind == 'f' && bytes == 4;
  if (!integer && !single)
    fail(path, fmt::format("dtype '{}' is not int32, int64 or float32; save with np.save(path, a.astype(np.int64))", descr));
  check_data_present(path, in, arr.shape, count, bytes, integer ? (bytes == 4 ? "int32" : "int64") : "float32");
  try {
    arr.data.resize(static_cast<std::size_t>(count));
  } catch (const std::bad_alloc&) {
    fail(path, fmt::format("not enough memory for its {} values", count));
  }
  std::vector<char> raw(static_cast<std::size_t>(count) * static_cast<std::size_t>(bytes));
  if (!in.read(raw.data(), static_cast<std::streamsize>(raw.size()))) fail(path, fmt::format("read failed for its {} values", count));
  // float32 holds every integer up to 2^24 exactly; beyond that, or off an integer, the value the
  // writer meant is already lost.
  constexpr float kExactFloat = 16777216.0f;
  for (std::size_t i = 0; i < arr.data.size(); ++i) {
    const char* at = raw.data() + i * static_cast<std::size_t>(bytes);
    if (integer && bytes == 4) {
      std::int32_t v;
      std::memcpy(&v, at, 4);
      arr.data[i] = v;
    } else if (integer) {
      std::memcpy(&arr.data[i], at, 8);
    } else {
      float x;
      std::memcpy(&x, at, 4);
      if (!(std::fabs(x) <= kExactFloat) || x != std::floor(x))
        fail(path, fmt::format("value {} is {}, not an integer a float32 holds exactly (at most 2^24); save the array as "
                               "int32 or int64",
                               i, x));
      arr.data[i] = static_cast<std::int64_t>(x);
    }
  }
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
