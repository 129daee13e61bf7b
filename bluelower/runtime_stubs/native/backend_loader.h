// The runtime's TVM-facing half (the APU backends of apu_backend.h, linked against
// libtvm_runtime / libtvm_ffi) is a shared library of the bundle, lib/libbluelower_backend.so,
// that bluelower-run dlopen()s only after it has verified every file of the bundle: the
// executable itself links nothing but system libraries, so the loader maps no bundle file
// before the SHA-256 checks have run (docs/native-runtime.md, "Verification").
#pragma once
#include <string>
#include <vector>

#include "apu_backend.h"

namespace bluelower {

// The backend's entry points (apu_backend.h), resolved with dlsym.
struct BackendApi {
  int (*backend_open)(const char*, const bl_backend_config*, bl_backend**, char*) = nullptr;
  void (*backend_close)(bl_backend*) = nullptr;
  int (*partition_load)(bl_backend*, const char*, const char* const*, int, bl_partition**, char*) = nullptr;
  void (*partition_release)(bl_partition*) = nullptr;
  int (*bind_input)(bl_partition*, int, const bl_buffer*, char*) = nullptr;
  int (*bind_output)(bl_partition*, int, const bl_buffer*, char*) = nullptr;
  int (*run)(bl_partition*, char*) = nullptr;
};

// dlopen()s, in order, each of `libs` (absolute paths of verified files: the backend's
// dependencies, RTLD_GLOBAL so that model.so and the backend resolve against exactly these
// copies) and then `backend`; throws Error naming the file on any failure.
const BackendApi& load_backend(const std::vector<std::string>& libs, const std::string& backend);

}  // namespace bluelower
