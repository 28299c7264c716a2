// A small flag parser for the example programs: --name value, --name=value and boolean --name.
// Unknown flags and bad values are errors that name the flag. Given the program's usage text, it
// also answers --help, so every program and subcommand behaves the same way there.
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "longattn/config.hpp"

namespace longattn::examples {

class Flags {
 public:
  // `booleans` take no value; every other known flag takes one.
  Flags(int argc, char** argv, std::set<std::string> valued, std::set<std::string> booleans)
      : Flags(argc, argv, nullptr, std::move(valued), std::move(booleans)) {}

  // With `usage`: --help or -h anywhere prints it to stdout and exits 0 before anything else is
  // read (construct this before MPI starts, so the exit needs no MPI shutdown). The command line
  // and the LONGATTN_* environment are a program's two inputs, so both are checked here: a bad
  // variable is refused as early, and as plainly, as a bad flag.
  Flags(int argc, char** argv, const char* usage, std::set<std::string> valued, std::set<std::string> booleans) {
    if (usage)
      for (int i = 1; i < argc; ++i)
        if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
          std::fputs(usage, stdout);
          std::fflush(stdout);
          std::exit(0);
        }
    check_environment();
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a.rfind("--", 0) != 0) throw std::invalid_argument("unexpected argument '" + a + "' (flags start with --)");
      a = a.substr(2);
      std::string value;
      const auto eq = a.find('=');
      if (eq != std::string::npos) {
        value = a.substr(eq + 1);
        a = a.substr(0, eq);
      }
      if (booleans.count(a)) {
        values_[a] = eq == std::string::npos ? "1" : value;
      } else if (valued.count(a)) {
        if (eq == std::string::npos) {
          if (i + 1 >= argc) throw std::invalid_argument("--" + a + " needs a value");
          value = argv[++i];
        }
        values_[a] = value;
      } else {
        throw std::invalid_argument("unknown flag --" + a + " (see --help)");
      }
      canonical_ += " --" + a + "=" + values_[a];
    }
  }
  bool has(const std::string& name) const { return values_.count(name) != 0; }
  bool flag(const std::string& name) const {
    auto it = values_.find(name);
    return it != values_.end() && it->second != "0" && it->second != "false";
  }
  std::string str(const std::string& name, const std::string& fallback) const {
    auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second;
  }
  long long integer(const std::string& name, long long fallback, long long min, long long max) const {
    auto it = values_.find(name);
    if (it == values_.end()) return fallback;
    return parse_integer(name, it->second, it->second, min, max);
  }
  // A comma-separated list of integers ("8192,32768"), each in [min, max]; empty items are errors.
  std::vector<long long> integers(const std::string& name, std::vector<long long> fallback, long long min, long long max) const {
    auto it = values_.find(name);
    if (it == values_.end()) return fallback;
    std::vector<long long> out;
    for (std::size_t start = 0;;) {
      const std::size_t comma = it->second.find(',', start);
      out.push_back(parse_integer(name, it->second.substr(start, comma - start), it->second, min, max));
      if (comma == std::string::npos) return out;
      start = comma + 1;
    }
  }
  // All flags as given, normalized: what every rank must agree on.
  const std::string& canonical() const { return canonical_; }

 private:
  // `item` is one integer of `whole`, the flag's value (they differ for lists).
  static long long parse_integer(const std::string& name, const std::string& item, const std::string& whole, long long min,
                                 long long max) {
    const std::string given = item == whole ? "'" + whole + "'" : "'" + item + "' in '" + whole + "'";
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0') throw std::invalid_argument("--" + name + " needs an integer, got " + given);
    if (errno == ERANGE || v < min || v > max)
      throw std::invalid_argument((item == whole ? "--" + name + "=" + whole : "--" + name + ": " + given) + " is outside [" +
                                  std::to_string(min) + ", " + std::to_string(max) + "]");
    return v;
  }

  std::map<std::string, std::string> values_;
  std::string canonical_;
};

}  // namespace longattn::examples
