// bluelower-run: the native runtime of a bluelower bundle (docs/native-runtime.md).
//
//   bluelower-run BUNDLE [--image X.npy] [--prompt TEXT | --prompt-ids 1,2,3] [--max-new-tokens N]
//                        [--json | --json-stream] [--soc NAME] [--backend sim|neuron]   (alias: --apu-backend)
//
// Loads and verifies the bundle (manifest.json, SHA-256 of every listed file), reads the
// weights from params.safetensors, preprocesses the image, forms the prompt (--prompt: the
// chat prompt split at compile time around the user's text, encoded with tokenizer.cc; the
// image's rows where the Python runtime puts them) and runs the generation procedure of
// docs/bundle-format.md through the APU backend interface (apu_backend.h), streaming the
// decoded text. Every failure is one line on stderr and exit status 1 (2 for a usage error).
#include <fcntl.h>
#include <signal.h>
#include <climits>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "apu_backend.h"
#include "backend_loader.h"
#include "image.h"
#include "json.h"
#include "loaders.h"
#include "sha256.h"
#include "tokenizer.h"
#include "util.h"

using namespace bluelower;

namespace {

constexpr int kFormatVersion = 1;
const char* kFormat = "bluelower-bundle";

#if defined(__aarch64__)
const char* kArch = "aarch64";
#elif defined(__x86_64__)
const char* kArch = "x86_64";
#else
const char* kArch = "unknown";
#endif

struct UsageError : Error {
  explicit UsageError(const std::string& m) : Error(m) {}
};

const BackendApi* g_backend = nullptr;  // lib/libbluelower_backend.so, loaded after verification

// 64-byte aligned host buffer (TVM's kernels assume aligned data).
struct Buffer {
  void* data = nullptr;
  size_t bytes = 0;
  bl_buffer desc{};
  Buffer() = default;
  Buffer(bl_dtype dt, const std::vector<int64_t>& shape, bool zero = true) { init(dt, shape, zero); }
  // zero = false: the caller writes every byte before reading any (the KV cache, zeroed when
  // prefill starts), so its pages stay untouched, not resident, until then
  void init(bl_dtype dt, const std::vector<int64_t>& shape, bool zero = true) {
    if (shape.size() > 8) throw Error("tensor of rank > 8");
    size_t item = dt == BL_F32 || dt == BL_I32 ? 4 : dt == BL_I64 ? 8 : dt == BL_F16 ? 2 : 1;
    size_t n = 1;
    for (int64_t s : shape) {
      if (s < 0 || (s > 0 && n > (size_t(1) << 40) / size_t(s))) throw Error("tensor shape too large");
      n *= size_t(s);
    }
    bytes = n * item;
    size_t alloc = (bytes + 63) / 64 * 64;
    if (alloc == 0) alloc = 64;
    data = std::aligned_alloc(64, alloc);
    if (!data) throw Error("out of memory allocating " + std::to_string(alloc) + " bytes");
    if (zero) std::memset(data, 0, alloc);
    desc.data = data;
    desc.dtype = dt;
    desc.ndim = int32_t(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) desc.shape[i] = shape[i];
  }
  ~Buffer() { std::free(data); }
  void release() {  // give the memory back now (the image stage's buffers once the image is encoded)
    std::free(data);
    data = nullptr;
    bytes = 0;
    desc.data = nullptr;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* f32() { return static_cast<float*>(data); }
  int64_t* i64() { return static_cast<int64_t*>(data); }
};

struct Args {
  std::string bundle, image, prompt_ids, prompt, soc, backend = "sim";
  bool has_prompt = false, has_prompt_ids = false;
  bool json_stream = false;  // one JSON line per generated token, then the --json object
  std::string dump_pixels;  // testing: write the preprocessed float32 [k, 3, S, S] and stop
  long max_new_tokens = 16;
  std::string policy = "relaxed";  // as `bluelower run`; none: one squashed 384x384 patch
  long max_patches = -1;        // -1: the manifest's runtime.max_patches, else 9
  bool json = false;
};

[[noreturn]] void usage_exit() {
  std::fprintf(stdout,
               "usage: bluelower-run BUNDLE [--image X.npy] [--prompt TEXT | --prompt-ids 1,2,3] [--max-new-tokens N]\n"
               "                     [--json | --json-stream] [--policy none|relaxed] [--max-patches N] [--soc NAME]\n"
               "                     [--backend sim|neuron] [--dump-pixels OUT.f32]\n"
               "Generate tokens greedily from a bluelower bundle. --prompt: the text in the checkpoint's chat\n"
               "prompt, encoded with the bundle's tokenizer.json; the answer streams to stdout as it is generated.\n"
               "--prompt-ids: token ids (after the image's tokens); prints the generated ids.\n"
               "The image must be a .npy uint8 or float32 [H, W, 3] array (PNG/JPEG: convert with\n"
               "numpy first; native decoding is not supported).\n");
  std::exit(0);
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&](const std::string& flag) -> std::string {
      size_t eq = s.find('=');
      if (eq != std::string::npos) return s.substr(eq + 1);
      if (i + 1 >= argc) throw UsageError("option " + flag + " needs a value");
      return argv[++i];
    };
    auto is = [&](const char* flag) { return s == flag || s.rfind(std::string(flag) + "=", 0) == 0; };
    if (s == "-h" || s == "--help") usage_exit();
    else if (is("--image")) a.image = value("--image");
    else if (is("--prompt-ids")) { a.prompt_ids = value("--prompt-ids"); a.has_prompt_ids = true; }
    else if (is("--prompt")) { a.prompt = value("--prompt"); a.has_prompt = true; }
    else if (is("--soc")) a.soc = value("--soc");
    else if (is("--backend")) a.backend = value("--backend");
    else if (is("--apu-backend")) a.backend = value("--apu-backend");
    else if (is("--dump-pixels")) a.dump_pixels = value("--dump-pixels");
    else if (is("--policy")) {
      a.policy = value("--policy");
      if (a.policy != "none" && a.policy != "relaxed")
        throw UsageError("--policy must be none or relaxed (the native runtime implements these two), got '" + a.policy + "'");
    } else if (is("--max-patches")) {
      std::string v = value("--max-patches");
      char* end = nullptr;
      errno = 0;
      long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || errno || n < 1 || n > 64) throw UsageError("--max-patches must be an integer in [1, 64], got '" + v + "'");
      a.max_patches = n;
    }
    else if (is("--max-new-tokens")) {
      std::string v = value("--max-new-tokens");
      char* end = nullptr;
      errno = 0;
      long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || errno) throw UsageError("--max-new-tokens must be an integer, got '" + v + "'");
      a.max_new_tokens = n;
    } else if (s == "--json") a.json = true;
    else if (s == "--json-stream") a.json = a.json_stream = true;
    else if (!s.empty() && s[0] == '-') throw UsageError("unknown option " + s);
    else if (a.bundle.empty()) a.bundle = s;
    else throw UsageError("unexpected argument " + s);
  }
  if (a.bundle.empty()) throw UsageError("missing BUNDLE directory (see --help)");
  if (a.has_prompt && a.has_prompt_ids) throw UsageError("give --prompt or --prompt-ids, not both");
  return a;
}

std::vector<int64_t> parse_prompt_ids(const std::string& text) {
  std::vector<int64_t> ids;
  size_t b = text.find_first_not_of(" \t");
  if (b == std::string::npos) return ids;
  std::string t = text.substr(b, text.find_last_not_of(" \t") - b + 1);
  size_t pos = 0;
  while (true) {
    size_t comma = t.find(',', pos);
    std::string tok = t.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    size_t tb = tok.find_first_not_of(" \t"), te = tok.find_last_not_of(" \t");
    tok = tb == std::string::npos ? "" : tok.substr(tb, te - tb + 1);
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(tok.c_str(), &end, 10);
    if (tok.empty() || *end || errno) throw UsageError("--prompt-ids must be comma-separated integers, got '" + text + "'");
    ids.push_back(v);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return ids;
}

std::string arch_of(const std::string& triple) { return triple.substr(0, triple.find('-')); }

bl_dtype dtype_of(const std::string& s, const std::string& what) {
  if (s == "float32" || s == "F32") return BL_F32;
  if (s == "int64" || s == "I64") return BL_I64;
  if (s == "int32" || s == "I32") return BL_I32;
  if (s == "float16" || s == "F16") return BL_F16;
  if (s == "int8" || s == "I8") return BL_I8;
  if (s == "uint8" || s == "U8") return BL_U8;
  throw Error(what + ": unsupported dtype " + s);
}

std::vector<int64_t> shape_of(const Json& j, const std::string& what) {
  std::vector<int64_t> out;
  for (auto& d : j.as_array(what)) {
    int64_t v = d.as_int(what);
    if (v < 0) throw Error(what + ": negative dimension");
    out.push_back(v);
  }
  return out;
}

struct Bundle {
  std::string dir;
  Json manifest;
};

bool is_hex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

// manifest.sha256 (sha256sum's format): "<64 hex>  manifest.json\n" first, checked here
// against the manifest's bytes; further lines ("<64 hex>  bin/bluelower-run", the file that
// cannot check itself before the kernel maps it) must agree with the manifest's files and
// are checked with them. Returns the further lines.
std::vector<std::pair<std::string, std::string>> check_manifest_hash(const std::string& dir,
                                                                     const std::vector<uint8_t>& manifest) {
  const std::string path = dir + "/manifest.sha256";
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    throw Error(dir + ": missing manifest.sha256 (the manifest's own hash; a bundle from an older bluelower, or "
                "damaged): rebuild it");
  const std::string bad = path + ": malformed (expected '<sha256>  manifest.json' lines in `sha256sum` format)";
  if (st.st_size > 4096) throw Error(bad);
  std::vector<uint8_t> raw = read_file(path);
  std::string text(raw.begin(), raw.end());
  std::vector<std::pair<std::string, std::string>> lines;  // (path, hash)
  for (size_t pos = 0; pos < text.size();) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos || nl < pos + 67 || text.compare(pos + 64, 2, "  ") != 0) throw Error(bad);
    std::string hash = text.substr(pos, 64), name = text.substr(pos + 66, nl - pos - 66);
    if (!is_hex64(hash) || name.empty()) throw Error(bad);
    lines.emplace_back(name, hash);
    pos = nl + 1;
  }
  if (lines.empty() || lines[0].first != "manifest.json") throw Error(bad);
  Sha256 h;
  h.update(manifest.data(), manifest.size());
  if (h.hexdigest() != lines[0].second)
    throw Error(dir + ": manifest.json does not match its SHA-256 in manifest.sha256 (corrupt or modified)");
  lines.erase(lines.begin());
  return lines;
}

Bundle load_manifest(const std::string& dir, const std::string& want_soc) {
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) throw Error("bundle directory not found: " + dir);
  std::string path = dir + "/manifest.json";
  if (!is_regular_file(path)) throw Error(dir + ": no manifest.json (not a bluelower bundle)");
  std::vector<uint8_t> text = read_file(path);
  auto detached = check_manifest_hash(dir, text);
  Bundle b{dir, parse_json(reinterpret_cast<const char*>(text.data()), text.size(), path)};
  for (auto& line : detached) {  // (the files themselves are hashed by verify_files)
    const Json* files = b.manifest.find("files");
    const Json* entry = files ? files->find(line.first) : nullptr;
    if (!entry || entry->kind != Json::String || entry->str != line.second)
      throw Error(dir + ": manifest.sha256 and manifest.json disagree on the SHA-256 of " + line.first);
  }
  const Json& m = b.manifest;
  const Json* fmt = m.find("format");
  if (!fmt || fmt->kind != Json::String || fmt->str != kFormat) throw Error(path + ": not a bluelower manifest");
  const Json* ver = m.find("format_version");
  if (!ver || ver->kind != Json::Number || !ver->is_int || ver->i != kFormatVersion) {
    std::string got = !ver ? "missing" : ver->kind == Json::Number ? (ver->is_int ? std::to_string(ver->i) : "non-integer") : "not a number";
    throw Error(path + ": format version " + got + " is not supported (expected " + std::to_string(kFormatVersion) + ")");
  }
  if (!want_soc.empty()) {
    const std::string& soc = m.at("soc", path).as_string(path + ": soc");
    if (soc != want_soc) throw Error(dir + ": bundle is built for SoC '" + soc + "', not '" + want_soc + "'");
  }
  const Json* target = m.find("target");
  if (target && target->find("mtriple")) {
    std::string arch = arch_of(target->at("mtriple", "target").as_string(path + ": target.mtriple"));
    if (arch != kArch)
      throw Error(dir + ": bundle is compiled for " + arch + ", this runtime runs on " + kArch);
  }
  return b;
}

// A path of `files`: relative, no empty / "." / ".." component, no backslash.
bool safe_relative(const std::string& name) {
  if (name.empty() || name[0] == '/' || name.find('\\') != std::string::npos) return false;
  size_t b = 0;
  while (true) {
    size_t e = name.find('/', b);
    std::string part = name.substr(b, e == std::string::npos ? std::string::npos : e - b);
    if (part.empty() || part == "." || part == "..") return false;
    if (e == std::string::npos) return true;
    b = e + 1;
  }
}

std::string real_path(const std::string& p) {
  char buf[PATH_MAX];
  if (!::realpath(p.c_str(), buf)) return std::string();
  return buf;
}

void verify_files(const Bundle& b) {
  const std::string what = b.dir + "/manifest.json: files";
  const Json& files = b.manifest.at("files", b.dir + "/manifest.json");
  if (files.kind != Json::Object) throw Error(what + " must be an object");
  std::vector<std::pair<std::string, std::string>> sorted;
  for (auto& kv : files.obj) sorted.emplace_back(kv.first, kv.second.as_string(what + "." + kv.first));
  std::sort(sorted.begin(), sorted.end());
  for (const char* required : {"model.so", "params.safetensors"})
    if (!files.find(required)) throw Error(what + ": does not list " + required);
  const std::string root = real_path(b.dir);
  for (auto& kv : sorted) {
    const std::string& name = kv.first;
    if (!safe_relative(name)) throw Error(what + ": refusing path '" + name + "' (must be relative, inside the bundle)");
    if (!is_hex64(kv.second)) throw Error(what + ": the SHA-256 of " + name + " is not 64 hex digits");
    std::string path = b.dir + "/" + name;
    if (!is_regular_file(path)) throw Error(b.dir + ": missing file " + name);
    if (real_path(path) != root + "/" + name)
      throw Error(b.dir + ": " + name + " is (behind) a symbolic link (a bundle holds regular files only)");
    if (file_sha256(path) != kv.second)
      throw Error(b.dir + ": " + name + " does not match its SHA-256 in the manifest (corrupt or modified)");
  }
}

// The TVM-facing half of the runtime and its libraries, from lib/: all must be listed (hence
// verified above), and lib/ must hold nothing unlisted. Then dlopen()ed, dependencies first.
void load_verified_backend(const Bundle& b) {
  const Json& files = b.manifest.at("files", b.dir + "/manifest.json");
  const std::string root = real_path(b.dir);
  for (const char* sub : {"bin", "lib"}) {
    DIR* d = ::opendir((b.dir + "/" + sub).c_str());
    if (!d) continue;
    struct Closer { DIR* d; ~Closer() { ::closedir(d); } } closer{d};
    while (struct dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n == "." || n == "..") continue;
      std::string rel = std::string(sub) + "/" + n;
      if (!files.find(rel))
        throw Error(b.dir + ": " + rel + " is not a file the manifest lists (nothing unverified may sit in " + sub +
                    "/, where the runtime and its libraries are loaded from)");
    }
  }
  std::vector<std::string> libs;
  for (const char* name : {"libc++_shared.so", "libtvm_ffi.so", "libtvm_runtime.so"}) {
    std::string rel = std::string("lib/") + name;
    if (files.find(rel)) libs.push_back(root + "/" + rel);
    else if (std::string(name) != "libc++_shared.so")
      throw Error(b.dir + "/manifest.json: files does not list " + rel + " (a bundle from an older bluelower, or "
                  "damaged): rebuild it");
  }
  const std::string backend = "lib/libbluelower_backend.so";
  if (!files.find(backend))
    throw Error(b.dir + "/manifest.json: files does not list " + backend + " (a bundle from an older bluelower, or "
                "damaged): rebuild it");
  g_backend = &load_backend(libs, root + "/" + backend);
}

// params.safetensors -> aligned host buffers, only the tensors some function needs.
struct Params {
  std::map<std::string, std::unique_ptr<Buffer>> tensors;
  static int lookup(void* ctx, const char* name, bl_buffer* out) {
    auto* self = static_cast<Params*>(ctx);
    auto it = self->tensors.find(name);
    if (it == self->tensors.end()) return 1;
    *out = it->second->desc;
    return 0;
  }
};

void load_params(const std::string& path, const std::vector<std::string>& names, Params& params) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("cannot open " + path);
  struct Closer { int fd; ~Closer() { ::close(fd); } } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) throw Error("cannot stat " + path);
  uint64_t size = uint64_t(st.st_size);
  auto pread_all = [&](void* dst, size_t n, uint64_t off) {
    char* p = static_cast<char*>(dst);
    while (n) {
      ssize_t r = ::pread(fd, p, n, off_t(off));
      if (r <= 0) throw Error(path + ": truncated (read failed at byte " + std::to_string(off) + ")");
      p += r; n -= size_t(r); off += uint64_t(r);
    }
  };
  uint8_t first8[8];
  if (size < 8) throw Error(path + ": truncated (shorter than the 8-byte header length)");
  pread_all(first8, 8, 0);
  uint64_t hlen = safetensors_header_len(first8);
  if (hlen > size - 8 || hlen > (uint64_t(1) << 30))
    throw Error(path + ": truncated (header length " + std::to_string(hlen) + " exceeds the file size " + std::to_string(size) + ")");
  std::vector<uint8_t> prefix(size_t(8 + hlen));
  pread_all(prefix.data(), prefix.size(), 0);
  SafetensorsIndex idx = parse_safetensors(prefix.data(), prefix.size(), size, path);
  for (auto& name : names) {
    if (params.tensors.count(name)) continue;
    auto it = idx.tensors.find(name);
    if (it == idx.tensors.end()) throw Error(path + ": has no tensor '" + name + "'");
    const TensorEntry& t = it->second;
    auto buf = std::make_unique<Buffer>(dtype_of(t.dtype, path + ": " + name), t.shape);
    pread_all(buf->data, buf->bytes, idx.data_offset + t.begin);
    params.tensors.emplace(name, std::move(buf));
  }
}

void check(int rc, const char* err) {
  if (rc != 0) throw Error(err);
}

struct Partition {
  bl_partition* p = nullptr;
  ~Partition() { if (p) g_backend->partition_release(p); }
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;  // lowest index on ties, like numpy
  return best;
}

std::string fmt_double(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.6f", v);
  return buf;
}

// ------------------------------------------------------------------ the text path
//
// The prompt as the Python runtime forms it (runtime_stubs/text.py: build_prompt, and
// api._wrap_image): segments of ids and the image's place. A runtime without Jinja cannot
// render the chat template, so the compile step rendered the single user turn for it
// (manifest tokenizer.chat_prompt / chat_prompt_image / user_text, compile.py
// native_prompt_parts); this only concatenates and encodes.

struct Segment {
  bool image = false;
  std::vector<int64_t> ids;
};

std::string json_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size() + 2);
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(char(c));  // UTF-8 as is (the tokenizer's text is valid UTF-8)
        }
    }
  }
  return out;
}

// Python's str.strip(): the code points str.isspace() is true for (Jinja's trim filter).
bool py_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f || cp == 0x205f ||
         cp == 0x3000;
}

// The code point starting at s[i] (valid UTF-8: encode() checks it first) and its length.
uint32_t utf8_at(const std::string& s, size_t i, size_t* len) {
  unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
  if (i + n > s.size()) n = s.size() - i;
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1f) : n == 3 ? (c & 0x0f) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
  *len = n;
  return cp;
}

std::string py_strip(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e) {
    size_t n;
    if (!py_space(utf8_at(s, b, &n))) break;
    b += n;
  }
  // scan forward for the last non-space code point (UTF-8 is not easily walked backwards)
  size_t last_end = b;
  for (size_t i = b; i < e;) {
    size_t n;
    bool sp = py_space(utf8_at(s, i, &n));
    i += n;
    if (!sp) last_end = i;
  }
  return s.substr(b, last_end - b);
}

// text.py Tokenizer.encode_piece: a piece from the middle of a prompt (after a special
// token or the image), without the word-start space SentencePiece adds at a text's start.
std::vector<int64_t> encode_piece(const Tokenizer& tok, const std::string& text) {
  if (text.empty()) return {};
  std::vector<int64_t> nl = tok.encode("\n", false), ids = tok.encode("\n" + text, false);
  if (ids.size() >= nl.size() && std::equal(nl.begin(), nl.end(), ids.begin()))
    return std::vector<int64_t>(ids.begin() + long(nl.size()), ids.end());
  return tok.encode(text, false);
}

const Json* object_or_null(const Json& section, const char* key, const std::string& what) {
  const Json* v = section.find(key);
  if (!v || v->kind == Json::Null) return nullptr;
  if (v->kind != Json::Object) throw Error(what + "." + key + " must be an object or null");
  return v;
}

std::vector<Segment> text_prompt(const Tokenizer& tok, const Json& info, const std::string& text, bool has_image,
                                 const std::string& what) {
  const Json* tmpl = info.find("chat_template");
  const bool has_template = tmpl && tmpl->kind != Json::Null;
  std::vector<Segment> segs;
  auto add = [&](std::vector<int64_t> ids) {
    if (!ids.empty()) segs.push_back(Segment{false, std::move(ids)});
  };
  if (!has_template) {  // the text with the tokenizer's special tokens; the image after the leading ones (BOS)
    std::vector<int64_t> ids = tok.encode(text, true);
    if (!has_image) {
      segs.push_back(Segment{false, ids});
      return segs;
    }
    std::vector<int64_t> lead = tok.encode("", true);
    size_t cut = ids.size() >= lead.size() && std::equal(lead.begin(), lead.end(), ids.begin()) ? lead.size() : 0;
    add(std::vector<int64_t>(ids.begin(), ids.begin() + long(cut)));
    segs.push_back(Segment{true, {}});
    add(std::vector<int64_t>(ids.begin() + long(cut), ids.end()));
    return segs;
  }
  if (tmpl->kind != Json::String) throw Error(what + ".chat_template must be a string or null");
  const char* refuse = "the native runtime has no Jinja and uses the chat prompt rendered at compile time";
  std::string user = text;
  const Json* mode = info.find("user_text");  // absent: a bundle from before it was recorded, verbatim
  if (mode && mode->kind == Json::Null)
    throw Error(std::string("this bundle's chat template does not write the user's text verbatim or trimmed (") +
                refuse + "): give --prompt-ids, or run it with the host runtime");
  if (mode) {
    const std::string& m = mode->as_string(what + ".user_text");
    if (m == "strip") user = py_strip(text);
    else if (m != "verbatim") throw Error(what + ".user_text must be \"verbatim\", \"strip\" or null, got '" + m + "'");
  }
  if (!has_image) {
    const Json* cp = object_or_null(info, "chat_prompt", what);
    if (!cp)
      throw Error(std::string("this bundle's chat template could not be split around the user's text at compile "
                              "time (") + refuse + "): give --prompt-ids");
    const std::string& prefix = cp->at("prefix", what + ".chat_prompt").as_string(what + ".chat_prompt.prefix");
    const std::string& suffix = cp->at("suffix", what + ".chat_prompt").as_string(what + ".chat_prompt.suffix");
    segs.push_back(Segment{false, tok.encode(prefix + user + suffix, false)});
    return segs;
  }
  if (!info.find("chat_prompt_image"))
    throw Error("this bundle has no compile-time image chat prompt (tokenizer.chat_prompt_image; built by an older "
                "bluelower): rebuild it, or give --prompt-ids");
  const Json* ci = object_or_null(info, "chat_prompt_image", what);
  if (!ci)
    throw Error(std::string("this bundle's chat template could not be split around the image and the user's text "
                            "at compile time (") + refuse + "): give --prompt-ids");
  auto part = [&](const char* k) -> const std::string& {
    return ci->at(k, what + ".chat_prompt_image").as_string(what + ".chat_prompt_image." + k);
  };
  add(tok.encode(part("prefix"), false));
  segs.push_back(Segment{true, {}});
  add(encode_piece(tok, part("middle") + user + part("suffix")));
  return segs;
}

// api._wrap_image: the checkpoint processor's text around the image's rows (image_wrap).
std::vector<Segment> wrap_image(const Tokenizer& tok, const Json& info, std::vector<Segment> segs,
                                const std::string& what) {
  const Json* wrap = info.find("image_wrap");
  if (!wrap || wrap->kind == Json::Null) return segs;
  auto& w = wrap->as_array(what + ".image_wrap");
  if (w.size() != 2) throw Error(what + ".image_wrap must be [before, after]");
  const std::string& before = w[0].as_string(what + ".image_wrap[0]");
  const std::string& after = w[1].as_string(what + ".image_wrap[1]");
  std::vector<Segment> out;
  for (auto& seg : segs) {
    if (!seg.image) {
      out.push_back(std::move(seg));
      continue;
    }
    if (!before.empty()) out.push_back(Segment{false, encode_piece(tok, before)});
    out.push_back(Segment{true, {}});
    if (!after.empty()) out.push_back(Segment{false, encode_piece(tok, after)});
  }
  return out;
}

int run(const Args& a) {
  double t_start = now();
  if (a.max_new_tokens < 1) throw UsageError("--max-new-tokens must be at least 1");
  std::vector<int64_t> ids = parse_prompt_ids(a.prompt_ids);
  Bundle b = load_manifest(a.bundle, a.soc);
  verify_files(b);
  load_verified_backend(b);
  const std::string mpath = b.dir + "/manifest.json";
  const Json& rt = b.manifest.at("runtime", mpath);
  const Json& functions = b.manifest.at("functions", mpath);
  auto rint = [&](const char* k) { return rt.at(k, mpath + ": runtime").as_int(mpath + ": runtime." + k); };
  const int64_t capacity = rint("kv_capacity"), chunk = rint("prefill_chunk"), image_batch = rint("image_batch");
  const int64_t eos = rint("eos_token_id"), hidden = rint("hidden_size"), vocab = rint("vocab_size");
  // A text-only model (an LLM checkpoint) has no encode_image and no image_size.
  const Json* jsize = rt.find("image_size");
  const bool has_vision = functions.find("encode_image") && jsize && jsize->kind != Json::Null;
  const int64_t S = has_vision ? rint("image_size") : 0, tpp = has_vision ? rint("image_tokens_per_patch") : 0;
  if (capacity < 1 || chunk < 1 || image_batch < 1 || hidden < 1 || vocab < 1 || capacity > (int64_t(1) << 24) ||
      chunk > (int64_t(1) << 20) || image_batch > 64 || hidden > (int64_t(1) << 20) || vocab > (int64_t(1) << 24) ||
      (has_vision && (S < 1 || tpp < 1 || S > 8192 || tpp > (int64_t(1) << 20))))
    throw Error(mpath + ": runtime values out of range");
  std::vector<int64_t> stop_ids{eos};  // eos_token_id and every stop_token_ids entry end generation
  if (const Json* st = rt.find("stop_token_ids"); st && st->kind != Json::Null)
    for (auto& v : st->as_array(mpath + ": runtime.stop_token_ids")) stop_ids.push_back(v.as_int(mpath + ": runtime.stop_token_ids"));
  auto is_stop = [&](int64_t t) { return std::find(stop_ids.begin(), stop_ids.end(), t) != stop_ids.end(); };
  float mean[3] = {0, 0, 0}, stdv[3] = {1, 1, 1};
  if (has_vision) {
    auto& jm = rt.at("image_mean", mpath).as_array(mpath + ": runtime.image_mean");
    auto& js = rt.at("image_std", mpath).as_array(mpath + ": runtime.image_std");
    if (jm.size() != 3 || js.size() != 3) throw Error(mpath + ": image_mean/image_std must have 3 entries");
    for (int c = 0; c < 3; ++c) {
      mean[c] = float(jm[size_t(c)].as_number("image_mean"));
      stdv[c] = float(js[size_t(c)].as_number("image_std"));
      if (stdv[c] == 0.0f) throw Error(mpath + ": image_std must not contain 0");
    }
  }
  for (int64_t id : ids)
    if (id < 0 || id >= vocab) throw UsageError("prompt ids must be in [0, " + std::to_string(vocab) + ")");
  if (!a.image.empty() && !has_vision)
    throw Error(b.dir + " has no image encoder (a text-only model): drop --image");

  // Tokenizer (tokenizer.json, hashed in files): needed for --prompt, used for the text otherwise.
  const Json* tinfo = b.manifest.find("tokenizer");
  if (tinfo && tinfo->kind == Json::Null) tinfo = nullptr;
  std::unique_ptr<Tokenizer> tok;
  const std::string twhat = mpath + ": tokenizer";
  if (tinfo) {
    if (tinfo->kind != Json::Object) throw Error(twhat + " must be an object or null");
    const Json* file = tinfo->find("file");
    std::string name = file && file->kind != Json::Null ? file->as_string(twhat + ".file") : "tokenizer.json";
    if (!b.manifest.at("files", mpath).find(name))
      throw Error(mpath + ": files does not list the tokenizer " + name);
    try {
      tok = std::make_unique<Tokenizer>(Tokenizer::load(b.dir + "/" + name));
    } catch (const Error&) {
      if (a.has_prompt) throw;
      // --prompt-ids: the ids work without text (a tokenizer.json this decoder does not read)
    }
    if (tok && tok->vocab_size() > vocab)
      throw Error(b.dir + ": the tokenizer has " + std::to_string(tok->vocab_size()) + " tokens, the model " +
                  std::to_string(vocab));
  }
  if (a.has_prompt && !tinfo)
    throw Error(b.dir + " has no tokenizer (compiled from a config, not a checkpoint): give --prompt-ids");

  // Image (decoded and validated before anything runs).
  std::unique_ptr<ImageU8> img;
  if (!a.image.empty()) {
    if (a.image.size() < 4 || a.image.compare(a.image.size() - 4, 4, ".npy") != 0)
      throw Error("cannot read image " + a.image + ": the native runtime reads .npy [H, W, 3] arrays only "
                  "(convert PNG/JPEG with numpy first)");
    if (!is_regular_file(a.image)) throw Error("cannot read .npy image " + a.image + ": no such file");
    std::vector<uint8_t> bytes = read_file(a.image);
    img = std::make_unique<ImageU8>(parse_npy_image(bytes.data(), bytes.size(), a.image));
  }
  int64_t grid_m = 0, grid_n = 0;
  if (img && a.policy == "relaxed") {
    int64_t limit = a.max_patches;
    if (limit < 0) {
      const Json* mp = rt.find("max_patches");
      limit = mp ? mp->as_int(mpath + ": runtime.max_patches") : 9;
      if (limit < 1 || limit > 64) throw Error(mpath + ": runtime.max_patches out of range");
    }
    select_grid_relaxed(img->width, img->height, limit, S, 0.1, &grid_m, &grid_n);
  }
  const int64_t k_patches = !img ? 0 : grid_m ? grid_m * grid_n + (grid_m * grid_n > 1 ? 1 : 0) : 1;
  const int64_t n_image = k_patches * tpp;

  // The prompt as segments: --prompt-ids after the image; --prompt where the chat prompt puts it.
  double t_tok = now();
  std::vector<Segment> segs;
  int64_t image_position = img ? 0 : -1;  // prompt ids before the image's rows
  if (a.has_prompt) {
    if (!tok->encode_unsupported().empty())
      throw Error(tok->encode_unsupported() + ", so --prompt cannot be encoded natively: give --prompt-ids");
    segs = text_prompt(*tok, *tinfo, a.prompt, img != nullptr, twhat);
    if (img) segs = wrap_image(*tok, *tinfo, std::move(segs), twhat);
    ids.clear();
    for (auto& seg : segs) {
      if (seg.image) image_position = int64_t(ids.size());
      ids.insert(ids.end(), seg.ids.begin(), seg.ids.end());
    }
    for (int64_t id : ids)
      if (id < 0 || id >= vocab) throw Error("the encoded prompt has id " + std::to_string(id) + " outside [0, " + std::to_string(vocab) + ")");
  } else {
    if (img) segs.push_back(Segment{true, {}});
    if (!ids.empty()) segs.push_back(Segment{false, ids});
  }
  double tokenize_s = now() - t_tok;
  const int64_t n = n_image + int64_t(ids.size());
  if (n == 0) throw UsageError("nothing to generate from: no image and an empty prompt");

  if (!a.dump_pixels.empty()) {  // preprocessing only (tests compare it with the Python reference)
    if (!img) throw UsageError("--dump-pixels needs --image");
    std::vector<float> px(size_t(3 * S * S));
    if (grid_m) px = preprocess_grid(*img, grid_m, grid_n, S, mean, stdv);
    else preprocess_whole_image(*img, S, mean, stdv, px.data());
    FILE* f = std::fopen(a.dump_pixels.c_str(), "wb");
    if (!f) throw Error("cannot write " + a.dump_pixels);
    size_t w = std::fwrite(px.data(), sizeof(float), px.size(), f);
    if (std::fclose(f) != 0 || w != px.size()) throw Error("cannot write " + a.dump_pixels);
    return 0;
  }

  if (n > capacity || a.max_new_tokens > capacity - n)  // (no n + max_new_tokens: it could overflow)
    throw Error("prompt of " + std::to_string(n) + " rows (" + std::to_string(n_image) + " image tokens + " +
                std::to_string(ids.size()) + " prompt ids) plus " + std::to_string(a.max_new_tokens) +
                " new tokens exceeds the KV cache capacity of " + std::to_string(capacity));

  // Weights, backend, partitions.
  // The ViT's weights only when there is an image; they are released once it is encoded
  // (the memory plan's phases: image encoding, then prefill and decode without the ViT).
  std::vector<const char*> fnames;
  if (has_vision && img) fnames.push_back("encode_image");
  for (const char* f : {"embed", "prefill", "decode"}) fnames.push_back(f);
  std::map<std::string, std::vector<std::string>> fparams;
  std::vector<std::string> all_params;
  for (const char* f : fnames) {
    const Json& fn = functions.at(f, mpath + ": functions");
    for (auto& p : fn.at("params", std::string(f)).as_array(mpath + ": functions." + f + ".params")) {
      fparams[f].push_back(p.as_string("param name"));
      all_params.push_back(fparams[f].back());
    }
  }
  Params params;
  load_params(b.dir + "/params.safetensors", all_params, params);
  const Json& kv = b.manifest.at("kv_cache", mpath);
  Buffer kv_cache(dtype_of(kv.at("dtype", "kv_cache").as_string("kv_cache.dtype"), "kv_cache"),
                  shape_of(kv.at("shape", "kv_cache"), mpath + ": kv_cache.shape"), /*zero=*/false);  // allocated once, zeroed at prefill

  char err[BL_APU_ERR_LEN] = {0};
  bl_backend_config cfg{b.dir.c_str(), "model.so", &Params::lookup, &params, 0};
  bl_backend* backend = nullptr;
  check(g_backend->backend_open(a.backend.c_str(), &cfg, &backend, err), err);
  struct BackendCloser { bl_backend* b; ~BackendCloser() { g_backend->backend_close(b); } } closer{backend};
  std::map<std::string, std::unique_ptr<Partition>> parts;
  for (const char* f : fnames) {
    std::vector<const char*> names;
    for (auto& s : fparams[f]) names.push_back(s.c_str());
    auto part = std::make_unique<Partition>();
    check(g_backend->partition_load(backend, f, names.data(), int(names.size()), &part->p, err), err);
    parts[f] = std::move(part);
  }
  auto input_shape = [&](const char* f, size_t i) {
    auto& ins = functions.at(f, "functions").at("inputs", f).as_array(std::string(f) + ".inputs");
    if (i >= ins.size()) throw Error(mpath + ": functions." + f + " has too few inputs");
    return shape_of(ins[i].at("shape", f), mpath + ": functions." + f + ".inputs shape");
  };
  auto expect = [&](const char* f, size_t i, const std::vector<int64_t>& want) {
    if (input_shape(f, i) != want) throw Error(mpath + ": functions." + f + " input " + std::to_string(i) +
                                               " does not have the shape the runtime section implies");
  };
  if (has_vision) expect("encode_image", 0, {image_batch, 3, S, S});
  expect("embed", 0, {chunk});
  expect("prefill", 0, {chunk, hidden});
  expect("prefill", 1, std::vector<int64_t>(kv_cache.desc.shape, kv_cache.desc.shape + kv_cache.desc.ndim));

  Buffer pixels, image_out;
  if (parts.count("encode_image")) {
    pixels.init(BL_F32, {image_batch, 3, S, S});
    image_out.init(BL_F32, {image_batch, tpp, hidden});
  }
  Buffer id_chunk(BL_I64, {chunk}), embed_out(BL_F32, {chunk, hidden});
  Buffer rows(BL_F32, {chunk, hidden}), start_pos(BL_I64, {1}), num_valid(BL_I64, {1});
  Buffer logits(BL_F32, {1, vocab}), token(BL_I64, {1}), position(BL_I64, {1});
  bl_partition* enc = parts.count("encode_image") ? parts["encode_image"]->p : nullptr;
  bl_partition* emb = parts["embed"]->p;
  bl_partition* pre = parts["prefill"]->p;
  bl_partition* dec = parts["decode"]->p;
  if (enc) {
    check(g_backend->bind_input(enc, 0, &pixels.desc, err), err);
    check(g_backend->bind_output(enc, 0, &image_out.desc, err), err);
  }
  check(g_backend->bind_input(emb, 0, &id_chunk.desc, err), err);
  check(g_backend->bind_output(emb, 0, &embed_out.desc, err), err);
  const bl_buffer* pre_in[4] = {&rows.desc, &kv_cache.desc, &start_pos.desc, &num_valid.desc};
  for (int i = 0; i < 4; ++i) check(g_backend->bind_input(pre, i, pre_in[i], err), err);
  check(g_backend->bind_output(pre, 0, &logits.desc, err), err);
  check(g_backend->bind_output(pre, 1, &kv_cache.desc, err), err);
  const bl_buffer* dec_in[3] = {&token.desc, &kv_cache.desc, &position.desc};
  for (int i = 0; i < 3; ++i) check(g_backend->bind_input(dec, i, dec_in[i], err), err);
  check(g_backend->bind_output(dec, 0, &logits.desc, err), err);
  check(g_backend->bind_output(dec, 1, &kv_cache.desc, err), err);
  double t_loaded = now();

  // 1. image -> patches [k, 3, S, S] -> encoded in batches of image_batch
  std::vector<float> image_rows(size_t(n_image * hidden));
  const size_t patch_floats = size_t(3 * S * S);
  std::vector<float> patches(size_t(k_patches) * patch_floats);
  if (img && grid_m) patches = preprocess_grid(*img, grid_m, grid_n, S, mean, stdv);
  else if (img) preprocess_whole_image(*img, S, mean, stdv, patches.data());
  double t0 = now();
  for (int64_t i = 0, row = 0; i < k_patches; i += image_batch) {
    int64_t valid = std::min(image_batch, k_patches - i);
    std::memset(pixels.data, 0, pixels.bytes);
    std::memcpy(pixels.data, &patches[size_t(i) * patch_floats], size_t(valid) * patch_floats * sizeof(float));
    check(g_backend->run(enc, err), err);
    std::memcpy(&image_rows[size_t(row * hidden)], image_out.data, size_t(valid * tpp * hidden) * sizeof(float));
    row += valid * tpp;
  }
  if (enc) {  // the ViT is done: its partition, the weights only it reads, its buffers go
    std::set<std::string> text_params;
    for (const char* f : fnames)
      if (std::string(f) != "encode_image") text_params.insert(fparams[f].begin(), fparams[f].end());
    parts.erase("encode_image");  // the sim backend also returns the VM's pooled blocks then
    enc = nullptr;
    for (auto it = params.tensors.begin(); it != params.tensors.end();)
      it = text_params.count(it->first) ? std::next(it) : params.tensors.erase(it);
    pixels.release();
    image_out.release();
    std::vector<float>().swap(patches);
  }
  // 2.-4. the sequence, one prefill chunk at a time: its prompt ids embedded in one embed call
  // (padded with id 0), the image's rows at the image's place; only the image rows are held.
  double t1 = now();
  std::vector<int64_t> source;  // per row: a token id (>= 0) or -1 - (image row)
  source.reserve(size_t(n));
  for (const Segment& seg : segs) {
    if (seg.image) {
      for (int64_t r = 0; r < n_image; ++r) source.push_back(-1 - r);
      continue;
    }
    source.insert(source.end(), seg.ids.begin(), seg.ids.end());
  }
  double embed_s = 0.0;
  std::memset(kv_cache.data, 0, kv_cache.bytes);  // KV cache zeroed once, here
  double t2 = now();
  for (int64_t start = 0; start < n; start += chunk) {
    int64_t valid = std::min(chunk, n - start);
    std::memset(rows.data, 0, rows.bytes);
    std::vector<int64_t> text_rows;
    std::memset(id_chunk.data, 0, id_chunk.bytes);
    for (int64_t r = 0; r < valid; ++r) {
      int64_t src = source[size_t(start + r)];
      if (src >= 0) {
        id_chunk.i64()[text_rows.size()] = src;
        text_rows.push_back(r);
      } else {
        std::memcpy(rows.f32() + r * hidden, &image_rows[size_t((-1 - src) * hidden)], size_t(hidden) * sizeof(float));
      }
    }
    if (!text_rows.empty()) {
      double te = now();
      check(g_backend->run(emb, err), err);
      for (size_t i = 0; i < text_rows.size(); ++i)
        std::memcpy(rows.f32() + text_rows[i] * hidden, embed_out.f32() + int64_t(i) * hidden, size_t(hidden) * sizeof(float));
      embed_s += now() - te;
    }
    start_pos.i64()[0] = start;
    num_valid.i64()[0] = valid;
    check(g_backend->run(pre, err), err);
  }
  double t3 = now();
  // 5. greedy decode, the text streamed as it is generated (--prompt; --json-stream: JSON lines)
  const bool stream_text = a.has_prompt && !a.json && tok;
  std::unique_ptr<StreamDecoder> stream;
  if (tok && (stream_text || a.json_stream)) stream = std::make_unique<StreamDecoder>(*tok, true);
  auto emit = [&](int64_t t) {
    std::string piece = stream ? stream->put(t) : std::string();
    if (a.json_stream) {
      std::printf("{\"token\": %" PRId64 ", \"text\": \"%s\"}\n", t, json_escape(piece).c_str());
      std::fflush(stdout);
    } else if (stream_text && !piece.empty()) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
  };
  std::vector<int64_t> tokens{argmax(logits.f32(), vocab)};
  emit(tokens.back());
  int64_t pos = n;
  while (int64_t(tokens.size()) < a.max_new_tokens && !is_stop(tokens.back())) {
    token.i64()[0] = tokens.back();
    position.i64()[0] = pos++;
    check(g_backend->run(dec, err), err);
    tokens.push_back(argmax(logits.f32(), vocab));
    emit(tokens.back());
  }
  double t4 = now();
  for (auto& kvp : parts) kvp.second.reset();
  std::string rest = stream ? stream->flush() : std::string();

  if (a.json) {
    if (a.json_stream && !rest.empty()) std::printf("{\"text\": \"%s\"}\n", json_escape(rest).c_str());
    std::string out = "{\"tokens\": [";
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? ", " : "") + std::to_string(tokens[i]);
    out += "]";
    if (tok) {
      std::string text;
      bool ok = true;
      if (a.has_prompt) text = tok->decode(tokens, true);  // the streamed text, whole (an error as for the stream)
      else {
        try { text = tok->decode(tokens, true); } catch (const Error&) { ok = false; }  // --prompt-ids: text if it can
      }
      if (ok) out += ", \"text\": \"" + json_escape(text) + "\"";
    }
    if (a.has_prompt) {
      out += ", \"prompt_ids\": [";
      for (size_t i = 0; i < ids.size(); ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
      out += "]";
      if (image_position >= 0) out += ", \"image_position\": " + std::to_string(image_position);
    }
    out += ", \"prompt_rows\": " + std::to_string(n) + ", \"image_tokens\": " + std::to_string(n_image);
    if (grid_m) out += ", \"grid\": [" + std::to_string(grid_m) + ", " + std::to_string(grid_n) + "], \"patches\": " + std::to_string(k_patches);
    out += ", \"runtime\": \"native\", \"backend\": \"" + a.backend + "\", \"arch\": \"" + kArch + "\"";
    out += ", \"timings_s\": {\"load\": " + fmt_double(t_loaded - t_start - tokenize_s) + ", \"tokenize\": " +
           fmt_double(tokenize_s) + ", \"image_preprocess\": " + fmt_double(t0 - t_loaded) + ", \"image_encode\": " +
           fmt_double(t1 - t0) + ", \"embed\": " + fmt_double(embed_s) + ", \"prefill\": " +
           fmt_double(t3 - t2 - embed_s) +
           ", \"decode\": " + fmt_double(t4 - t3);
    if (tokens.size() > 1)
      out += ", \"decode_tokens_per_s\": " + fmt_double(double(tokens.size() - 1) / std::max(t4 - t3, 1e-9));
    out += "}}";
    std::printf("%s\n", out.c_str());
  } else if (stream_text) {
    std::fwrite(rest.data(), 1, rest.size(), stdout);
    std::printf("\n");
  } else {
    std::string out = "tokens:";
    for (int64_t t : tokens) out += " " + std::to_string(t);
    std::printf("%s\n", out.c_str());
  }
  return 0;
}

}  // namespace

// A mapped bundle file (model.so, a TVM library) that shrinks after it was verified makes the
// next access to it SIGBUS: one line and exit 1 instead of a crash.
extern "C" void on_sigbus(int) {
  static const char msg[] = "error: a bundle file changed or was truncated while in use (SIGBUS): verify the bundle "
                            "and run again\n";
  ssize_t w = ::write(2, msg, sizeof(msg) - 1);
  (void)w;
  ::_exit(1);
}

int main(int argc, char** argv) {
  struct sigaction sa {};
  sa.sa_handler = on_sigbus;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGBUS, &sa, nullptr);
  try {
    Args a = parse_args(argc, argv);
    return run(a);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::string m = e.what();
    size_t nl = m.find('\n');
    if (nl != std::string::npos) m = m.substr(0, nl);
    std::fprintf(stderr, "error: %s\n", m.c_str());
    return 1;
  } catch (...) {
    std::fprintf(stderr, "error: unexpected failure\n");
    return 1;
  }
}
