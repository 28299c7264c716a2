// .npy files: round trip, and every malformed file refused with a message naming the problem.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <random>
#include <string>

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

TEST(Npy, MalformedFilesAreRefused) {
  expect_io_error(temp_path("missing.npy"), "cannot open");
  const auto write = [](const std::string& p, const std::string& bytes) { std::ofstream(p, std::ios::binary) << bytes; };
  auto header = [](const std::string& dict) {
    std::string h = dict;
    while ((10 + h.size() + 1) % 64) h += ' ';
    h += '\n';
    std::string out = std::string("\x93NUMPY\x01\x00", 8);
    out += static_cast<char>(h.size() & 0xff);
    out += static_cast<char>(h.size() >> 8);
    return out + h;
  };
  write(temp_path("magic.npy"), "not a numpy file at all");
  expect_io_error(temp_path("magic.npy"), "bad magic");
  write(temp_path("f8.npy"), header("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }") + std::string(16, '\0'));
  expect_io_error(temp_path("f8.npy"), "not float32");
  write(temp_path("fortran.npy"), header("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }") + std::string(16, '\0'));
  expect_io_error(temp_path("fortran.npy"), "Fortran");
  write(temp_path("short.npy"), header("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), }") + std::string(20, '\0'));
  expect_io_error(temp_path("short.npy"), "truncated data");
  write(temp_path("hdr.npy"), std::string("\x93NUMPY\x01\x00\xff", 9));
  expect_io_error(temp_path("hdr.npy"), "truncated header");
}

}  // namespace
}  // namespace longattn
