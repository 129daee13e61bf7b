// libFuzzer target over the parsers that read untrusted bytes: the JSON parser
// (manifest.json, safetensors header), the safetensors index and the .npy image reader
// (+ the resize/normalize and the relaxed grid + patch cutting that follow it, on a small
// patch size S = 16).
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined fuzz_loaders.cc json.cc \
//     loaders.cc image.cc util.cc sha256.cc -o fuzz_loaders && ./fuzz_loaders -max_total_time=300
#include <cstddef>
#include <cstdint>
#include <vector>

#include "image.h"
#include "json.h"
#include "loaders.h"
#include "sha256.h"

using namespace bluelower;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0] % 4;
  const uint8_t* p = data + 1;
  const size_t n = size - 1;
  try {
    switch (mode) {
      case 0: {
        Json j = parse_json(reinterpret_cast<const char*>(p), n, "fuzz");
        if (const Json* v = j.find("format_version")) (void)v->is_int;
        break;
      }
      case 1: {
        SafetensorsIndex idx = parse_safetensors(p, n, n, "fuzz");
        for (auto& kv : idx.tensors)
          if (idx.data_offset + kv.second.end > n) __builtin_trap();  // must have been rejected
        break;
      }
      case 2: {
        ImageU8 img = parse_npy_image(p, n, "fuzz");
        if (img.pixels.size() != size_t(img.height * img.width * 3)) __builtin_trap();
        if (img.height * img.width <= 4096) {
          std::vector<float> out(3 * 16 * 16);
          const float mean[3] = {0.5f, 0.5f, 0.5f}, stdv[3] = {0.5f, 0.5f, 0.5f};
          preprocess_whole_image(img, 16, mean, stdv, out.data());
          int64_t m = 0, g = 0;
          select_grid_relaxed(img.width, img.height, 1 + int64_t(size % 9), 16, 0.1, &m, &g);
          std::vector<float> patches = preprocess_grid(img, m, g, 16, mean, stdv);
          if (patches.size() != size_t((m * g + (m * g > 1)) * 3 * 16 * 16)) __builtin_trap();
        }
        break;
      }
      default: {
        Sha256 h;
        h.update(p, n);
        (void)h.hexdigest();
      }
    }
  } catch (const Error&) {
    // rejected with a message: fine
  }
  return 0;
}
