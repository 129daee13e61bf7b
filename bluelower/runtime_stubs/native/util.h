// Shared helpers: the one error type (one line, shown on stderr by main) and file I/O.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace bluelower {

// Every user-visible failure. The message is one line (no trailing newline).
struct Error : std::runtime_error {
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Whole file into memory; throws Error naming the path.
std::vector<uint8_t> read_file(const std::string& path);
bool is_regular_file(const std::string& path);

}  // namespace bluelower
