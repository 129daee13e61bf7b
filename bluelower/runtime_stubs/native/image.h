// Image preprocessing, bit for bit as docs/image-preprocessing.md (sections 4, 6, 7).
#pragma once
#include <vector>

#include "loaders.h"

namespace bluelower {

// Separable tent-filter resize, float32 arithmetic (compile with -ffp-contract=off).
ImageU8 resize_image(const ImageU8& img, int64_t w_out, int64_t h_out);

// grid = None: the whole image squashed to S x S, normalized, layout [1, 3, S, S]
// written to `out` (size 3*S*S).
void preprocess_whole_image(const ImageU8& img, int64_t S, const float mean[3], const float std_[3], float* out);

// fit_size / relaxed aspect-ratio grid selection (section 2), integers + doubles exactly
// as the reference. Returns (m, n).
void fit_size(int64_t W, int64_t H, int64_t BW, int64_t BH, int64_t* w_out, int64_t* h_out);
void select_grid_relaxed(int64_t W, int64_t H, int64_t max_patches, int64_t S, double alpha, int64_t* m,
                         int64_t* n);

// The full procedure (section 3) for grid (m, n): m*n local patches, row-major, on a
// top-left letterboxed canvas padded with 0.0, plus the thumbnail last iff m*n > 1.
// Returns float32 [k, 3, S, S].
std::vector<float> preprocess_grid(const ImageU8& img, int64_t m, int64_t n, int64_t S, const float mean[3],
                                   const float std_[3]);

}  // namespace bluelower
