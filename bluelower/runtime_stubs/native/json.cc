#include "json.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <set>

namespace bluelower {

namespace {

constexpr int kMaxDepth = 64;

struct Parser {
  const char* p;
  const char* end;
  std::string what;

  [[noreturn]] void fail(const std::string& msg) {
    throw Error(what + ": malformed JSON at byte " + std::to_string(p - start) + ": " + msg);
  }
  const char* start;

  static std::string printable(const std::string& s) {
    std::string out;
    for (unsigned char c : s.substr(0, 64)) out.push_back(c >= 0x20 && c < 0x7f && c != '"' ? char(c) : '?');
    return out;
  }
  void ws() {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p;
  }
  bool lit(const char* s) {
    size_t n = std::strlen(s);
    if (size_t(end - p) >= n && std::memcmp(p, s, n) == 0) { p += n; return true; }
    return false;
  }
  static void put_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) out.push_back(char(cp));
    else if (cp < 0x800) { out.push_back(char(0xC0 | (cp >> 6))); out.push_back(char(0x80 | (cp & 0x3F))); }
    else if (cp < 0x10000) {
      out.push_back(char(0xE0 | (cp >> 12))); out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(char(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(char(0xF0 | (cp >> 18))); out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(char(0x80 | ((cp >> 6) & 0x3F))); out.push_back(char(0x80 | (cp & 0x3F)));
    }
  }
  // A raw (unescaped) multi-byte character starting with `c` (already consumed): strict
  // UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF.
  void utf8_sequence(std::string& out, unsigned char c) {
    --p;  // report the lead byte's position
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) n = 1;
    else if (c == 0xE0) { n = 2; lo = 0xA0; }
    else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) n = 2;
    else if (c == 0xED) { n = 2; hi = 0x9F; }
    else if (c == 0xF0) { n = 3; lo = 0x90; }
    else if (c >= 0xF1 && c <= 0xF3) n = 3;
    else if (c == 0xF4) { n = 3; hi = 0x8F; }
    else fail("invalid UTF-8 in string");
    if (size_t(end - p) < n + 1) fail("invalid UTF-8 in string (truncated character)");
    for (size_t k = 1; k <= n; ++k) {
      unsigned char b = static_cast<unsigned char>(p[k]);
      if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) fail("invalid UTF-8 in string");
    }
    out.append(p, n + 1);
    p += n + 1;
  }
  uint32_t hex4() {
    if (end - p < 4) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = *p++;
      v <<= 4;
      if (c >= '0' && c <= '9') v |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') v |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= uint32_t(c - 'A' + 10);
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string string() {
    if (p >= end || *p != '"') fail("expected a string");
    ++p;
    std::string out;
    while (true) {
      if (p >= end) fail("unterminated string");
      unsigned char c = static_cast<unsigned char>(*p++);
      if (c == '"') break;
      if (c < 0x20) fail("control character in string");
      if (c >= 0x80) { utf8_sequence(out, c); continue; }
      if (c != '\\') { out.push_back(char(c)); continue; }
      if (p >= end) fail("unterminated escape");
      char e = *p++;
      switch (e) {
        case '"': out.push_back('"'); break;
        case '\\': out.push_back('\\'); break;
        case '/': out.push_back('/'); break;
        case 'b': out.push_back('\b'); break;
        case 'f': out.push_back('\f'); break;
        case 'n': out.push_back('\n'); break;
        case 'r': out.push_back('\r'); break;
        case 't': out.push_back('\t'); break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (!lit("\\u")) fail("unpaired surrogate");
            uint32_t lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired surrogate");
          }
          put_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
    return out;
  }
  void number(Json& v) {
    const char* s = p;
    bool integral = true;
    if (p < end && *p == '-') ++p;
    if (p >= end || !(*p >= '0' && *p <= '9')) fail("bad number");
    if (*p == '0') ++p;
    else while (p < end && *p >= '0' && *p <= '9') ++p;
    if (p < end && *p == '.') {
      integral = false; ++p;
      if (p >= end || !(*p >= '0' && *p <= '9')) fail("bad number");
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
      integral = false; ++p;
      if (p < end && (*p == '+' || *p == '-')) ++p;
      if (p >= end || !(*p >= '0' && *p <= '9')) fail("bad number");
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    std::string text(s, p);
    v.kind = Json::Number;
    v.num = std::strtod(text.c_str(), nullptr);
    if (integral) {
      errno = 0;
      char* e = nullptr;
      long long x = std::strtoll(text.c_str(), &e, 10);
      if (errno == 0 && e && *e == 0) { v.is_int = true; v.i = x; }
    }
  }
  void value(Json& v, int depth) {
    if (depth > kMaxDepth) fail("nested too deeply");
    ws();
    if (p >= end) fail("unexpected end");
    char c = *p;
    if (c == '{') {
      ++p; v.kind = Json::Object;
      ws();
      if (p < end && *p == '}') { ++p; return; }
      std::set<std::string> keys;
      while (true) {
        ws();
        const char* key_at = p;
        std::string key = string();
        if (!keys.insert(key).second) { p = key_at; fail("duplicate key \"" + printable(key) + "\""); }
        ws();
        if (p >= end || *p != ':') fail("expected ':'");
        ++p;
        v.obj.emplace_back(std::move(key), Json());
        value(v.obj.back().second, depth + 1);
        ws();
        if (p < end && *p == ',') { ++p; continue; }
        if (p < end && *p == '}') { ++p; return; }
        fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      ++p; v.kind = Json::Array;
      ws();
      if (p < end && *p == ']') { ++p; return; }
      while (true) {
        v.arr.emplace_back();
        value(v.arr.back(), depth + 1);
        ws();
        if (p < end && *p == ',') { ++p; continue; }
        if (p < end && *p == ']') { ++p; return; }
        fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      v.kind = Json::String; v.str = string();
    } else if (lit("true")) { v.kind = Json::Bool; v.b = true; }
    else if (lit("false")) { v.kind = Json::Bool; v.b = false; }
    else if (lit("null")) { v.kind = Json::Null; }
    else number(v);
  }
};

}  // namespace

Json parse_json(const char* data, size_t size, const std::string& what) {
  Parser ps{data, data + size, what, data};
  Json v;
  ps.value(v, 0);
  ps.ws();
  if (ps.p != ps.end) ps.fail("trailing characters");
  return v;
}

const Json* Json::find(const std::string& key) const {
  if (kind != Object) return nullptr;
  for (auto& kv : obj)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

const Json& Json::at(const std::string& key, const std::string& what) const {
  if (kind != Object) throw Error(what + " is not an object");
  const Json* v = find(key);
  if (!v) throw Error(what + " has no '" + key + "'");
  return *v;
}

int64_t Json::as_int(const std::string& what) const {
  if (kind != Number || !is_int) throw Error(what + " must be an integer");
  return i;
}

double Json::as_number(const std::string& what) const {
  if (kind != Number) throw Error(what + " must be a number");
  return num;
}

const std::string& Json::as_string(const std::string& what) const {
  if (kind != String) throw Error(what + " must be a string");
  return str;
}

const std::vector<Json>& Json::as_array(const std::string& what) const {
  if (kind != Array) throw Error(what + " must be an array");
  return arr;
}

}  // namespace bluelower
