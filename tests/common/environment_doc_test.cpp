// docs/environment.md and the variable table in common/config.cpp are one list written twice (the
// table is what the code may read, the page is what users read): same names, same defaults.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <regex>
#include <string>

#include "longattn/config.hpp"
#include "longattn/error.hpp"

namespace longattn {
namespace {

// Rows "| `NAME` | `default` | meaning |" of the page.
std::map<std::string, std::string> documented_variables() {
  std::ifstream in(std::string(LONGATTN_DOCS_DIR) + "/environment.md");
  EXPECT_TRUE(in.good()) << "cannot read " << LONGATTN_DOCS_DIR << "/environment.md";
  const std::regex row(R"(^\|\s*`(LONGATTN_[A-Z0-9_]+)`\s*\|\s*`([^`]*)`\s*\|)");
  std::map<std::string, std::string> out;
  std::string line;
  std::smatch m;
  while (std::getline(in, line))
    if (std::regex_search(line, m, row)) out[m[1]] = m[2];
  return out;
}

TEST(Environment, DocsListEveryVariableWithItsDefault) {
  const auto docs = documented_variables();
  ASSERT_FALSE(docs.empty()) << "no variable rows found in docs/environment.md";
  std::map<std::string, std::string> table;
  for (const auto& v : environment_variables()) table[v.name] = v.default_value;
  for (const auto& [name, def] : table) {
    const auto it = docs.find(name);
    if (it == docs.end()) {
      ADD_FAILURE() << name << " is in common/config.cpp but not in docs/environment.md";
    } else {
      EXPECT_EQ(it->second, def) << name << ": default differs between config.cpp and the docs";
    }
  }
  for (const auto& [name, def] : docs)
    EXPECT_TRUE(table.count(name)) << name << " is documented but common/config.cpp does not know it";
}

TEST(Environment, UndocumentedNamesCannotBeRead) {
  EXPECT_THROW(env_string("LONGATTN_NOT_A_VARIABLE"), Error);
}

}  // namespace
}  // namespace longattn
