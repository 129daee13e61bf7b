// Token ids to UTF-8 text from a Hugging Face tokenizer.json, as the `tokenizers` library
// decodes them (bluelower/runtime_stubs/text.py is the Python side; tests/test_text.py
// checks that both give the same text for the same ids).
//
// Decoding mirrors tokenizers' TokenizerImpl::decode: each id becomes its token string
// (added tokens first, then the model's vocabulary), special added tokens are dropped
// when asked, and the decoder chain of tokenizer.json turns the strings into text. The
// decoders byte-level BPE and SentencePiece-style vocabularies use are implemented:
// ByteLevel (the GPT-2 byte alphabet, invalid UTF-8 as U+FFFD), Metaspace, Replace (a
// string pattern), ByteFallback (<0xNN> tokens), Fuse, Strip, WordPiece, BPEDecoder and
// Sequence; anything else is a load-time Error naming it.
//
// Encoding (text to ids) covers byte-level BPE (GPT-2 pre-tokenizer regex, SmolLM2) and
// SentencePiece-style BPE (Llama 2 normalizer or Metaspace, byte fallback): added tokens,
// the normalizers Prepend/Replace, the pre-tokenizers ByteLevel/Metaspace/Digits, BPE
// merges, TemplateProcessing. A tokenizer.json needing anything else (a Split regex as
// in Llama 3 and Qwen, NFC, Unigram, WordPiece) still loads and decodes; encode() then
// throws Error naming what is missing (encode_unsupported() says it up front).
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "json.h"

namespace bluelower {

class Tokenizer {
 public:
  // Parses a tokenizer.json text; `what` names it in error messages (a path).
  static Tokenizer from_json_text(const std::string& text, const std::string& what);
  static Tokenizer load(const std::string& path);

  // One past the largest id (model vocabulary and added tokens).
  int64_t vocab_size() const { return static_cast<int64_t>(tokens_.size()); }
  // The token string of an id; nullptr for an id with none (a hole in the vocabulary).
  const std::string* token(int64_t id) const;
  int64_t token_to_id(const std::string& token) const;  // -1 when absent
  // Whether decode(skip_special=true) drops it: its string is a special added token.
  bool is_special(int64_t id) const;
  // A <0xNN> token that a ByteFallback decoder turns into one byte.
  bool is_byte_fallback(int64_t id) const;

  // The text of `ids`. Throws Error for an id outside [0, vocab_size()).
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = false) const;

  // The ids of `text` (UTF-8), as tokenizers' encode(text, add_special_tokens).ids.
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens = true) const;
  // Empty when encode() works for this tokenizer.json, else what it lacks.
  const std::string& encode_unsupported() const { return encode_error_; }

 private:
  struct Added {
    std::string match;  // the content, or its normalized form for "normalized": true
    int64_t id;
    bool lstrip, rstrip, normalized;
  };
  struct PreStep {
    enum Kind { ByteLevel, Metaspace, Digits } kind;
    bool flag = false;   // ByteLevel: add_prefix_space; Metaspace: split; Digits: individual
    bool regex = true;   // ByteLevel: use_regex
    std::string replacement;  // Metaspace
    std::string scheme;       // Metaspace: always, first, never
  };
  void setup_encoding(const Json& root, const std::unordered_map<std::string, int64_t>& model_ids,
                      const std::string& what);
  void split_added(const std::string& text, bool normalized, std::vector<std::pair<std::string, int64_t>>* out) const;
  std::string normalize(const std::string& s) const;
  std::vector<std::string> pre_tokenize(const std::string& piece, bool at_start) const;
  void bpe(const std::string& word, std::vector<int64_t>* out) const;

  std::vector<Added> added_;
  std::vector<std::pair<std::string, std::string>> norm_;  // Replace(a -> b); Prepend as ("", b)
  std::vector<PreStep> pre_;
  std::unordered_map<std::string, int64_t> model_vocab_;
  std::unordered_map<uint64_t, std::pair<int64_t, int64_t>> merges_;  // (left, right) -> (rank, merged)
  int64_t unk_id_ = -1;
  bool bpe_byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  std::vector<std::vector<int64_t>> template_single_;  // special ids, or empty for the sequence
  bool post_supported_ = true;
  std::string post_error_;
  std::string encode_error_;

  struct Step {
    enum Kind { ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, WordPiece, BPEDecoder } kind;
    std::string a, b;       // Metaspace: replacement; Replace: pattern, content; Strip: content;
                            // WordPiece: prefix; BPEDecoder: suffix
    bool flag = false;      // Metaspace: prepend_scheme != "never"; WordPiece: cleanup
    int64_t start = 0, stop = 0;  // Strip
  };
  void add_decoder(const Json& d, const std::string& what);
  std::vector<std::string> run_decoders(std::vector<std::string> tokens) const;

  std::vector<std::string> tokens_;   // by id; empty + !has_ for holes
  std::vector<bool> has_;
  std::unordered_map<std::string, int64_t> ids_;
  std::unordered_set<std::string> special_;
  std::vector<bool> byte_fallback_;
  std::vector<Step> steps_;
  bool has_decoder_ = false;
  bool uses_byte_fallback_ = false;
};

// Generated ids in, finished text out, one id at a time (the algorithm of text.py's
// StreamDecoder): the concatenation of put() results and flush() equals
// decode(all ids). Text is held while it ends in U+FFFD (a character split across
// tokens) or while the last token is a byte-fallback byte (a later byte can turn the run
// into U+FFFDs). Each step decodes only the last emitted chunk plus the new tokens.
class StreamDecoder {
 public:
  StreamDecoder(const Tokenizer& tok, bool skip_special = false) : tok_(tok), skip_(skip_special) {}
  std::string put(int64_t id);
  std::string flush();
  const std::string& text() const { return text_; }

 private:
  std::string emit(const std::string& chunk);
  const Tokenizer& tok_;
  bool skip_;
  std::vector<int64_t> ids_;
  size_t prefix_ = 0, read_ = 0;  // window start; ids before read_ are emitted
  std::string prefix_text_;       // decode(ids_[prefix_:read_])
  std::string text_;              // everything emitted
};

// U+FFFD for invalid sequences exactly as Rust's String::from_utf8_lossy (one per
// maximal invalid subpart, the Unicode recommendation); exposed for tests.
std::string utf8_lossy(const std::string& bytes);

}  // namespace bluelower
