#include "loaders.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>

namespace bluelower {

namespace {

bool mul_ok(uint64_t a, uint64_t b, uint64_t* out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  *out = a * b;
  return true;
}

int64_t st_itemsize(const std::string& dt) {
  if (dt == "F32" || dt == "I32" || dt == "U32") return 4;
  if (dt == "F16" || dt == "BF16" || dt == "I16" || dt == "U16") return 2;
  if (dt == "I8" || dt == "U8" || dt == "BOOL") return 1;
  if (dt == "I64" || dt == "U64" || dt == "F64") return 8;
  return 0;
}

}  // namespace

uint64_t safetensors_header_len(const uint8_t* b) {
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | b[k];
  return n;
}

SafetensorsIndex parse_safetensors(const uint8_t* prefix, size_t prefix_size, uint64_t file_size,
                                   const std::string& what) {
  if (file_size < 8 || prefix_size < 8) throw Error(what + ": truncated (shorter than the 8-byte header length)");
  uint64_t hlen = safetensors_header_len(prefix);
  if (hlen > file_size - 8) throw Error(what + ": truncated (header length " + std::to_string(hlen) +
                                        " exceeds the file size " + std::to_string(file_size) + ")");
  if (hlen > prefix_size - 8) throw Error(what + ": header not fully read");
  Json header = parse_json(reinterpret_cast<const char*>(prefix + 8), size_t(hlen), what + " header");
  if (header.kind != Json::Object) throw Error(what + ": header is not a JSON object");
  SafetensorsIndex idx;
  idx.data_offset = 8 + hlen;
  uint64_t data_size = file_size - idx.data_offset;
  for (auto& kv : header.obj) {
    if (kv.first == "__metadata__") continue;
    const std::string w = what + ": tensor '" + kv.first + "'";
    const Json& e = kv.second;
    if (e.kind != Json::Object) throw Error(w + " is not an object");
    TensorEntry t;
    t.dtype = e.at("dtype", w).as_string(w + " dtype");
    t.itemsize = st_itemsize(t.dtype);
    if (!t.itemsize) throw Error(w + ": unsupported dtype " + t.dtype);
    uint64_t count = 1;
    for (auto& d : e.at("shape", w).as_array(w + " shape")) {
      int64_t v = d.as_int(w + " shape entry");
      if (v < 0) throw Error(w + ": negative dimension");
      t.shape.push_back(v);
      if (!mul_ok(count, uint64_t(v), &count)) throw Error(w + ": shape overflows");
    }
    auto& offs = e.at("data_offsets", w).as_array(w + " data_offsets");
    if (offs.size() != 2) throw Error(w + ": data_offsets must be [begin, end]");
    int64_t b = offs[0].as_int(w + " data_offsets"), en = offs[1].as_int(w + " data_offsets");
    if (b < 0 || en < b) throw Error(w + ": bad data_offsets");
    t.begin = uint64_t(b);
    t.end = uint64_t(en);
    uint64_t nbytes;
    if (!mul_ok(count, uint64_t(t.itemsize), &nbytes) || nbytes != t.end - t.begin)
      throw Error(w + ": data_offsets do not match its shape and dtype");
    if (t.end > data_size)
      throw Error(what + ": truncated (tensor '" + kv.first + "' ends at byte " + std::to_string(idx.data_offset + t.end) +
                  ", the file has " + std::to_string(file_size) + ")");
    if (idx.tensors.count(kv.first)) throw Error(w + " is listed twice");
    idx.tensors.emplace(kv.first, std::move(t));
  }
  return idx;
}

ImageU8 parse_npy_image(const uint8_t* data, size_t size, const std::string& what) {
  static const uint8_t magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (size < 10 || std::memcmp(data, magic, 6) != 0) throw Error("cannot read .npy image " + what + ": not a .npy file");
  uint8_t major = data[6];
  size_t hlen, hstart;
  if (major == 1) {
    hlen = size_t(data[8]) | (size_t(data[9]) << 8);
    hstart = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw Error("cannot read .npy image " + what + ": truncated header");
    hlen = size_t(data[8]) | (size_t(data[9]) << 8) | (size_t(data[10]) << 16) | (size_t(data[11]) << 24);
    hstart = 12;
  } else {
    throw Error("cannot read .npy image " + what + ": unsupported .npy version " + std::to_string(major));
  }
  if (hlen > size - hstart) throw Error("cannot read .npy image " + what + ": truncated header");
  std::string h(reinterpret_cast<const char*>(data + hstart), hlen);
  // The header is a Python dict literal written by numpy:
  //   {'descr': '<f4', 'fortran_order': False, 'shape': (H, W, 3), }
  auto value_after = [&](const std::string& key) -> size_t {
    size_t k = h.find("'" + key + "'");
    if (k == std::string::npos) throw Error("cannot read .npy image " + what + ": header lacks '" + key + "'");
    size_t c = h.find(':', k);
    if (c == std::string::npos) throw Error("cannot read .npy image " + what + ": malformed header");
    c++;
    while (c < h.size() && h[c] == ' ') c++;
    return c;
  };
  size_t d = value_after("descr");
  if (d >= h.size() || h[d] != '\'') throw Error("cannot read .npy image " + what + ": malformed descr");
  size_t dend = h.find('\'', d + 1);
  if (dend == std::string::npos) throw Error("cannot read .npy image " + what + ": malformed descr");
  std::string descr = h.substr(d + 1, dend - d - 1);
  bool is_u8 = descr == "|u1" || descr == "<u1" || descr == ">u1" || descr == "u1";
  bool is_f32 = descr == "<f4";
  if (!is_u8 && !is_f32) {
    std::string name = descr == "|b1" ? "bool" : descr;
    throw Error("bad .npy image " + what + ": dtype must be uint8 or float32, got " + name);
  }
  size_t fo = value_after("fortran_order");
  bool fortran;
  if (h.compare(fo, 4, "True") == 0) fortran = true;
  else if (h.compare(fo, 5, "False") == 0) fortran = false;
  else throw Error("cannot read .npy image " + what + ": malformed fortran_order");
  size_t s = value_after("shape");
  if (s >= h.size() || h[s] != '(') throw Error("cannot read .npy image " + what + ": malformed shape");
  size_t send = h.find(')', s);
  if (send == std::string::npos) throw Error("cannot read .npy image " + what + ": malformed shape");
  std::vector<int64_t> shape;
  {
    size_t q = s + 1;
    while (q < send) {
      while (q < send && (h[q] == ' ' || h[q] == ',')) q++;
      if (q >= send) break;
      int64_t v = 0;
      size_t digits = 0;
      while (q < send && h[q] >= '0' && h[q] <= '9') {
        if (v > (int64_t(1) << 40)) throw Error("bad .npy image " + what + ": dimension too large");
        v = v * 10 + (h[q] - '0');
        q++; digits++;
      }
      if (!digits) throw Error("cannot read .npy image " + what + ": malformed shape");
      while (q < send && h[q] == 'L') q++;  // Python 2 longs
      shape.push_back(v);
    }
  }
  std::string shape_s = "(";
  for (size_t k = 0; k < shape.size(); ++k) shape_s += (k ? ", " : "") + std::to_string(shape[k]);
  shape_s += shape.size() == 1 ? ",)" : ")";
  if (shape.size() != 3 || shape[2] != 3 || shape[0] < 1 || shape[1] < 1)
    throw Error("bad .npy image " + what + ": expected an [H, W, 3] array with H, W >= 1, got shape " + shape_s);
  int64_t H = shape[0], W = shape[1];
  if (H > (int64_t(1) << 20) || W > (int64_t(1) << 20) || H * W > (int64_t(1) << 28))
    throw Error("bad .npy image " + what + ": image too large " + shape_s);
  size_t count = size_t(H) * size_t(W) * 3;
  size_t item = is_u8 ? 1 : 4;
  size_t body = hstart + hlen;
  if (size - body < count * item)
    throw Error("cannot read .npy image " + what + ": truncated data (" + std::to_string(size - body) + " of " +
                std::to_string(count * item) + " bytes)");
  const uint8_t* src = data + body;
  ImageU8 img;
  img.height = H;
  img.width = W;
  img.pixels.resize(count);
  // element (y, x, c): C order offset (y*W + x)*3 + c; Fortran order y + H*(x + W*c)
  auto src_index = [&](int64_t y, int64_t x, int64_t c) -> size_t {
    return fortran ? size_t(y + H * (x + W * c)) : size_t((y * W + x) * 3 + c);
  };
  if (is_f32) {
    std::vector<float> vals(count);
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        for (int64_t c = 0; c < 3; ++c) {
          float v;
          std::memcpy(&v, src + 4 * src_index(y, x, c), 4);
          vals[size_t((y * W + x) * 3 + c)] = v;
        }
    float lo = 0, hi = 0;
    for (size_t k = 0; k < count; ++k) {
      if (!std::isfinite(vals[k])) throw Error("bad .npy image " + what + ": float32 values must be finite");
      if (k == 0 || vals[k] < lo) lo = vals[k];
      if (k == 0 || vals[k] > hi) hi = vals[k];
    }
    if (lo < 0.0f || hi > 1.0f) {
      char buf[128];
      std::snprintf(buf, sizeof(buf), "[%g, %g]", double(lo), double(hi));
      throw Error("bad .npy image " + what + ": float32 values must lie in [0, 1], got " + buf);
    }
    for (size_t k = 0; k < count; ++k) {
      volatile float t = vals[k] * 255.0f;  // separately rounded float32 ops
      float u = std::floor(t + 0.5f);
      img.pixels[k] = uint8_t(u);
    }
  } else {
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        for (int64_t c = 0; c < 3; ++c) img.pixels[size_t((y * W + x) * 3 + c)] = src[src_index(y, x, c)];
  }
  return img;
}

}  // namespace bluelower
