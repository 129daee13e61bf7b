#include "image.h"

#include <algorithm>
#include <cmath>

namespace bluelower {

namespace {

struct Taps {
  int64_t K = 0;
  std::vector<int64_t> idx;  // [n_out * K]
  std::vector<float> w;      // [n_out * K]
};

// docs/image-preprocessing.md 4a, in double precision, weights rounded to float32.
Taps make_taps(int64_t n_in, int64_t n_out) {
  Taps t;
  double scale = double(n_in) / double(n_out);
  double support = std::max(scale, 1.0);
  int64_t r = int64_t(std::ceil(support));
  t.K = 2 * r + 1;
  t.idx.resize(size_t(n_out * t.K));
  t.w.resize(size_t(n_out * t.K));
  std::vector<double> w(size_t(t.K));
  for (int64_t i = 0; i < n_out; ++i) {
    double center = (double(i) + 0.5) * scale;
    int64_t base = int64_t(std::floor(center)) - r;
    for (int64_t k = 0; k < t.K; ++k) {
      int64_t j = base + k;
      double tt = (double(j) + 0.5 - center) / support;
      w[size_t(k)] = std::max(0.0, 1.0 - std::fabs(tt));
      t.idx[size_t(i * t.K + k)] = std::min(std::max(j, int64_t(0)), n_in - 1);
    }
    double s = w[0];
    for (int64_t k = 1; k < t.K; ++k) s = s + w[size_t(k)];
    for (int64_t k = 0; k < t.K; ++k) t.w[size_t(i * t.K + k)] = float(w[size_t(k)] / s);
  }
  return t;
}

}  // namespace

ImageU8 resize_image(const ImageU8& img, int64_t w_out, int64_t h_out) {
  const int64_t H = img.height, W = img.width;
  if (H == h_out && W == w_out) return img;
  // vertical pass (H -> h_out) on all W columns; identity when the height is kept
  std::vector<float> v(size_t(h_out * W * 3));
  if (H == h_out) {
    for (size_t k = 0; k < v.size(); ++k) v[k] = float(img.pixels[k]);
  } else {
    Taps ty = make_taps(H, h_out);
    for (int64_t y = 0; y < h_out; ++y) {
      float* row = &v[size_t(y * W * 3)];
      std::fill(row, row + W * 3, 0.0f);
      for (int64_t k = 0; k < ty.K; ++k) {
        float wk = ty.w[size_t(y * ty.K + k)];
        if (wk == 0.0f) continue;  // v + 0 * x == v for these finite, non-negative values
        const uint8_t* src = &img.pixels[size_t(ty.idx[size_t(y * ty.K + k)] * W * 3)];
        for (int64_t x = 0; x < W * 3; ++x) {
          float prod = wk * float(src[x]);
          row[x] = row[x] + prod;
        }
      }
    }
  }
  ImageU8 out;
  out.height = h_out;
  out.width = w_out;
  out.pixels.resize(size_t(h_out * w_out * 3));
  auto store = [](float o) -> uint8_t {
    float f = std::floor(o + 0.5f);
    f = std::min(std::max(f, 0.0f), 255.0f);
    return uint8_t(f);
  };
  if (W == w_out) {
    for (size_t k = 0; k < v.size(); ++k) out.pixels[k] = store(v[k]);
    return out;
  }
  Taps tx = make_taps(W, w_out);
  for (int64_t y = 0; y < h_out; ++y) {
    const float* row = &v[size_t(y * W * 3)];
    for (int64_t x = 0; x < w_out; ++x) {
      float o[3] = {0.0f, 0.0f, 0.0f};
      for (int64_t k = 0; k < tx.K; ++k) {
        float wk = tx.w[size_t(x * tx.K + k)];
        if (wk == 0.0f) continue;
        const float* px = row + tx.idx[size_t(x * tx.K + k)] * 3;
        for (int c = 0; c < 3; ++c) {
          float prod = wk * px[c];
          o[c] = o[c] + prod;
        }
      }
      for (int c = 0; c < 3; ++c) out.pixels[size_t((y * w_out + x) * 3 + c)] = store(o[c]);
    }
  }
  return out;
}

void preprocess_whole_image(const ImageU8& img, int64_t S, const float mean[3], const float std_[3], float* out) {
  ImageU8 r = resize_image(img, S, S);
  for (int c = 0; c < 3; ++c)
    for (int64_t y = 0; y < S; ++y)
      for (int64_t x = 0; x < S; ++x) {
        float v = float(r.pixels[size_t((y * S + x) * 3 + c)]);
        v = v / 255.0f;
        v = v - mean[c];
        v = v / std_[c];
        out[size_t((c * S + y) * S + x)] = v;
      }
}

void fit_size(int64_t W, int64_t H, int64_t BW, int64_t BH, int64_t* w_out, int64_t* h_out) {
  if (BW * H <= BH * W) {
    *w_out = BW;
    *h_out = std::max<int64_t>(1, H * BW / W);
  } else {
    *w_out = std::max<int64_t>(1, W * BH / H);
    *h_out = BH;
  }
}

void select_grid_relaxed(int64_t W, int64_t H, int64_t max_patches, int64_t S, double alpha, int64_t* best_m,
                         int64_t* best_n) {
  // candidates: m*n <= max_patches, visited by descending m*n, then descending m
  struct G { int64_t m, n; };
  std::vector<G> grids;
  for (int64_t m = 1; m <= max_patches; ++m)
    for (int64_t n = 1; n <= max_patches; ++n)
      if (m * n <= max_patches) grids.push_back({m, n});
  std::sort(grids.begin(), grids.end(), [](const G& a, const G& b) {
    return a.m * a.n != b.m * b.n ? a.m * a.n > b.m * b.n : a.m > b.m;
  });
  const int64_t area = W * H;
  int64_t re_max = 0, rw_min = 0;
  bool have_rw = false;  // rw_min = +inf until the first replacement
  *best_m = 1;
  *best_n = 1;
  for (const G& g : grids) {
    int64_t bw = S * g.m, bh = S * g.n, fw, fh;
    fit_size(W, H, bw, bh, &fw, &fh);
    int64_t re = std::min(fw * fh, area);
    int64_t rw = bw * bh - re;
    double thr = alpha * double(re_max);
    if (double(re - re_max) > thr || (double(re_max - re) < thr && (!have_rw || rw < rw_min))) {
      *best_m = g.m;
      *best_n = g.n;
      re_max = re;
      rw_min = rw;
      have_rw = true;
    }
  }
}

std::vector<float> preprocess_grid(const ImageU8& img, int64_t m, int64_t n, int64_t S, const float mean[3],
                                   const float std_[3]) {
  const int64_t k = m * n + (m * n > 1 ? 1 : 0);
  const size_t plane = size_t(S * S);
  std::vector<float> out(size_t(k) * 3 * plane, 0.0f);  // padding is 0.0
  int64_t fw, fh;
  fit_size(img.width, img.height, S * m, S * n, &fw, &fh);
  ImageU8 r = resize_image(img, fw, fh);
  for (int64_t y = 0; y < fh; ++y)
    for (int64_t x = 0; x < fw; ++x) {
      int64_t p = (y / S) * m + (x / S);  // row-major patch index
      int64_t py = y % S, px = x % S;
      for (int c = 0; c < 3; ++c) {
        float v = float(r.pixels[size_t((y * fw + x) * 3 + c)]);
        v = v / 255.0f;
        v = v - mean[c];
        v = v / std_[c];
        out[size_t((p * 3 + c)) * plane + size_t(py * S + px)] = v;
      }
    }
  if (m * n > 1) preprocess_whole_image(img, S, mean, std_, &out[size_t(m * n) * 3 * plane]);
  return out;
}

}  // namespace bluelower
