// The "neuron" APU backend: MediaTek Neuron Runtime (NeuroPilot) behind apu_backend.h.
//
// Compiled only when CMake finds the SDK's neuron/api/RuntimeAPI.h (NEURON_SDK_DIR; defines
// BLUELOWER_HAVE_NEURON). Only the header's types are used at build time: the functions
// are resolved at run time with dlopen("libneuron_runtime.so") + dlsym, as MediaTek's own
// samples do, so the binary builds without the vendor library and fails with one clear
// line on a machine without it. NOT RUN HERE: no SDK and no APU are reachable from the
// build machine; the tests only compile this file against a minimal stand-in header
// (tests/data/fake_neuron_sdk). The signatures follow MediaTek's public Neuron Runtime API
// and must be checked against the real SDK headers. Mapping: docs/native-runtime.md.
#ifdef BLUELOWER_HAVE_NEURON

#include <neuron/api/RuntimeAPI.h>

#include <dlfcn.h>

#include <cstdio>
#include <string>

#include "apu_neuron.h"

namespace {

void set_err(char* err, const std::string& m) {
  if (err) std::snprintf(err, BL_APU_ERR_LEN, "%s", m.c_str());
}

size_t nbytes(const bl_buffer& b) {
  size_t n = 1;
  for (int i = 0; i < b.ndim; ++i) n *= size_t(b.shape[i]);
  size_t item = b.dtype == BL_F32 || b.dtype == BL_I32 ? 4 : b.dtype == BL_I64 ? 8 : b.dtype == BL_F16 ? 2 : 1;
  return n * item;
}

// The Neuron Runtime functions this backend calls, resolved from libneuron_runtime.so.
struct NeuronApi {
  void* handle = nullptr;
  decltype(&NeuronRuntime_create) create = nullptr;
  decltype(&NeuronRuntime_loadNetworkFromFile) load_file = nullptr;
  decltype(&NeuronRuntime_setInput) set_input = nullptr;
  decltype(&NeuronRuntime_setOutput) set_output = nullptr;
  decltype(&NeuronRuntime_inference) inference = nullptr;
  decltype(&NeuronRuntime_release) release = nullptr;
};

NeuronApi g_api;

template <typename F>
bool resolve(void* handle, const char* name, F* out, std::string* missing) {
  *out = reinterpret_cast<F>(dlsym(handle, name));
  if (!*out) *missing = name;
  return *out != nullptr;
}

}  // namespace

// One partition = one compiled network file <bundle>/apu/<name>.dla (weights inside).
struct bl_neuron_partition {
  void* runtime = nullptr;  // NeuronRuntime instance
  std::string name;
};

extern "C" int bl_neuron_open(char* err) {
  if (g_api.handle) return 0;
  const char* lib = "libneuron_runtime.so";
  void* h = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* why = dlerror();
    set_err(err, std::string("cannot load ") + lib + " (" + (why ? why : "dlopen failed") +
                     "): the neuron backend needs a MediaTek device with the Neuron runtime");
    return 1;
  }
  NeuronApi api;
  api.handle = h;
  std::string missing;
  if (!resolve(h, "NeuronRuntime_create", &api.create, &missing) ||
      !resolve(h, "NeuronRuntime_loadNetworkFromFile", &api.load_file, &missing) ||
      !resolve(h, "NeuronRuntime_setInput", &api.set_input, &missing) ||
      !resolve(h, "NeuronRuntime_setOutput", &api.set_output, &missing) ||
      !resolve(h, "NeuronRuntime_inference", &api.inference, &missing) ||
      !resolve(h, "NeuronRuntime_release", &api.release, &missing)) {
    dlclose(h);
    set_err(err, std::string(lib) + " has no symbol " + missing);
    return 1;
  }
  g_api = api;
  return 0;
}

extern "C" int bl_neuron_partition_load(const char* bundle_dir, const char* name, bl_neuron_partition** out,
                                        char* err) {
  *out = nullptr;
  if (bl_neuron_open(err) != 0) return 1;
  auto* p = new bl_neuron_partition();
  p->name = name;
  EnvOptions env = {};
  env.deviceKind = kEnvOptHardware;  // run on the APU
  if (g_api.create(&env, &p->runtime) != NEURONRUNTIME_NO_ERROR) {
    delete p;
    set_err(err, "NeuronRuntime_create failed");
    return 1;
  }
  std::string dla = std::string(bundle_dir) + "/apu/" + name + ".dla";
  if (g_api.load_file(p->runtime, dla.c_str()) != NEURONRUNTIME_NO_ERROR) {
    g_api.release(p->runtime);
    delete p;
    set_err(err, "cannot load " + dla + " (NeuronRuntime_loadNetworkFromFile failed)");
    return 1;
  }
  *out = p;
  return 0;
}

extern "C" int bl_neuron_bind_input(bl_neuron_partition* p, int index, const bl_buffer* b, char* err) {
  BufferAttribute attr = {-1};  // plain host memory (an ION/dma-buf fd would avoid a copy)
  if (g_api.set_input(p->runtime, uint64_t(index), b->data, nbytes(*b), attr) != NEURONRUNTIME_NO_ERROR) {
    set_err(err, p->name + ": NeuronRuntime_setInput failed for input " + std::to_string(index));
    return 1;
  }
  return 0;
}

extern "C" int bl_neuron_bind_output(bl_neuron_partition* p, int index, const bl_buffer* b, char* err) {
  BufferAttribute attr = {-1};
  if (g_api.set_output(p->runtime, uint64_t(index), b->data, nbytes(*b), attr) != NEURONRUNTIME_NO_ERROR) {
    set_err(err, p->name + ": NeuronRuntime_setOutput failed for output " + std::to_string(index));
    return 1;
  }
  return 0;
}

extern "C" int bl_neuron_run(bl_neuron_partition* p, char* err) {
  if (g_api.inference(p->runtime) != NEURONRUNTIME_NO_ERROR) {
    set_err(err, p->name + ": NeuronRuntime_inference failed");
    return 1;
  }
  return 0;
}

extern "C" void bl_neuron_partition_release(bl_neuron_partition* p) {
  if (p && p->runtime && g_api.release) g_api.release(p->runtime);
  delete p;
}

#endif  // BLUELOWER_HAVE_NEURON
