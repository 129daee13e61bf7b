#include "tokenizer.h"

#include <algorithm>
#include <cstdio>

#include "util.h"

namespace bluelower {

namespace {

// ------------------------------------------------------------------------ UTF-8

void put_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(char(cp));
  } else if (cp < 0x800) {
    out.push_back(char(0xC0 | (cp >> 6)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(char(0xE0 | (cp >> 12)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(char(0xF0 | (cp >> 18)));
    out.push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(char(0x80 | (cp & 0x3F)));
  }
}

const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD

// Length of the valid UTF-8 sequence at s[i], or 0 with *consumed = the bytes of its
// maximal invalid subpart (Unicode 3.9, table 3-7: the second byte's range depends on
// the first).
size_t utf8_sequence(const std::string& s, size_t i, size_t* consumed) {
  const unsigned char b = static_cast<unsigned char>(s[i]);
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b < 0x80) return 1;
  if (b >= 0xC2 && b <= 0xDF) need = 1;
  else if (b == 0xE0) { need = 2; lo = 0xA0; }
  else if (b >= 0xE1 && b <= 0xEC) need = 2;
  else if (b == 0xED) { need = 2; hi = 0x9F; }
  else if (b >= 0xEE && b <= 0xEF) need = 2;
  else if (b == 0xF0) { need = 3; lo = 0x90; }
  else if (b >= 0xF1 && b <= 0xF3) need = 3;
  else if (b == 0xF4) { need = 3; hi = 0x8F; }
  else { *consumed = 1; return 0; }
  size_t k = 1;
  for (; k <= need && i + k < s.size(); ++k) {
    const unsigned char c = static_cast<unsigned char>(s[i + k]);
    if (c < lo || c > hi) break;
    lo = 0x80; hi = 0xBF;
  }
  if (k == need + 1) return k;
  *consumed = k;
  return 0;
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    size_t bad = 0, n = utf8_sequence(s, i, &bad);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

// The code points of a UTF-8 string that tokenizer.json holds (valid: json.cc wrote it).
std::vector<uint32_t> code_points(const std::string& s) {
  std::vector<uint32_t> out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char b = static_cast<unsigned char>(s[i]);
    size_t n = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
    uint32_t cp = n == 1 ? b : n == 2 ? (b & 0x1F) : n == 3 ? (b & 0x0F) : (b & 0x07);
    for (size_t k = 1; k < n && i + k < s.size(); ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out.push_back(cp);
    i += n;
  }
  return out;
}

std::string from_code_points(const std::vector<uint32_t>& cps, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) put_utf8(out, cps[i]);
  return out;
}

// The GPT-2 byte alphabet (tokenizers' bytes_char): printable bytes map to themselves,
// the other 68 to U+0100 upward in byte order.
struct ByteAlphabet {
  uint32_t byte_to_cp[256];
  std::unordered_map<uint32_t, uint8_t> cp_to_byte;
  ByteAlphabet() {
    auto printable = [](int b) {
      return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    };
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) byte_to_cp[b] = printable(b) ? uint32_t(b) : 256 + n++;
    for (int b = 0; b < 256; ++b) cp_to_byte[byte_to_cp[b]] = uint8_t(b);
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

bool byte_token_value(const std::string& t, uint8_t* value) {
  // ByteFallback's test: exactly "<0x" two hex digits ">"
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return false;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  int h = hex(t[3]), l = hex(t[4]);
  if (h < 0 || l < 0) return false;
  *value = uint8_t(h * 16 + l);
  return true;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out += to;
  }
  out.append(s, pos, std::string::npos);
  s.swap(out);
}

bool is_ascii(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
}

const std::string& string_field(const Json& obj, const char* key, const std::string& what) {
  return obj.at(key, what).as_string(what + "." + key);
}

std::string replace_pattern(const Json& d, const std::string& what) {
  const Json& pattern = d.at("pattern", what);
  if (const Json* s = pattern.find("String")) return s->as_string(what + ".pattern.String");
  throw Error(what + ": only a String pattern is supported in Replace, not a Regex");
}

// What tokenizers' added vocabulary does to a token with "normalized": true before
// decoding it: the normalizer's output (normalized_cache). Only normalizers whose effect
// on the token is known here are accepted.
void normalize_added(const Json& n, std::string& s, const std::string& what) {
  if (n.kind == Json::Null || s.empty()) return;
  const std::string& type = string_field(n, "type", what);
  if (type == "Sequence") {
    for (const Json& step : n.at("normalizers", what).as_array(what + ".normalizers")) normalize_added(step, s, what);
  } else if (type == "Prepend") {
    s = string_field(n, "prepend", what) + s;
  } else if (type == "Replace") {
    replace_all(s, replace_pattern(n, what), string_field(n, "content", what));
  } else if ((type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") && is_ascii(s)) {
    // ASCII is its own normal form
  } else if (type == "Lowercase" && is_ascii(s)) {
    for (char& c : s) if (c >= 'A' && c <= 'Z') c = char(c - 'A' + 'a');
  } else if (type == "ByteLevel") {
    std::string out;
    for (unsigned char b : s) put_utf8(out, byte_alphabet().byte_to_cp[b]);
    s.swap(out);
  } else {
    throw Error(what + ": an added token with \"normalized\": true under a " + type +
                " normalizer (not supported for decoding)");
  }
}

const char* kCleanup[][2] = {{" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"},
                             {" 'm", "'m"}, {" do not", " don't"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};

}  // namespace

std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    size_t bad = 0, n = utf8_sequence(bytes, i, &bad);
    if (n) {
      out.append(bytes, i, n);
      i += n;
    } else {
      out += kReplacement;
      i += bad;
    }
  }
  return out;
}

// -------------------------------------------------------------------- loading

Tokenizer Tokenizer::load(const std::string& path) {
  std::vector<uint8_t> data = read_file(path);
  return from_json_text(std::string(data.begin(), data.end()), path);
}

Tokenizer Tokenizer::from_json_text(const std::string& text, const std::string& what) {
  Json root = parse_json(text.data(), text.size(), what);
  if (root.kind != Json::Object) throw Error(what + ": not a tokenizer.json (not a JSON object)");
  Tokenizer t;
  // ids index a dense table: bound them so a malformed file cannot ask for gigabytes (the
  // largest real vocabularies have ~262k entries; 4,194,304 empty slots take ~134 MB)
  constexpr int64_t kMaxTokenId = (int64_t(1) << 22) - 1;
  auto set = [&](int64_t id, const std::string& tok, const std::string& where) {
    if (id < 0 || id > kMaxTokenId)
      throw Error(where + ": token id " + std::to_string(id) + " out of range [0, " + std::to_string(kMaxTokenId) +
                  "]");
    if (id >= int64_t(t.tokens_.size())) {
      t.tokens_.resize(size_t(id) + 1);
      t.has_.resize(size_t(id) + 1, false);
    }
    t.tokens_[size_t(id)] = tok;
    t.has_[size_t(id)] = true;
  };
  const Json& model = root.at("model", what);
  const std::string mwhat = what + ": model";
  const Json& vocab = model.at("vocab", mwhat);
  std::unordered_map<std::string, int64_t> model_ids;
  if (vocab.kind == Json::Object) {  // BPE, WordPiece, WordLevel: {"token": id}
    for (const auto& kv : vocab.obj) {
      int64_t id = kv.second.as_int(mwhat + ".vocab[\"" + kv.first + "\"]");
      set(id, kv.first, mwhat + ".vocab");
      model_ids.emplace(kv.first, id);
    }
  } else if (vocab.kind == Json::Array) {  // Unigram: [["piece", score], ...], id = index
    const auto& entries = vocab.arr;
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& e = entries[i].as_array(mwhat + ".vocab[" + std::to_string(i) + "]");
      if (e.empty()) throw Error(mwhat + ".vocab[" + std::to_string(i) + "] is empty");
      const std::string& piece = e[0].as_string(mwhat + ".vocab[" + std::to_string(i) + "][0]");
      set(int64_t(i), piece, mwhat + ".vocab");
      model_ids.emplace(piece, int64_t(i));
    }
  } else {
    throw Error(mwhat + ".vocab must be an object or an array");
  }
  const Json* normalizer = root.find("normalizer");
  if (const Json* added = root.find("added_tokens")) {
    const auto& list = added->as_array(what + ": added_tokens");
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string awhat = what + ": added_tokens[" + std::to_string(i) + "]";
      const Json& a = list[i];
      const std::string& content = string_field(a, "content", awhat);
      int64_t id = a.at("id", awhat).as_int(awhat + ".id");
      std::string shown = content;  // what decode feeds the decoder for this id
      const Json* normalized = a.find("normalized");
      if (normalized && normalized->kind == Json::Bool && normalized->b && normalizer)
        normalize_added(*normalizer, shown, awhat);
      set(id, shown, awhat);
      const Json* special = a.find("special");
      if (special && special->kind == Json::Bool && special->b) t.special_.insert(content);
      t.ids_[content] = id;
    }
  }
  for (const auto& kv : model_ids) t.ids_.emplace(kv.first, kv.second);  // added tokens win
  if (const Json* d = root.find("decoder"); d && d->kind != Json::Null) {
    t.has_decoder_ = true;
    t.add_decoder(*d, what + ": decoder");
  }
  t.setup_encoding(root, model_ids, what);
  t.byte_fallback_.assign(t.tokens_.size(), false);
  if (t.uses_byte_fallback_) {
    uint8_t v;
    for (const auto& kv : model_ids)
      if (byte_token_value(kv.first, &v)) t.byte_fallback_[size_t(kv.second)] = true;
  }
  return t;
}

void Tokenizer::add_decoder(const Json& d, const std::string& what) {
  const std::string& type = string_field(d, "type", what);
  Step s{};
  if (type == "Sequence") {
    const auto& list = d.at("decoders", what).as_array(what + ".decoders");
    for (size_t i = 0; i < list.size(); ++i) add_decoder(list[i], what + ".decoders[" + std::to_string(i) + "]");
    return;
  } else if (type == "ByteLevel") {
    s.kind = Step::ByteLevel;
  } else if (type == "Metaspace") {
    s.kind = Step::Metaspace;
    s.a = string_field(d, "replacement", what);
    std::string scheme = "always";
    if (const Json* p = d.find("prepend_scheme")) scheme = p->as_string(what + ".prepend_scheme");
    else if (const Json* p = d.find("add_prefix_space"); p && p->kind == Json::Bool && !p->b) scheme = "never";
    s.flag = scheme != "never";
  } else if (type == "Replace") {
    s.kind = Step::Replace;
    s.a = replace_pattern(d, what);
    s.b = string_field(d, "content", what);
  } else if (type == "ByteFallback") {
    s.kind = Step::ByteFallback;
    uses_byte_fallback_ = true;
  } else if (type == "Fuse") {
    s.kind = Step::Fuse;
  } else if (type == "Strip") {
    s.kind = Step::Strip;
    s.a = string_field(d, "content", what);
    if (code_points(s.a).size() != 1) throw Error(what + ".content must be one character");
    s.start = d.at("start", what).as_int(what + ".start");
    s.stop = d.at("stop", what).as_int(what + ".stop");
  } else if (type == "WordPiece") {
    s.kind = Step::WordPiece;
    s.a = "##";
    if (const Json* p = d.find("prefix")) s.a = p->as_string(what + ".prefix");
    s.flag = true;
    if (const Json* c = d.find("cleanup"); c && c->kind == Json::Bool) s.flag = c->b;
  } else if (type == "BPEDecoder") {
    s.kind = Step::BPEDecoder;
    s.a = "</w>";
    if (const Json* p = d.find("suffix")) s.a = p->as_string(what + ".suffix");
  } else {
    throw Error(what + ": the " + type + " decoder is not supported");
  }
  steps_.push_back(s);
}

// ------------------------------------------------------------------- decoding

const std::string* Tokenizer::token(int64_t id) const {
  if (id < 0 || id >= vocab_size() || !has_[size_t(id)]) return nullptr;
  return &tokens_[size_t(id)];
}

int64_t Tokenizer::token_to_id(const std::string& tok) const {
  auto it = ids_.find(tok);
  return it == ids_.end() ? -1 : it->second;
}

bool Tokenizer::is_special(int64_t id) const {
  const std::string* t = token(id);
  return t && special_.count(*t);
}

bool Tokenizer::is_byte_fallback(int64_t id) const {
  return id >= 0 && id < vocab_size() && byte_fallback_[size_t(id)];
}

// Each step is the decode_chain of the tokenizers decoder of the same name.
std::vector<std::string> Tokenizer::run_decoders(std::vector<std::string> tokens) const {
  const ByteAlphabet& alphabet = byte_alphabet();
  for (const Step& s : steps_) {
    switch (s.kind) {
      case Step::ByteLevel: {
        // every token's characters back to bytes (a token with a character outside the
        // alphabet, e.g. an added token, as its own UTF-8), then one lossy UTF-8 string
        std::string bytes;
        for (const std::string& t : tokens) {
          std::string mapped;
          bool ok = true;
          for (uint32_t cp : code_points(t)) {
            auto it = alphabet.cp_to_byte.find(cp);
            if (it == alphabet.cp_to_byte.end()) { ok = false; break; }
            mapped.push_back(char(it->second));
          }
          bytes += ok ? mapped : t;
        }
        tokens.assign(1, utf8_lossy(bytes));
        break;
      }
      case Step::Metaspace: {
        // the first token loses every replacement character, the others get spaces
        for (size_t i = 0; i < tokens.size(); ++i) {
          if (i == 0 && s.flag) replace_all(tokens[i], s.a, "");
          else replace_all(tokens[i], s.a, " ");
        }
        break;
      }
      case Step::Replace:
        for (std::string& t : tokens) replace_all(t, s.a, s.b);
        break;
      case Step::ByteFallback: {
        // a run of <0xNN> tokens is its bytes when they are valid UTF-8, else one U+FFFD a byte
        std::vector<std::string> out;
        std::string run;
        size_t run_len = 0;
        auto end_run = [&]() {
          if (!run_len) return;
          if (valid_utf8(run)) out.push_back(run);
          else for (size_t k = 0; k < run_len; ++k) out.push_back(kReplacement);
          run.clear();
          run_len = 0;
        };
        for (std::string& t : tokens) {
          uint8_t v;
          if (byte_token_value(t, &v)) {
            run.push_back(char(v));
            ++run_len;
          } else {
            end_run();
            out.push_back(std::move(t));
          }
        }
        end_run();
        tokens.swap(out);
        break;
      }
      case Step::Fuse: {
        std::string all;
        for (const std::string& t : tokens) all += t;
        tokens.assign(1, all);
        break;
      }
      case Step::Strip: {
        const uint32_t c = code_points(s.a)[0];
        for (std::string& t : tokens) {
          std::vector<uint32_t> cps = code_points(t);
          size_t begin = 0, end = cps.size();
          for (int64_t k = 0; k < s.start && begin < cps.size() && cps[begin] == c; ++k) ++begin;
          for (int64_t k = 0; k < s.stop && end > begin && cps[end - 1] == c; ++k) --end;
          t = from_code_points(cps, begin, end);
        }
        break;
      }
      case Step::WordPiece:
        for (size_t i = 0; i < tokens.size(); ++i) {
          std::string& t = tokens[i];
          if (i != 0) {
            if (t.compare(0, s.a.size(), s.a) == 0) t.erase(0, s.a.size());
            else t = " " + t;
          }
          if (s.flag) for (auto& r : kCleanup) replace_all(t, r[0], r[1]);
        }
        break;
      case Step::BPEDecoder:
        for (size_t i = 0; i < tokens.size(); ++i) replace_all(tokens[i], s.a, i + 1 == tokens.size() ? "" : " ");
        break;
    }
  }
  return tokens;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int64_t id : ids) {
    if (id < 0 || id >= vocab_size())
      throw Error("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                  std::to_string(vocab_size()) + ")");
    const std::string* t = token(id);
    if (!t || (skip_special && special_.count(*t))) continue;  // tokenizers skips both
    tokens.push_back(*t);
  }
  std::string out;
  if (!has_decoder_) {  // no decoder: the tokens joined with spaces
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  for (const std::string& t : run_decoders(std::move(tokens))) out += t;
  return out;
}

// ------------------------------------------------------------------ streaming

namespace {
bool ends_with_replacement(const std::string& s) {
  return s.size() >= 3 && s.compare(s.size() - 3, 3, kReplacement) == 0;
}
std::vector<int64_t> slice(const std::vector<int64_t>& v, size_t begin, size_t end) {
  return std::vector<int64_t>(v.begin() + long(begin), v.begin() + long(end));
}
}  // namespace

std::string StreamDecoder::emit(const std::string& chunk) {
  prefix_ = read_;
  read_ = ids_.size();
  prefix_text_ = tok_.decode(slice(ids_, prefix_, read_));
  text_ += chunk;
  return chunk;
}

std::string StreamDecoder::put(int64_t id) {
  if (id < 0 || id >= tok_.vocab_size())
    throw Error("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                std::to_string(tok_.vocab_size()) + ")");
  if (skip_ && tok_.is_special(id)) return "";  // decode(skip) drops it before the decoders
  ids_.push_back(id);
  if (tok_.is_byte_fallback(id)) return "";  // the byte run may go on
  std::string window = tok_.decode(slice(ids_, prefix_, ids_.size()));
  if (window.size() <= prefix_text_.size() || ends_with_replacement(window)) return "";
  if (window.compare(0, prefix_text_.size(), prefix_text_) == 0) return emit(window.substr(prefix_text_.size()));
  // a decoder whose output depends on more context: take the whole sequence
  std::string all = tok_.decode(ids_);
  return emit(all.size() > text_.size() ? all.substr(text_.size()) : std::string());
}

std::string StreamDecoder::flush() {
  if (read_ == ids_.size()) return "";
  std::string all = tok_.decode(ids_);
  return emit(all.size() > text_.size() ? all.substr(text_.size()) : std::string());
}



// ------------------------------------------------------------------- encoding

namespace {

struct Range {
  uint32_t lo, hi;
};

// General categories L* and N* (Unicode 14.0, generated from Python's unicodedata: a
// code point starts a range where the category test turns true and ends where it turns
// false). tokenizers' regex engine may know a newer Unicode: characters assigned since
// 14.0 can split differently.
const Range kLetters[] = {
    {0x41, 0x5A}, {0x61, 0x7A}, {0xAA, 0xAA}, {0xB5, 0xB5}, {0xBA, 0xBA}, {0xC0, 0xD6}, {0xD8, 0xF6}, {0xF8, 0x2C1},
    {0x2C6, 0x2D1}, {0x2E0, 0x2E4}, {0x2EC, 0x2EC}, {0x2EE, 0x2EE}, {0x370, 0x374}, {0x376, 0x377}, {0x37A, 0x37D},
    {0x37F, 0x37F}, {0x386, 0x386}, {0x388, 0x38A}, {0x38C, 0x38C}, {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481},
    {0x48A, 0x52F}, {0x531, 0x556}, {0x559, 0x559}, {0x560, 0x588}, {0x5D0, 0x5EA}, {0x5EF, 0x5F2}, {0x620, 0x64A},
    {0x66E, 0x66F}, {0x671, 0x6D3}, {0x6D5, 0x6D5}, {0x6E5, 0x6E6}, {0x6EE, 0x6EF}, {0x6FA, 0x6FC}, {0x6FF, 0x6FF},
    {0x710, 0x710}, {0x712, 0x72F}, {0x74D, 0x7A5}, {0x7B1, 0x7B1}, {0x7CA, 0x7EA}, {0x7F4, 0x7F5}, {0x7FA, 0x7FA},
    {0x800, 0x815}, {0x81A, 0x81A}, {0x824, 0x824}, {0x828, 0x828}, {0x840, 0x858}, {0x860, 0x86A}, {0x870, 0x887},
    {0x889, 0x88E}, {0x8A0, 0x8C9}, {0x904, 0x939}, {0x93D, 0x93D}, {0x950, 0x950}, {0x958, 0x961}, {0x971, 0x980},
    {0x985, 0x98C}, {0x98F, 0x990}, {0x993, 0x9A8}, {0x9AA, 0x9B0}, {0x9B2, 0x9B2}, {0x9B6, 0x9B9}, {0x9BD, 0x9BD},
    {0x9CE, 0x9CE}, {0x9DC, 0x9DD}, {0x9DF, 0x9E1}, {0x9F0, 0x9F1}, {0x9FC, 0x9FC}, {0xA05, 0xA0A}, {0xA0F, 0xA10},
    {0xA13, 0xA28}, {0xA2A, 0xA30}, {0xA32, 0xA33}, {0xA35, 0xA36}, {0xA38, 0xA39}, {0xA59, 0xA5C}, {0xA5E, 0xA5E},
    {0xA72, 0xA74}, {0xA85, 0xA8D}, {0xA8F, 0xA91}, {0xA93, 0xAA8}, {0xAAA, 0xAB0}, {0xAB2, 0xAB3}, {0xAB5, 0xAB9},
    {0xABD, 0xABD}, {0xAD0, 0xAD0}, {0xAE0, 0xAE1}, {0xAF9, 0xAF9}, {0xB05, 0xB0C}, {0xB0F, 0xB10}, {0xB13, 0xB28},
    {0xB2A, 0xB30}, {0xB32, 0xB33}, {0xB35, 0xB39}, {0xB3D, 0xB3D}, {0xB5C, 0xB5D}, {0xB5F, 0xB61}, {0xB71, 0xB71},
    {0xB83, 0xB83}, {0xB85, 0xB8A}, {0xB8E, 0xB90}, {0xB92, 0xB95}, {0xB99, 0xB9A}, {0xB9C, 0xB9C}, {0xB9E, 0xB9F},
    {0xBA3, 0xBA4}, {0xBA8, 0xBAA}, {0xBAE, 0xBB9}, {0xBD0, 0xBD0}, {0xC05, 0xC0C}, {0xC0E, 0xC10}, {0xC12, 0xC28},
    {0xC2A, 0xC39}, {0xC3D, 0xC3D}, {0xC58, 0xC5A}, {0xC5D, 0xC5D}, {0xC60, 0xC61}, {0xC80, 0xC80}, {0xC85, 0xC8C},
    {0xC8E, 0xC90}, {0xC92, 0xCA8}, {0xCAA, 0xCB3}, {0xCB5, 0xCB9}, {0xCBD, 0xCBD}, {0xCDD, 0xCDE}, {0xCE0, 0xCE1},
    {0xCF1, 0xCF2}, {0xD04, 0xD0C}, {0xD0E, 0xD10}, {0xD12, 0xD3A}, {0xD3D, 0xD3D}, {0xD4E, 0xD4E}, {0xD54, 0xD56},
    {0xD5F, 0xD61}, {0xD7A, 0xD7F}, {0xD85, 0xD96}, {0xD9A, 0xDB1}, {0xDB3, 0xDBB}, {0xDBD, 0xDBD}, {0xDC0, 0xDC6},
    {0xE01, 0xE30}, {0xE32, 0xE33}, {0xE40, 0xE46}, {0xE81, 0xE82}, {0xE84, 0xE84}, {0xE86, 0xE8A}, {0xE8C, 0xEA3},
    {0xEA5, 0xEA5}, {0xEA7, 0xEB0}, {0xEB2, 0xEB3}, {0xEBD, 0xEBD}, {0xEC0, 0xEC4}, {0xEC6, 0xEC6}, {0xEDC, 0xEDF},
    {0xF00, 0xF00}, {0xF40, 0xF47}, {0xF49, 0xF6C}, {0xF88, 0xF8C}, {0x1000, 0x102A}, {0x103F, 0x103F},
    {0x1050, 0x1055}, {0x105A, 0x105D}, {0x1061, 0x1061}, {0x1065, 0x1066}, {0x106E, 0x1070}, {0x1075, 0x1081},
    {0x108E, 0x108E}, {0x10A0, 0x10C5}, {0x10C7, 0x10C7}, {0x10CD, 0x10CD}, {0x10D0, 0x10FA}, {0x10FC, 0x1248},
    {0x124A, 0x124D}, {0x1250, 0x1256}, {0x1258, 0x1258}, {0x125A, 0x125D}, {0x1260, 0x1288}, {0x128A, 0x128D},
    {0x1290, 0x12B0}, {0x12B2, 0x12B5}, {0x12B8, 0x12BE}, {0x12C0, 0x12C0}, {0x12C2, 0x12C5}, {0x12C8, 0x12D6},
    {0x12D8, 0x1310}, {0x1312, 0x1315}, {0x1318, 0x135A}, {0x1380, 0x138F}, {0x13A0, 0x13F5}, {0x13F8, 0x13FD},
    {0x1401, 0x166C}, {0x166F, 0x167F}, {0x1681, 0x169A}, {0x16A0, 0x16EA}, {0x16F1, 0x16F8}, {0x1700, 0x1711},
    {0x171F, 0x1731}, {0x1740, 0x1751}, {0x1760, 0x176C}, {0x176E, 0x1770}, {0x1780, 0x17B3}, {0x17D7, 0x17D7},
    {0x17DC, 0x17DC}, {0x1820, 0x1878}, {0x1880, 0x1884}, {0x1887, 0x18A8}, {0x18AA, 0x18AA}, {0x18B0, 0x18F5},
    {0x1900, 0x191E}, {0x1950, 0x196D}, {0x1970, 0x1974}, {0x1980, 0x19AB}, {0x19B0, 0x19C9}, {0x1A00, 0x1A16},
    {0x1A20, 0x1A54}, {0x1AA7, 0x1AA7}, {0x1B05, 0x1B33}, {0x1B45, 0x1B4C}, {0x1B83, 0x1BA0}, {0x1BAE, 0x1BAF},
    {0x1BBA, 0x1BE5}, {0x1C00, 0x1C23}, {0x1C4D, 0x1C4F}, {0x1C5A, 0x1C7D}, {0x1C80, 0x1C88}, {0x1C90, 0x1CBA},
    {0x1CBD, 0x1CBF}, {0x1CE9, 0x1CEC}, {0x1CEE, 0x1CF3}, {0x1CF5, 0x1CF6}, {0x1CFA, 0x1CFA}, {0x1D00, 0x1DBF},
    {0x1E00, 0x1F15}, {0x1F18, 0x1F1D}, {0x1F20, 0x1F45}, {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59},
    {0x1F5B, 0x1F5B}, {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE},
    {0x1FC2, 0x1FC4}, {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC}, {0x1FF2, 0x1FF4},
    {0x1FF6, 0x1FFC}, {0x2071, 0x2071}, {0x207F, 0x207F}, {0x2090, 0x209C}, {0x2102, 0x2102}, {0x2107, 0x2107},
    {0x210A, 0x2113}, {0x2115, 0x2115}, {0x2119, 0x211D}, {0x2124, 0x2124}, {0x2126, 0x2126}, {0x2128, 0x2128},
    {0x212A, 0x212D}, {0x212F, 0x2139}, {0x213C, 0x213F}, {0x2145, 0x2149}, {0x214E, 0x214E}, {0x2183, 0x2184},
    {0x2C00, 0x2CE4}, {0x2CEB, 0x2CEE}, {0x2CF2, 0x2CF3}, {0x2D00, 0x2D25}, {0x2D27, 0x2D27}, {0x2D2D, 0x2D2D},
    {0x2D30, 0x2D67}, {0x2D6F, 0x2D6F}, {0x2D80, 0x2D96}, {0x2DA0, 0x2DA6}, {0x2DA8, 0x2DAE}, {0x2DB0, 0x2DB6},
    {0x2DB8, 0x2DBE}, {0x2DC0, 0x2DC6}, {0x2DC8, 0x2DCE}, {0x2DD0, 0x2DD6}, {0x2DD8, 0x2DDE}, {0x2E2F, 0x2E2F},
    {0x3005, 0x3006}, {0x3031, 0x3035}, {0x303B, 0x303C}, {0x3041, 0x3096}, {0x309D, 0x309F}, {0x30A1, 0x30FA},
    {0x30FC, 0x30FF}, {0x3105, 0x312F}, {0x3131, 0x318E}, {0x31A0, 0x31BF}, {0x31F0, 0x31FF}, {0x3400, 0x4DBF},
    {0x4E00, 0xA48C}, {0xA4D0, 0xA4FD}, {0xA500, 0xA60C}, {0xA610, 0xA61F}, {0xA62A, 0xA62B}, {0xA640, 0xA66E},
    {0xA67F, 0xA69D}, {0xA6A0, 0xA6E5}, {0xA717, 0xA71F}, {0xA722, 0xA788}, {0xA78B, 0xA7CA}, {0xA7D0, 0xA7D1},
    {0xA7D3, 0xA7D3}, {0xA7D5, 0xA7D9}, {0xA7F2, 0xA801}, {0xA803, 0xA805}, {0xA807, 0xA80A}, {0xA80C, 0xA822},
    {0xA840, 0xA873}, {0xA882, 0xA8B3}, {0xA8F2, 0xA8F7}, {0xA8FB, 0xA8FB}, {0xA8FD, 0xA8FE}, {0xA90A, 0xA925},
    {0xA930, 0xA946}, {0xA960, 0xA97C}, {0xA984, 0xA9B2}, {0xA9CF, 0xA9CF}, {0xA9E0, 0xA9E4}, {0xA9E6, 0xA9EF},
    {0xA9FA, 0xA9FE}, {0xAA00, 0xAA28}, {0xAA40, 0xAA42}, {0xAA44, 0xAA4B}, {0xAA60, 0xAA76}, {0xAA7A, 0xAA7A},
    {0xAA7E, 0xAAAF}, {0xAAB1, 0xAAB1}, {0xAAB5, 0xAAB6}, {0xAAB9, 0xAABD}, {0xAAC0, 0xAAC0}, {0xAAC2, 0xAAC2},
    {0xAADB, 0xAADD}, {0xAAE0, 0xAAEA}, {0xAAF2, 0xAAF4}, {0xAB01, 0xAB06}, {0xAB09, 0xAB0E}, {0xAB11, 0xAB16},
    {0xAB20, 0xAB26}, {0xAB28, 0xAB2E}, {0xAB30, 0xAB5A}, {0xAB5C, 0xAB69}, {0xAB70, 0xABE2}, {0xAC00, 0xD7A3},
    {0xD7B0, 0xD7C6}, {0xD7CB, 0xD7FB}, {0xF900, 0xFA6D}, {0xFA70, 0xFAD9}, {0xFB00, 0xFB06}, {0xFB13, 0xFB17},
    {0xFB1D, 0xFB1D}, {0xFB1F, 0xFB28}, {0xFB2A, 0xFB36}, {0xFB38, 0xFB3C}, {0xFB3E, 0xFB3E}, {0xFB40, 0xFB41},
    {0xFB43, 0xFB44}, {0xFB46, 0xFBB1}, {0xFBD3, 0xFD3D}, {0xFD50, 0xFD8F}, {0xFD92, 0xFDC7}, {0xFDF0, 0xFDFB},
    {0xFE70, 0xFE74}, {0xFE76, 0xFEFC}, {0xFF21, 0xFF3A}, {0xFF41, 0xFF5A}, {0xFF66, 0xFFBE}, {0xFFC2, 0xFFC7},
    {0xFFCA, 0xFFCF}, {0xFFD2, 0xFFD7}, {0xFFDA, 0xFFDC}, {0x10000, 0x1000B}, {0x1000D, 0x10026}, {0x10028, 0x1003A},
    {0x1003C, 0x1003D}, {0x1003F, 0x1004D}, {0x10050, 0x1005D}, {0x10080, 0x100FA}, {0x10280, 0x1029C},
    {0x102A0, 0x102D0}, {0x10300, 0x1031F}, {0x1032D, 0x10340}, {0x10342, 0x10349}, {0x10350, 0x10375},
    {0x10380, 0x1039D}, {0x103A0, 0x103C3}, {0x103C8, 0x103CF}, {0x10400, 0x1049D}, {0x104B0, 0x104D3},
    {0x104D8, 0x104FB}, {0x10500, 0x10527}, {0x10530, 0x10563}, {0x10570, 0x1057A}, {0x1057C, 0x1058A},
    {0x1058C, 0x10592}, {0x10594, 0x10595}, {0x10597, 0x105A1}, {0x105A3, 0x105B1}, {0x105B3, 0x105B9},
    {0x105BB, 0x105BC}, {0x10600, 0x10736}, {0x10740, 0x10755}, {0x10760, 0x10767}, {0x10780, 0x10785},
    {0x10787, 0x107B0}, {0x107B2, 0x107BA}, {0x10800, 0x10805}, {0x10808, 0x10808}, {0x1080A, 0x10835},
    {0x10837, 0x10838}, {0x1083C, 0x1083C}, {0x1083F, 0x10855}, {0x10860, 0x10876}, {0x10880, 0x1089E},
    {0x108E0, 0x108F2}, {0x108F4, 0x108F5}, {0x10900, 0x10915}, {0x10920, 0x10939}, {0x10980, 0x109B7},
    {0x109BE, 0x109BF}, {0x10A00, 0x10A00}, {0x10A10, 0x10A13}, {0x10A15, 0x10A17}, {0x10A19, 0x10A35},
    {0x10A60, 0x10A7C}, {0x10A80, 0x10A9C}, {0x10AC0, 0x10AC7}, {0x10AC9, 0x10AE4}, {0x10B00, 0x10B35},
    {0x10B40, 0x10B55}, {0x10B60, 0x10B72}, {0x10B80, 0x10B91}, {0x10C00, 0x10C48}, {0x10C80, 0x10CB2},
    {0x10CC0, 0x10CF2}, {0x10D00, 0x10D23}, {0x10E80, 0x10EA9}, {0x10EB0, 0x10EB1}, {0x10F00, 0x10F1C},
    {0x10F27, 0x10F27}, {0x10F30, 0x10F45}, {0x10F70, 0x10F81}, {0x10FB0, 0x10FC4}, {0x10FE0, 0x10FF6},
    {0x11003, 0x11037}, {0x11071, 0x11072}, {0x11075, 0x11075}, {0x11083, 0x110AF}, {0x110D0, 0x110E8},
    {0x11103, 0x11126}, {0x11144, 0x11144}, {0x11147, 0x11147}, {0x11150, 0x11172}, {0x11176, 0x11176},
    {0x11183, 0x111B2}, {0x111C1, 0x111C4}, {0x111DA, 0x111DA}, {0x111DC, 0x111DC}, {0x11200, 0x11211},
    {0x11213, 0x1122B}, {0x11280, 0x11286}, {0x11288, 0x11288}, {0x1128A, 0x1128D}, {0x1128F, 0x1129D},
    {0x1129F, 0x112A8}, {0x112B0, 0x112DE}, {0x11305, 0x1130C}, {0x1130F, 0x11310}, {0x11313, 0x11328},
    {0x1132A, 0x11330}, {0x11332, 0x11333}, {0x11335, 0x11339}, {0x1133D, 0x1133D}, {0x11350, 0x11350},
    {0x1135D, 0x11361}, {0x11400, 0x11434}, {0x11447, 0x1144A}, {0x1145F, 0x11461}, {0x11480, 0x114AF},
    {0x114C4, 0x114C5}, {0x114C7, 0x114C7}, {0x11580, 0x115AE}, {0x115D8, 0x115DB}, {0x11600, 0x1162F},
    {0x11644, 0x11644}, {0x11680, 0x116AA}, {0x116B8, 0x116B8}, {0x11700, 0x1171A}, {0x11740, 0x11746},
    {0x11800, 0x1182B}, {0x118A0, 0x118DF}, {0x118FF, 0x11906}, {0x11909, 0x11909}, {0x1190C, 0x11913},
    {0x11915, 0x11916}, {0x11918, 0x1192F}, {0x1193F, 0x1193F}, {0x11941, 0x11941}, {0x119A0, 0x119A7},
    {0x119AA, 0x119D0}, {0x119E1, 0x119E1}, {0x119E3, 0x119E3}, {0x11A00, 0x11A00}, {0x11A0B, 0x11A32},
    {0x11A3A, 0x11A3A}, {0x11A50, 0x11A50}, {0x11A5C, 0x11A89}, {0x11A9D, 0x11A9D}, {0x11AB0, 0x11AF8},
    {0x11C00, 0x11C08}, {0x11C0A, 0x11C2E}, {0x11C40, 0x11C40}, {0x11C72, 0x11C8F}, {0x11D00, 0x11D06},
    {0x11D08, 0x11D09}, {0x11D0B, 0x11D30}, {0x11D46, 0x11D46}, {0x11D60, 0x11D65}, {0x11D67, 0x11D68},
    {0x11D6A, 0x11D89}, {0x11D98, 0x11D98}, {0x11EE0, 0x11EF2}, {0x11FB0, 0x11FB0}, {0x12000, 0x12399},
    {0x12480, 0x12543}, {0x12F90, 0x12FF0}, {0x13000, 0x1342E}, {0x14400, 0x14646}, {0x16800, 0x16A38},
    {0x16A40, 0x16A5E}, {0x16A70, 0x16ABE}, {0x16AD0, 0x16AED}, {0x16B00, 0x16B2F}, {0x16B40, 0x16B43},
    {0x16B63, 0x16B77}, {0x16B7D, 0x16B8F}, {0x16E40, 0x16E7F}, {0x16F00, 0x16F4A}, {0x16F50, 0x16F50},
    {0x16F93, 0x16F9F}, {0x16FE0, 0x16FE1}, {0x16FE3, 0x16FE3}, {0x17000, 0x187F7}, {0x18800, 0x18CD5},
    {0x18D00, 0x18D08}, {0x1AFF0, 0x1AFF3}, {0x1AFF5, 0x1AFFB}, {0x1AFFD, 0x1AFFE}, {0x1B000, 0x1B122},
    {0x1B150, 0x1B152}, {0x1B164, 0x1B167}, {0x1B170, 0x1B2FB}, {0x1BC00, 0x1BC6A}, {0x1BC70, 0x1BC7C},
    {0x1BC80, 0x1BC88}, {0x1BC90, 0x1BC99}, {0x1D400, 0x1D454}, {0x1D456, 0x1D49C}, {0x1D49E, 0x1D49F},
    {0x1D4A2, 0x1D4A2}, {0x1D4A5, 0x1D4A6}, {0x1D4A9, 0x1D4AC}, {0x1D4AE, 0x1D4B9}, {0x1D4BB, 0x1D4BB},
    {0x1D4BD, 0x1D4C3}, {0x1D4C5, 0x1D505}, {0x1D507, 0x1D50A}, {0x1D50D, 0x1D514}, {0x1D516, 0x1D51C},
    {0x1D51E, 0x1D539}, {0x1D53B, 0x1D53E}, {0x1D540, 0x1D544}, {0x1D546, 0x1D546}, {0x1D54A, 0x1D550},
    {0x1D552, 0x1D6A5}, {0x1D6A8, 0x1D6C0}, {0x1D6C2, 0x1D6DA}, {0x1D6DC, 0x1D6FA}, {0x1D6FC, 0x1D714},
    {0x1D716, 0x1D734}, {0x1D736, 0x1D74E}, {0x1D750, 0x1D76E}, {0x1D770, 0x1D788}, {0x1D78A, 0x1D7A8},
    {0x1D7AA, 0x1D7C2}, {0x1D7C4, 0x1D7CB}, {0x1DF00, 0x1DF1E}, {0x1E100, 0x1E12C}, {0x1E137, 0x1E13D},
    {0x1E14E, 0x1E14E}, {0x1E290, 0x1E2AD}, {0x1E2C0, 0x1E2EB}, {0x1E7E0, 0x1E7E6}, {0x1E7E8, 0x1E7EB},
    {0x1E7ED, 0x1E7EE}, {0x1E7F0, 0x1E7FE}, {0x1E800, 0x1E8C4}, {0x1E900, 0x1E943}, {0x1E94B, 0x1E94B},
    {0x1EE00, 0x1EE03}, {0x1EE05, 0x1EE1F}, {0x1EE21, 0x1EE22}, {0x1EE24, 0x1EE24}, {0x1EE27, 0x1EE27},
    {0x1EE29, 0x1EE32}, {0x1EE34, 0x1EE37}, {0x1EE39, 0x1EE39}, {0x1EE3B, 0x1EE3B}, {0x1EE42, 0x1EE42},
    {0x1EE47, 0x1EE47}, {0x1EE49, 0x1EE49}, {0x1EE4B, 0x1EE4B}, {0x1EE4D, 0x1EE4F}, {0x1EE51, 0x1EE52},
    {0x1EE54, 0x1EE54}, {0x1EE57, 0x1EE57}, {0x1EE59, 0x1EE59}, {0x1EE5B, 0x1EE5B}, {0x1EE5D, 0x1EE5D},
    {0x1EE5F, 0x1EE5F}, {0x1EE61, 0x1EE62}, {0x1EE64, 0x1EE64}, {0x1EE67, 0x1EE6A}, {0x1EE6C, 0x1EE72},
    {0x1EE74, 0x1EE77}, {0x1EE79, 0x1EE7C}, {0x1EE7E, 0x1EE7E}, {0x1EE80, 0x1EE89}, {0x1EE8B, 0x1EE9B},
    {0x1EEA1, 0x1EEA3}, {0x1EEA5, 0x1EEA9}, {0x1EEAB, 0x1EEBB}, {0x20000, 0x2A6DF}, {0x2A700, 0x2B738},
    {0x2B740, 0x2B81D}, {0x2B820, 0x2CEA1}, {0x2CEB0, 0x2EBE0}, {0x2F800, 0x2FA1D}, {0x30000, 0x3134A},
};
const Range kNumbers[] = {
    {0x30, 0x39}, {0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}, {0x660, 0x669}, {0x6F0, 0x6F9}, {0x7C0, 0x7C9},
    {0x966, 0x96F}, {0x9E6, 0x9EF}, {0x9F4, 0x9F9}, {0xA66, 0xA6F}, {0xAE6, 0xAEF}, {0xB66, 0xB6F}, {0xB72, 0xB77},
    {0xBE6, 0xBF2}, {0xC66, 0xC6F}, {0xC78, 0xC7E}, {0xCE6, 0xCEF}, {0xD58, 0xD5E}, {0xD66, 0xD78}, {0xDE6, 0xDEF},
    {0xE50, 0xE59}, {0xED0, 0xED9}, {0xF20, 0xF33}, {0x1040, 0x1049}, {0x1090, 0x1099}, {0x1369, 0x137C},
    {0x16EE, 0x16F0}, {0x17E0, 0x17E9}, {0x17F0, 0x17F9}, {0x1810, 0x1819}, {0x1946, 0x194F}, {0x19D0, 0x19DA},
    {0x1A80, 0x1A89}, {0x1A90, 0x1A99}, {0x1B50, 0x1B59}, {0x1BB0, 0x1BB9}, {0x1C40, 0x1C49}, {0x1C50, 0x1C59},
    {0x2070, 0x2070}, {0x2074, 0x2079}, {0x2080, 0x2089}, {0x2150, 0x2182}, {0x2185, 0x2189}, {0x2460, 0x249B},
    {0x24EA, 0x24FF}, {0x2776, 0x2793}, {0x2CFD, 0x2CFD}, {0x3007, 0x3007}, {0x3021, 0x3029}, {0x3038, 0x303A},
    {0x3192, 0x3195}, {0x3220, 0x3229}, {0x3248, 0x324F}, {0x3251, 0x325F}, {0x3280, 0x3289}, {0x32B1, 0x32BF},
    {0xA620, 0xA629}, {0xA6E6, 0xA6EF}, {0xA830, 0xA835}, {0xA8D0, 0xA8D9}, {0xA900, 0xA909}, {0xA9D0, 0xA9D9},
    {0xA9F0, 0xA9F9}, {0xAA50, 0xAA59}, {0xABF0, 0xABF9}, {0xFF10, 0xFF19}, {0x10107, 0x10133}, {0x10140, 0x10178},
    {0x1018A, 0x1018B}, {0x102E1, 0x102FB}, {0x10320, 0x10323}, {0x10341, 0x10341}, {0x1034A, 0x1034A},
    {0x103D1, 0x103D5}, {0x104A0, 0x104A9}, {0x10858, 0x1085F}, {0x10879, 0x1087F}, {0x108A7, 0x108AF},
    {0x108FB, 0x108FF}, {0x10916, 0x1091B}, {0x109BC, 0x109BD}, {0x109C0, 0x109CF}, {0x109D2, 0x109FF},
    {0x10A40, 0x10A48}, {0x10A7D, 0x10A7E}, {0x10A9D, 0x10A9F}, {0x10AEB, 0x10AEF}, {0x10B58, 0x10B5F},
    {0x10B78, 0x10B7F}, {0x10BA9, 0x10BAF}, {0x10CFA, 0x10CFF}, {0x10D30, 0x10D39}, {0x10E60, 0x10E7E},
    {0x10F1D, 0x10F26}, {0x10F51, 0x10F54}, {0x10FC5, 0x10FCB}, {0x11052, 0x1106F}, {0x110F0, 0x110F9},
    {0x11136, 0x1113F}, {0x111D0, 0x111D9}, {0x111E1, 0x111F4}, {0x112F0, 0x112F9}, {0x11450, 0x11459},
    {0x114D0, 0x114D9}, {0x11650, 0x11659}, {0x116C0, 0x116C9}, {0x11730, 0x1173B}, {0x118E0, 0x118F2},
    {0x11950, 0x11959}, {0x11C50, 0x11C6C}, {0x11D50, 0x11D59}, {0x11DA0, 0x11DA9}, {0x11FC0, 0x11FD4},
    {0x12400, 0x1246E}, {0x16A60, 0x16A69}, {0x16AC0, 0x16AC9}, {0x16B50, 0x16B59}, {0x16B5B, 0x16B61},
    {0x16E80, 0x16E96}, {0x1D2E0, 0x1D2F3}, {0x1D360, 0x1D378}, {0x1D7CE, 0x1D7FF}, {0x1E140, 0x1E149},
    {0x1E2F0, 0x1E2F9}, {0x1E8C7, 0x1E8CF}, {0x1E950, 0x1E959}, {0x1EC71, 0x1ECAB}, {0x1ECAD, 0x1ECAF},
    {0x1ECB1, 0x1ECB4}, {0x1ED01, 0x1ED2D}, {0x1ED2F, 0x1ED3D}, {0x1F100, 0x1F10C}, {0x1FBF0, 0x1FBF9},
};

bool in_ranges(const Range* r, size_t n, uint32_t cp) {
  size_t lo = 0, hi = n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (cp < r[mid].lo) hi = mid;
    else if (cp > r[mid].hi) lo = mid + 1;
    else return true;
  }
  return false;
}

bool is_letter(uint32_t cp) { return in_ranges(kLetters, sizeof(kLetters) / sizeof(Range), cp); }
bool is_number(uint32_t cp) { return in_ranges(kNumbers, sizeof(kNumbers) / sizeof(Range), cp); }

// \s of the regex and Rust's char::is_whitespace: the White_Space property
bool is_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F ||
         cp == 0x3000;
}

// Splits `s` as tokenizers' ByteLevel regex does (every character is in some match):
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
std::vector<std::string> gpt2_split(const std::string& s) {
  std::vector<uint32_t> cp = code_points(s);
  std::vector<std::string> out;
  const size_t n = cp.size();
  auto other = [](uint32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); };
  size_t i = 0;
  while (i < n) {
    size_t j = i;
    if (cp[i] == '\'' && i + 1 < n) {
      uint32_t a = cp[i + 1], b = i + 2 < n ? cp[i + 2] : 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') j = i + 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) j = i + 3;
    }
    if (j == i) {
      size_t k = cp[i] == ' ' && i + 1 < n ? i + 1 : i;  // the optional leading space
      bool (*cls)(uint32_t) = nullptr;
      if (is_letter(cp[k])) cls = is_letter;
      else if (is_number(cp[k])) cls = is_number;
      if (cls) {
        for (j = k; j < n && cls(cp[j]);) ++j;
      } else if (other(cp[k])) {
        for (j = k; j < n && other(cp[j]);) ++j;
      }
    }
    if (j == i) {  // whitespace: \s+(?!\S) keeps the last space for the word after it
      for (j = i; j < n && is_space(cp[j]);) ++j;
      if (j < n && j - i > 1) --j;
    }
    out.push_back(from_code_points(cp, i, j));
    i = j;
  }
  return out;
}

std::string byte_level_chars(const std::string& s) {
  std::string out;
  for (unsigned char b : s) put_utf8(out, byte_alphabet().byte_to_cp[b]);
  return out;
}

bool json_true(const Json& obj, const char* key) {
  const Json* v = obj.find(key);
  return v && v->kind == Json::Bool && v->b;
}

}  // namespace

void Tokenizer::setup_encoding(const Json& root, const std::unordered_map<std::string, int64_t>& model_ids,
                               const std::string& what) {
  auto unsupported = [&](const std::string& why) {
    if (encode_error_.empty()) encode_error_ = what + ": encoding needs " + why + " (not implemented)";
  };
  // added tokens, matched leftmost-longest before the model sees the text
  if (const Json* added = root.find("added_tokens")) {
    const Json* normalizer = root.find("normalizer");
    for (const Json& a : added->arr) {
      Added t{a.at("content", what).str, a.at("id", what).i, json_true(a, "lstrip"), json_true(a, "rstrip"),
              json_true(a, "normalized")};
      if (json_true(a, "single_word")) unsupported("a single_word added token");
      if (t.normalized && normalizer) normalize_added(*normalizer, t.match, what);
      if (!t.match.empty()) added_.push_back(t);
    }
  }
  // normalizer
  std::vector<const Json*> stack;
  if (const Json* n = root.find("normalizer"); n && n->kind != Json::Null) stack.push_back(n);
  while (!stack.empty()) {
    const Json& n = *stack.front();
    stack.erase(stack.begin());
    const std::string type = n.find("type") ? n.find("type")->str : "";
    if (type == "Sequence") {
      std::vector<const Json*> inner;
      for (const Json& x : n.at("normalizers", what).arr) inner.push_back(&x);
      stack.insert(stack.begin(), inner.begin(), inner.end());
    } else if (type == "Prepend") {
      norm_.emplace_back("", n.at("prepend", what).str);
    } else if (type == "Replace" && n.at("pattern", what).find("String")) {
      norm_.emplace_back(n.at("pattern", what).find("String")->str, n.at("content", what).str);
    } else {
      unsupported("the " + type + " normalizer");
    }
  }
  // pre-tokenizer
  stack.clear();
  if (const Json* p = root.find("pre_tokenizer"); p && p->kind != Json::Null) stack.push_back(p);
  while (!stack.empty()) {
    const Json& p = *stack.front();
    stack.erase(stack.begin());
    const std::string type = p.find("type") ? p.find("type")->str : "";
    PreStep step{};
    if (type == "Sequence") {
      std::vector<const Json*> inner;
      for (const Json& x : p.at("pretokenizers", what).arr) inner.push_back(&x);
      stack.insert(stack.begin(), inner.begin(), inner.end());
      continue;
    } else if (type == "ByteLevel") {
      step.kind = PreStep::ByteLevel;
      step.flag = json_true(p, "add_prefix_space");
      const Json* r = p.find("use_regex");
      step.regex = !(r && r->kind == Json::Bool && !r->b);
    } else if (type == "Metaspace") {
      step.kind = PreStep::Metaspace;
      step.replacement = p.at("replacement", what).str;
      step.scheme = p.find("prepend_scheme") ? p.find("prepend_scheme")->str
                                             : (json_true(p, "add_prefix_space") ? "always" : "never");
      const Json* split = p.find("split");
      step.flag = !(split && split->kind == Json::Bool && !split->b);
    } else if (type == "Digits") {
      step.kind = PreStep::Digits;
      step.flag = json_true(p, "individual_digits");
    } else {
      unsupported("the " + type + " pre-tokenizer");
      continue;
    }
    pre_.push_back(step);
  }
  // model
  const Json& model = root.at("model", what);
  const Json* type = model.find("type");
  if (type && type->str != "BPE") unsupported("the " + type->str + " model");
  if (!type && !model.find("merges")) unsupported("a model other than BPE");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const Json* v = model.find(key); v && v->kind == Json::String && !v->str.empty()) unsupported(key);
  if (const Json* d = model.find("dropout"); d && d->kind == Json::Number && d->num > 0) unsupported("BPE dropout");
  model_vocab_ = model_ids;
  bpe_byte_fallback_ = json_true(model, "byte_fallback");
  fuse_unk_ = json_true(model, "fuse_unk");
  ignore_merges_ = json_true(model, "ignore_merges");
  if (const Json* u = model.find("unk_token"); u && u->kind == Json::String) {
    auto it = model_ids.find(u->str);
    unk_id_ = it == model_ids.end() ? -1 : it->second;
  }
  if (const Json* merges = model.find("merges")) {
    int64_t rank = 0;
    for (const Json& m : merges->arr) {
      std::string a, b;
      if (m.kind == Json::String) {  // the older "a b" form
        size_t sp = m.str.find(' ', 1);
        if (sp == std::string::npos) { ++rank; continue; }
        a = m.str.substr(0, sp);
        b = m.str.substr(sp + 1);
      } else if (m.kind == Json::Array && m.arr.size() == 2) {
        a = m.arr[0].str;
        b = m.arr[1].str;
      }
      auto ia = model_ids.find(a), ib = model_ids.find(b), im = model_ids.find(a + b);
      if (ia != model_ids.end() && ib != model_ids.end() && im != model_ids.end()) {
        uint64_t key = (uint64_t(ia->second) << 32) | uint64_t(ib->second);
        merges_.emplace(key, std::make_pair(rank, im->second));  // the first (lowest) rank wins
      }
      ++rank;
    }
  }
  // post-processor: TemplateProcessing's "single" (ByteLevel only trims offsets)
  stack.clear();
  if (const Json* p = root.find("post_processor"); p && p->kind != Json::Null) stack.push_back(p);
  while (!stack.empty()) {
    const Json& p = *stack.front();
    stack.erase(stack.begin());
    const std::string t = p.find("type") ? p.find("type")->str : "";
    if (t == "Sequence") {
      for (const Json& x : p.at("processors", what).arr) stack.push_back(&x);
    } else if (t == "TemplateProcessing") {
      const Json& specials = p.at("special_tokens", what);
      for (const Json& item : p.at("single", what).arr) {
        if (const Json* st = item.find("SpecialToken")) {
          const Json& spec = specials.at(st->at("id", what).str, what + ": post_processor.special_tokens");
          std::vector<int64_t> ids;
          for (const Json& x : spec.at("ids", what).arr) ids.push_back(x.as_int(what + ": special token id"));
          template_single_.push_back(ids);
        } else {
          template_single_.emplace_back();
        }
      }
    } else if (t != "ByteLevel") {
      post_supported_ = false;
      post_error_ = what + ": add_special_tokens needs the " + t + " post-processor (not implemented)";
    }
  }
}

// tokenizers' AddedVocabulary::find_matches: leftmost-longest, lstrip/rstrip take the
// whitespace next to the token.
void Tokenizer::split_added(const std::string& text, bool normalized,
                            std::vector<std::pair<std::string, int64_t>>* out) const {
  size_t start_offset = 0, pos = 0;
  auto space_before = [&](size_t end) {  // start of the whitespace run ending at `end`
    std::vector<uint32_t> cps = code_points(text.substr(0, end));
    size_t k = cps.size(), bytes = end;
    while (k > 0 && is_space(cps[k - 1])) {
      std::string c;
      put_utf8(c, cps[--k]);
      bytes -= c.size();
    }
    return bytes;
  };
  auto space_after = [&](size_t begin) {
    size_t bytes = begin;
    for (uint32_t c : code_points(text.substr(begin))) {
      if (!is_space(c)) break;
      std::string e;
      put_utf8(e, c);
      bytes += e.size();
    }
    return bytes;
  };
  while (pos < text.size()) {
    const Added* best = nullptr;
    for (const Added& a : added_) {
      if (a.normalized != normalized) continue;
      if (text.compare(pos, a.match.size(), a.match) == 0 && (!best || a.match.size() > best->match.size())) best = &a;
    }
    if (!best) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + best->match.size();
    if (best->lstrip) start = std::max(space_before(start), start_offset);
    if (best->rstrip) stop = space_after(stop);
    if (start_offset < start) out->emplace_back(text.substr(start_offset, start - start_offset), -1);
    out->emplace_back(text.substr(start, stop - start), best->id);
    start_offset = stop;
    pos = pos + best->match.size();
    pos = std::max(pos, stop);
  }
  if (start_offset < text.size()) out->emplace_back(text.substr(start_offset), -1);
}

std::string Tokenizer::normalize(const std::string& text) const {
  std::string s = text;
  for (const auto& step : norm_) {
    if (step.first.empty()) {
      if (!s.empty()) s = step.second + s;
    } else {
      replace_all(s, step.first, step.second);
    }
  }
  return s;
}

std::vector<std::string> Tokenizer::pre_tokenize(const std::string& piece, bool at_start) const {
  std::vector<std::string> cur{piece};
  for (const PreStep& step : pre_) {
    std::vector<std::string> next;
    for (size_t i = 0; i < cur.size(); ++i) {
      std::string p = cur[i];
      if (p.empty()) continue;
      if (step.kind == PreStep::ByteLevel) {
        if (step.flag && p[0] != ' ') p = " " + p;
        for (const std::string& w : step.regex ? gpt2_split(p) : std::vector<std::string>{p})
          next.push_back(byte_level_chars(w));
      } else if (step.kind == PreStep::Metaspace) {
        replace_all(p, " ", step.replacement);
        bool starts = p.compare(0, step.replacement.size(), step.replacement) == 0;
        if (!starts && (step.scheme == "always" || (step.scheme == "first" && at_start && i == 0)))
          p = step.replacement + p;
        if (!step.flag) {
          next.push_back(p);
          continue;
        }
        // split before every replacement character (MergedWithNext)
        size_t begin = 0;
        for (size_t hit = p.find(step.replacement, 1); hit != std::string::npos;
             hit = p.find(step.replacement, hit + step.replacement.size())) {
          if (hit > begin) next.push_back(p.substr(begin, hit - begin));
          begin = hit;
        }
        next.push_back(p.substr(begin));
      } else {  // Digits: numbers isolated, one a piece or in runs
        std::vector<uint32_t> cps = code_points(p);
        size_t begin = 0;
        for (size_t k = 1; k <= cps.size(); ++k) {
          bool cut = k == cps.size() || is_number(cps[k]) != is_number(cps[k - 1]) ||
                     (step.flag && is_number(cps[k]));
          if (cut) {
            next.push_back(from_code_points(cps, begin, k));
            begin = k;
          }
        }
      }
    }
    cur.swap(next);
  }
  std::vector<std::string> out;
  for (std::string& p : cur)
    if (!p.empty()) out.push_back(std::move(p));
  return out;
}

void Tokenizer::bpe(const std::string& word, std::vector<int64_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = model_vocab_.find(word);
    if (it != model_vocab_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  std::vector<int64_t> syms;
  bool last_unk = false;
  for (uint32_t cp : code_points(word)) {
    std::string c;
    put_utf8(c, cp);
    auto it = model_vocab_.find(c);
    if (it != model_vocab_.end()) {
      syms.push_back(it->second);
      last_unk = false;
      continue;
    }
    if (bpe_byte_fallback_) {
      std::vector<int64_t> bytes;
      for (unsigned char b : c) {
        char name[7];
        std::snprintf(name, sizeof(name), "<0x%02X>", b);
        auto bt = model_vocab_.find(name);
        if (bt == model_vocab_.end()) break;
        bytes.push_back(bt->second);
      }
      if (bytes.size() == c.size()) {
        syms.insert(syms.end(), bytes.begin(), bytes.end());
        last_unk = false;
        continue;
      }
    }
    if (unk_id_ >= 0 && !(fuse_unk_ && last_unk)) syms.push_back(unk_id_);
    last_unk = unk_id_ >= 0;
  }
  // merge the lowest-ranked adjacent pair, the leftmost of equals, until none is left
  while (syms.size() > 1) {
    size_t best = 0;
    int64_t best_rank = -1, merged = -1;
    for (size_t k = 0; k + 1 < syms.size(); ++k) {
      auto it = merges_.find((uint64_t(syms[k]) << 32) | uint64_t(syms[k + 1]));
      if (it != merges_.end() && (best_rank < 0 || it->second.first < best_rank)) {
        best = k;
        best_rank = it->second.first;
        merged = it->second.second;
      }
    }
    if (best_rank < 0) break;
    syms[best] = merged;
    syms.erase(syms.begin() + long(best) + 1);
  }
  out->insert(out->end(), syms.begin(), syms.end());
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  if (!encode_error_.empty()) throw Error(encode_error_);
  if (add_special_tokens && !post_supported_) throw Error(post_error_);
  if (!valid_utf8(text)) throw Error("the text to encode is not valid UTF-8");
  std::vector<int64_t> ids;
  std::vector<std::pair<std::string, int64_t>> raw;
  split_added(text, false, &raw);
  bool at_start = true;  // the piece begins at the text's first byte
  for (const auto& piece : raw) {
    if (piece.second >= 0) {
      ids.push_back(piece.second);
      at_start = false;
      continue;
    }
    std::vector<std::pair<std::string, int64_t>> parts;
    split_added(normalize(piece.first), true, &parts);
    for (const auto& part : parts) {
      if (part.second >= 0) {
        ids.push_back(part.second);
      } else {
        for (const std::string& w : pre_tokenize(part.first, at_start)) bpe(w, &ids);
      }
      at_start = false;
    }
  }
  if (!add_special_tokens || template_single_.empty()) return ids;
  std::vector<int64_t> out;
  for (const auto& item : template_single_) {
    if (item.empty()) out.insert(out.end(), ids.begin(), ids.end());
    else out.insert(out.end(), item.begin(), item.end());
  }
  return out;
}

}  // namespace bluelower
