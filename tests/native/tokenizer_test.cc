// Test driver of runtime_stubs/native/tokenizer.cc (built and run by tests/test_text.py).
//
//   tokenizer_test TOKENIZER_JSON CASES
//
// Each line of CASES is "MODE FLAG ARGS": MODE d decodes the ids ARGS, s streams them
// (StreamDecoder, one put() per id, then flush()), FLAG 1 dropping special tokens; MODE e
// encodes the text whose UTF-8 is the hex ARGS, FLAG 1 adding special tokens. Each output
// line is the result: text as lowercase hex (stream: the chunks in hex, comma-separated,
// flush last), ids separated by spaces, or "error: MESSAGE" when the case throws.
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
      std::string text_hex;
      if (mode == "e") in >> text_hex;
      else for (int64_t id; in >> id;) ids.push_back(id);
      try {
        if (mode == "e") {
          std::string text;
          for (size_t i = 0; i + 1 < text_hex.size(); i += 2)
            text.push_back(char(std::stoi(text_hex.substr(i, 2), nullptr, 16)));
          std::string out;
          for (int64_t id : tok.encode(text, skip != 0)) out += (out.empty() ? "" : " ") + std::to_string(id);
          std::cout << out << "\n";
        } else if (mode == "d") {
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
