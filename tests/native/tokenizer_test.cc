// Test driver of runtime_stubs/native/tokenizer.cc (built and run by tests/test_text.py).
//
//   tokenizer_test TOKENIZER_JSON CASES
//
// Each line of CASES is "MODE SKIP ID ID ...": MODE d decodes, s streams (StreamDecoder,
// one put() per id, then flush()); SKIP 1 drops special tokens. Each output line is the
// result as lowercase hex (stream: the chunks in hex, comma-separated, flush last), or
// "error: MESSAGE" when the case throws.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "tokenizer.h"
#include "util.h"

namespace {
std::string hex(const std::string& s) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: tokenizer_test TOKENIZER_JSON CASES\n");
    return 2;
  }
  try {
    bluelower::Tokenizer tok = bluelower::Tokenizer::load(argv[1]);
    std::ifstream cases(argv[2]);
    std::string line;
    std::cout << "vocab_size " << tok.vocab_size() << "\n";
    while (std::getline(cases, line)) {
      std::istringstream in(line);
      std::string mode;
      int skip = 0;
      in >> mode >> skip;
      std::vector<int64_t> ids;
      for (int64_t id; in >> id;) ids.push_back(id);
      try {
        if (mode == "d") {
          std::cout << hex(tok.decode(ids, skip != 0)) << "\n";
        } else {
          bluelower::StreamDecoder stream(tok, skip != 0);
          std::string out;
          for (int64_t id : ids) out += hex(stream.put(id)) + ",";
          out += hex(stream.flush());
          std::cout << out << "\n";
        }
      } catch (const bluelower::Error& e) {
        std::cout << "error: " << e.what() << "\n";
      }
    }
  } catch (const bluelower::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
