// Minimal SHA-256 (FIPS 180-4), no dependencies. Used to verify bundle files.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace bluelower {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t len);
  // Finalizes; returns the lowercase hex digest. The object must not be updated afterwards.
  std::string hexdigest();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

// SHA-256 of a whole file, streamed; throws bluelower::Error if it cannot be read.
std::string file_sha256(const std::string& path);

}  // namespace bluelower
