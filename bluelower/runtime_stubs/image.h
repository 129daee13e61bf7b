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

}  // namespace bluelower
