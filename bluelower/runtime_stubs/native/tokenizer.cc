#include "tokenizer.h"

#include <algorithm>

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
    auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); };
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
  auto set = [&](int64_t id, const std::string& tok, const std::string& where) {
    if (id < 0 || id > (int64_t(1) << 31)) throw Error(where + ": token id " + std::to_string(id) + " out of range");
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

}  // namespace bluelower

// Encoding (text to ids) in C++ would need, to match tokenizers exactly:
//  1. added tokens: split the text on them first (longest match; lstrip/rstrip/single_word
//     flags; "normalized" ones matched on the normalized text);
//  2. the normalizer (Llama 2: Prepend "▁" + Replace " " -> "▁"; NFC/NFKC need Unicode
//     composition tables);
//  3. the pre-tokenizer: for byte-level BPE the GPT-2 / Llama 3 / Qwen split regex, with
//     Unicode classes \p{L}, \p{N}, \s and a (?!\S) look-ahead (Oniguruma in tokenizers), then
//     the bytes mapped to the GPT-2 alphabet; Metaspace for SentencePiece; Digits, Split;
//  4. the model: BPE merges by rank per pre-token (with ignore_merges, byte_fallback to
//     <0xNN>, fuse_unk), Unigram's Viterbi for T5-style vocabularies;
//  5. the post-processor (TemplateProcessing: BOS).
// Not done here: the runtime can take ids from the Python side (text.py) until then.
