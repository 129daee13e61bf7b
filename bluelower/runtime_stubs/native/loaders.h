// Parsers for the untrusted inputs: the safetensors header and .npy images. They work on
// memory buffers (so the fuzz target can drive them) and throw bluelower::Error.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "json.h"

namespace bluelower {

struct TensorEntry {
  std::string dtype;             // "F32", "I64", ...
  int64_t itemsize = 0;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;   // byte offsets relative to the data section
};

struct SafetensorsIndex {
  uint64_t data_offset = 0;      // 8 + header length
  std::map<std::string, TensorEntry> tensors;
};

// `prefix` holds at least the first 8 + header_len bytes of a file of `file_size` bytes
// (it may hold more). Validates every entry against the file size.
SafetensorsIndex parse_safetensors(const uint8_t* prefix, size_t prefix_size, uint64_t file_size,
                                   const std::string& what);
// Header length of a safetensors file from its first 8 bytes (little endian).
uint64_t safetensors_header_len(const uint8_t* first8);

// An RGB image as uint8 [H, W, 3], row-major (docs/image-preprocessing.md, section 1).
struct ImageU8 {
  int64_t height = 0, width = 0;
  std::vector<uint8_t> pixels;
};

// A .npy file's bytes -> uint8 [H, W, 3]; uint8 used as is, float32 in [0, 1] converted
// with floor(x * 255 + 0.5) in float32. C or Fortran order. Any other dtype/shape: Error.
ImageU8 parse_npy_image(const uint8_t* data, size_t size, const std::string& what);

}  // namespace bluelower
