// A small strict JSON parser (RFC 8259) for manifest.json and the safetensors header.
// Depth-limited, no exceptions other than bluelower::Error.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "util.h"

namespace bluelower {

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0.0;
  bool is_int = false;   // the literal had no fraction/exponent and fits in int64
  int64_t i = 0;
  std::string str;
  std::vector<Json> arr;
  std::vector<std::pair<std::string, Json>> obj;  // in document order

  const Json* find(const std::string& key) const;  // nullptr if absent / not an object
  // Typed accessors; `what` names the value in the error message.
  const Json& at(const std::string& key, const std::string& what) const;
  int64_t as_int(const std::string& what) const;
  double as_number(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  const std::vector<Json>& as_array(const std::string& what) const;
};

// Parses `text` (exactly one JSON value, optional whitespace around). Throws Error with
// "what: ..." on any syntax error.
Json parse_json(const char* data, size_t size, const std::string& what);

}  // namespace bluelower
