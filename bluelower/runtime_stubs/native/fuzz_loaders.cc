// libFuzzer target over the native runtime's readers of untrusted bytes (tests/test_fuzz.py
// builds it with clang -fsanitize=fuzzer,address,undefined and runs it for a fixed budget in
// every test run; docs/native-runtime.md, "Fuzzing"). The first byte selects:
//   0  the JSON parser (manifest.json, safetensors headers, tokenizer.json): strict UTF-8 and
//      depth checked as properties of what it accepts;
//   1  the safetensors index (file_size = input size): every accepted tensor lies in the file;
//   2  the .npy image reader + the resize/normalize to 16x16 + the relaxed grid and patch
//      cutting with S = 16 (images up to 4096 pixels);
//   3  tokenizer.json: load, encode fixed texts (ids in range), decode, and the streaming
//      decoder (its pieces concatenate to decode());
//   4  SHA-256.
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
//     fuzz_loaders.cc json.cc loaders.cc image.cc util.cc sha256.cc tokenizer.cc -o fuzz_loaders
//   ./fuzz_loaders -max_total_time=300 -max_len=65536 corpus/
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "image.h"
#include "json.h"
#include "loaders.h"
#include "sha256.h"
#include "tokenizer.h"

using namespace bluelower;

namespace {

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t n = (c >= 0xC2 && c <= 0xDF) ? 1 : (c >= 0xE0 && c <= 0xEF) ? 2 : (c >= 0xF0 && c <= 0xF4) ? 3 : 0;
    if (n == 0 || i + n >= s.size()) return false;  // the n continuation bytes s[i+1..i+n] must exist
    uint32_t cp = n == 1 ? (c & 0x1f) : n == 2 ? (c & 0x0f) : (c & 0x07);
    for (size_t k = 1; k <= n; ++k) {
      unsigned char b = static_cast<unsigned char>(s[i + k]);
      if ((b & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (b & 0x3f);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += n + 1;
  }
  return true;
}

int check_json(const Json& j, int depth) {
  if (depth > 65) __builtin_trap();  // the parser's depth limit
  if (j.kind == Json::String && !valid_utf8(j.str)) __builtin_trap();
  for (auto& v : j.arr) check_json(v, depth + 1);
  for (auto& kv : j.obj) {
    if (!valid_utf8(kv.first)) __builtin_trap();
    check_json(kv.second, depth + 1);
  }
  return 0;
}

void fuzz_tokenizer(const uint8_t* p, size_t n) {
  const std::string text(reinterpret_cast<const char*>(p), n);
  Tokenizer tok = Tokenizer::from_json_text(text, "fuzz");
  // A Strip decoder after Fuse strips the start of the *whole* text, so a window's text
  // depends on where the window starts: StreamDecoder (and text.py's, the same algorithm)
  // can differ from decode() there (found by this target; docs/native-runtime.md, "Fuzzing").
  // The equality is checked for every other decoder chain.
  const bool context_dependent = text.find("Strip") != std::string::npos;
  const int64_t vocab = tok.vocab_size();
  if (vocab < 0) __builtin_trap();
  if (tok.encode_unsupported().empty()) {
    for (const char* text : {"Hello world 123", " h\xc3\xa9llo  \xe4\xb8\x96\xe7\x95\x8c <s></s>\n", ""}) {
      for (bool special : {false, true}) {
        std::vector<int64_t> ids;
        try {
          ids = tok.encode(text, special);
        } catch (const Error&) {
          continue;
        }
        for (int64_t id : ids)
          if (id < 0 || id >= vocab) __builtin_trap();  // encode gives only ids the vocabulary has
      }
    }
  }
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < vocab && i < 24; ++i) ids.push_back((i * 7) % vocab);
  for (bool skip : {false, true}) {
    std::string whole;
    try {
      whole = tok.decode(ids, skip);
    } catch (const Error&) {
      continue;
    }
    StreamDecoder stream(tok, skip);
    std::string pieces;
    try {
      for (int64_t id : ids) pieces += stream.put(id);
      pieces += stream.flush();
    } catch (const Error&) {
      __builtin_trap();  // decode() of all ids worked: streaming them must too
    }
    if (pieces != whole && !context_dependent) __builtin_trap();  // StreamDecoder's contract (tokenizer.h)
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0] % 5;
  const uint8_t* p = data + 1;
  const size_t n = size - 1;
  try {
    switch (mode) {
      case 0: {
        Json j = parse_json(reinterpret_cast<const char*>(p), n, "fuzz");
        check_json(j, 0);
        break;
      }
      case 1: {
        SafetensorsIndex idx = parse_safetensors(p, n, n, "fuzz");
        for (auto& kv : idx.tensors)
          if (idx.data_offset + kv.second.end > n || kv.second.begin > kv.second.end) __builtin_trap();
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
      case 3:
        fuzz_tokenizer(p, n);
        break;
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
