// .npy files: round trip, and every malformed file refused with a message naming the problem.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "longattn/error.hpp"
#include "longattn/npy.hpp"

namespace longattn {
namespace {

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "/longattn_npy_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" + name;
}

void expect_io_error(const std::string& path, const std::string& needle) {
  try {
    load_npy(path);
    FAIL() << "no error for " << path;
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io);
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "the message does not name the file: " << e.what();
  }
}

TEST(Npy, RoundTripKeepsShapeAndValues) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_real_distribution<float> u(-5, 5);
  std::vector<float> data(3 * 5 * 7);
  for (auto& x : data) x = u(rng);
  const auto path = temp_path("rt.npy");
  save_npy(path, data.data(), {3, 5, 7});
  const auto a = load_npy(path);
  EXPECT_EQ(a.shape, (std::vector<std::int64_t>{3, 5, 7}));
  EXPECT_EQ(a.data, data);
}

void write_file(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

// A version 1.0 header around the given dictionary text, padded as NumPy pads it.
std::string npy_header(const std::string& dict) {
  std::string h = dict;
  while ((10 + h.size() + 1) % 64) h += ' ';
  h += '\n';
  std::string out = std::string("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(h.size() & 0xff);
  out += static_cast<char>(h.size() >> 8);
  return out + h;
}

std::string shape_header(const std::string& shape) {
  return npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (" + shape + "), }");
}

TEST(Npy, MalformedFilesAreRefused) {
  expect_io_error(temp_path("missing.npy"), "cannot open");
  const auto write = write_file;
  const auto header = npy_header;
  write(temp_path("magic.npy"), "not a numpy file at all");
  expect_io_error(temp_path("magic.npy"), "bad magic");
  write(temp_path("f8.npy"), header("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }") + std::string(16, '\0'));
  expect_io_error(temp_path("f8.npy"), "not float32");
  write(temp_path("fortran.npy"), header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }") + std::string(16, '\0'));
  expect_io_error(temp_path("fortran.npy"), "Fortran");
  write(temp_path("order.npy"), header("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2, 2), }") + std::string(16, '\0'));
  expect_io_error(temp_path("order.npy"), "not True or False");
  write(temp_path("noshape.npy"), header("{'descr': '<f4', 'fortran_order': False, }") + std::string(16, '\0'));
  expect_io_error(temp_path("noshape.npy"), "no 'shape'");
  write(temp_path("open.npy"), header("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2 }") + std::string(16, '\0'));
  expect_io_error(temp_path("open.npy"), "no closing )");
  write(temp_path("short.npy"), header("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), }") + std::string(20, '\0'));
  expect_io_error(temp_path("short.npy"), "truncated data");
  write(temp_path("hdr.npy"), std::string("\x93NUMPY\x01\x00\xff", 9));
  expect_io_error(temp_path("hdr.npy"), "truncated header");
}

// Dimensions are parsed strictly: a sign, a number too large for any integer type, or stray text
// is an error naming the file, never a silently different shape.
TEST(Npy, ShapeDimensionsAreParsedStrictly) {
  std::mt19937 rng(std::random_device{}());
  const int a = std::uniform_int_distribution<int>(2, 9)(rng), b = std::uniform_int_distribution<int>(2, 9)(rng);
  const std::string data(static_cast<std::size_t>(a * b) * 4, '\x3f');
  const struct {
    std::string shape, needle;
  } cases[] = {
      {fmt::format("{}, -{}", a, b), fmt::format("negative dimension -{}", b)},
      {fmt::format("-{},", a), "negative dimension"},
      {fmt::format("18446744073709551615, {}", b), "dimension 18446744073709551615"},
      {"99999999999999999999999999", "more than the 2^40"},
      {"1099511627777", "more than the 2^40"},
      {"1048576, 1048576, 4", "more than 2^40 values"},
      {fmt::format("{}x, {}", a, b), "where a non-negative integer belongs"},
      {fmt::format("{},, {}", a, b), "empty dimension"},
      {fmt::format("+{}", a), "where a non-negative integer belongs"},
  };
  for (const auto& c : cases) {
    const auto path = temp_path("shape.npy");
    write_file(path, shape_header(c.shape) + data);
    SCOPED_TRACE(c.shape);
    expect_io_error(path, c.needle);
  }
}

TEST(Npy, AcceptedShapeSpellings) {
  std::mt19937 rng(std::random_device{}());
  const int n = std::uniform_int_distribution<int>(2, 9)(rng);
  std::vector<float> values(static_cast<std::size_t>(n) * 3);
  for (auto& x : values) x = std::uniform_real_distribution<float>(-3, 3)(rng);
  const std::string data(reinterpret_cast<const char*>(values.data()), values.size() * 4);
  const struct {
    std::string shape;
    std::vector<std::int64_t> want;
  } cases[] = {{fmt::format("{},", n * 3), {n * 3}}, {fmt::format("{}, 3", n), {n, 3}}, {fmt::format(" {} ,3 ", n), {n, 3}}};
  for (const auto& c : cases) {
    const auto path = temp_path("ok.npy");
    write_file(path, shape_header(c.shape) + data);
    const auto arr = load_npy(path);
    EXPECT_EQ(arr.shape, c.want) << c.shape;
    EXPECT_EQ(arr.data, values) << c.shape;
  }
}

// Reading a file in pieces of any size gives the values load_npy gives; reading past the end is an
// error naming the file.
TEST(Npy, ReaderReadsInPieces) {
  std::mt19937 rng(std::random_device{}());
  const int rows = std::uniform_int_distribution<int>(3, 40)(rng), cols = std::uniform_int_distribution<int>(1, 9)(rng);
  std::vector<float> data(static_cast<std::size_t>(rows * cols));
  for (auto& x : data) x = std::uniform_real_distribution<float>(-4, 4)(rng);
  const auto path = temp_path("pieces.npy");
  save_npy(path, data.data(), {rows, cols});
  NpyReader reader(path);
  EXPECT_EQ(reader.shape(), (std::vector<std::int64_t>{rows, cols}));
  ASSERT_EQ(reader.size(), rows * cols);
  std::vector<float> got(data.size());
  for (std::int64_t at = 0; at < reader.size();) {
    const std::int64_t piece = std::min<std::int64_t>(reader.size() - at, std::uniform_int_distribution<int>(1, 2 * cols)(rng));
    reader.read(got.data() + at, piece);
    at += piece;
  }
  EXPECT_EQ(got, data);
  float extra = 0;
  try {
    reader.read(&extra, 1);
    FAIL() << "read past the end";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

// A header promising more data than the file holds is refused before anything that size is allocated.
TEST(Npy, HugeShapeInASmallFileIsRefusedWithoutAllocating) {
  const auto path = temp_path("huge.npy");
  write_file(path, shape_header("1048576, 1048576") + std::string(64, '\x3f'));
  expect_io_error(path, "truncated data");
}

// Integer arrays (cu_seqlens and the like) come as int32 or int64, or as float32 where every value
// is an integer float32 holds exactly; values beyond int32 survive an int64 file.
TEST(Npy, IntegerArraysReadAsInt32Int64OrExactFloat32) {
  std::mt19937_64 rng(std::random_device{}());
  std::vector<std::int64_t> values(static_cast<std::size_t>(std::uniform_int_distribution<int>(1, 40)(rng)));
  for (auto& v : values) v = std::uniform_int_distribution<std::int64_t>(-(1LL << 31), (1LL << 31) - 1)(rng);
  const std::string shape = std::to_string(values.size()) + ",";
  auto bytes_of = [&](auto type_tag) {
    std::string data;
    for (const auto v : values) {
      const auto x = static_cast<decltype(type_tag)>(v);
      data.append(reinterpret_cast<const char*>(&x), sizeof x);
    }
    return data;
  };
  const auto as_int32 = temp_path("i4.npy"), as_int64 = temp_path("i8.npy");
  write_file(as_int32, npy_header("{'descr': '<i4', 'fortran_order': False, 'shape': (" + shape + "), }") + bytes_of(std::int32_t{}));
  auto wide = values;
  wide.back() += std::int64_t{1} << 40;  // beyond int32 and float32
  std::swap(values, wide);
  write_file(as_int64, npy_header("{'descr': '<i8', 'fortran_order': False, 'shape': (" + shape + "), }") + bytes_of(std::int64_t{}));
  std::swap(values, wide);
  EXPECT_EQ(load_npy_integers(as_int32).data, values);
  EXPECT_EQ(load_npy_integers(as_int64).data, wide);
  EXPECT_EQ(load_npy_integers(as_int64).shape, (std::vector<std::int64_t>{static_cast<std::int64_t>(values.size())}));
  for (auto& v : values) v = std::uniform_int_distribution<std::int64_t>(-(1 << 24), 1 << 24)(rng);
  const auto as_float = temp_path("exact_f4.npy");
  write_file(as_float, shape_header(shape) + bytes_of(float{}));
  EXPECT_EQ(load_npy_integers(as_float).data, values);

  auto expect_refused = [](const std::string& path, const std::string& needle) {
    try {
      load_npy_integers(path);
      FAIL() << "no error for " << path;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::io);
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "the message does not name the file: " << e.what();
    }
  };
  const float inexact[] = {0.0f, 33554432.0f};  // 2^25: an integer, but past where float32 is exact
  write_file(temp_path("big_f4.npy"), shape_header("2,") + std::string(reinterpret_cast<const char*>(inexact), 8));
  expect_refused(temp_path("big_f4.npy"), "value 1 is 33554432");
  const float fraction[] = {0.0f, 2.5f};
  write_file(temp_path("half_f4.npy"), shape_header("2,") + std::string(reinterpret_cast<const char*>(fraction), 8));
  expect_refused(temp_path("half_f4.npy"), "value 1 is 2.5");
  write_file(temp_path("f8_int.npy"), npy_header("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }") + std::string(16, '\0'));
  expect_refused(temp_path("f8_int.npy"), "not int32, int64 or float32");
  write_file(temp_path("short_i8.npy"), npy_header("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }") + std::string(20, '\0'));
  expect_refused(temp_path("short_i8.npy"), "truncated data");
  expect_refused(temp_path("missing_int.npy"), "cannot open");
}

}  // namespace
}  // namespace longattn
