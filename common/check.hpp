// LONGATTN_REQUIRE: the one assertion macro. It throws longattn::Error with a formatted message;
// messages should say what was wrong and what the user can do about it.
#pragma once

#include <fmt/format.h>

#include "longattn/error.hpp"

#define LONGATTN_REQUIRE(cond, code, ...)                                     \
  do {                                                                        \
    if (!(cond)) throw ::longattn::Error((code), ::fmt::format(__VA_ARGS__)); \
  } while (0)

#define LONGATTN_INVALID(cond, ...) LONGATTN_REQUIRE(cond, ::longattn::ErrorCode::invalid_argument, __VA_ARGS__)
