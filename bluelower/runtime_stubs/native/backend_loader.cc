#include "backend_loader.h"

#include <dlfcn.h>

#include "util.h"

namespace bluelower {

namespace {

std::string dl_error() {
  const char* e = dlerror();
  std::string s = e ? e : "unknown error";
  for (auto& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

template <typename F>
void resolve(void* h, const char* name, const std::string& path, F* out) {
  dlerror();
  void* sym = dlsym(h, name);
  if (!sym) throw Error(path + ": has no symbol " + name + " (not a bluelower backend library)");
  *out = reinterpret_cast<F>(sym);
}

}  // namespace

const BackendApi& load_backend(const std::vector<std::string>& libs, const std::string& backend) {
  static BackendApi api;
  if (api.backend_open) return api;
  for (const std::string& lib : libs)
    if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) throw Error("cannot load " + lib + ": " + dl_error());
  void* h = dlopen(backend.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) throw Error("cannot load " + backend + ": " + dl_error());
  BackendApi a;
  resolve(h, "bl_backend_open", backend, &a.backend_open);
  resolve(h, "bl_backend_close", backend, &a.backend_close);
  resolve(h, "bl_partition_load", backend, &a.partition_load);
  resolve(h, "bl_partition_release", backend, &a.partition_release);
  resolve(h, "bl_partition_bind_input", backend, &a.bind_input);
  resolve(h, "bl_partition_bind_output", backend, &a.bind_output);
  resolve(h, "bl_partition_run", backend, &a.run);
  api = a;
  return api;
}

}  // namespace bluelower
