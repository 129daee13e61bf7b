// The "neuron" APU backend: MediaTek Neuron Runtime (NeuroPilot) behind apu_backend.h.
//
// Compiled only when a NeuroPilot SDK is found (CMakeLists.txt: NEUROPILOT_SDK, defines
// BLUELOWER_HAVE_NEURON). NOT BUILT OR TESTED HERE: no SDK and no APU are reachable from
// the build machine. The Neuron Runtime calls below follow MediaTek's public Neuron
// Runtime API (neuron/api/RuntimeAPI.h) and must be checked against the SDK's headers.
// See docs/native-runtime.md, "APU backend", for the mapping.
#ifdef BLUELOWER_HAVE_NEURON

#include <neuron/api/RuntimeAPI.h>

#include <cstdio>
#include <string>
#include <vector>

#include "apu_backend.h"

namespace {
void set_err(char* err, const std::string& m) { if (err) std::snprintf(err, BL_APU_ERR_LEN, "%s", m.c_str()); }
size_t nbytes(const bl_buffer& b) {
  size_t n = 1;
  for (int i = 0; i < b.ndim; ++i) n *= size_t(b.shape[i]);
  size_t item = b.dtype == BL_F32 || b.dtype == BL_I32 ? 4 : b.dtype == BL_I64 ? 8 : b.dtype == BL_F16 ? 2 : 1;
  return n * item;
}
}  // namespace

// One partition = one compiled network file <bundle>/apu/<name>.dla (weights inside).
struct bl_neuron_partition {
  void* runtime = nullptr;  // NeuronRuntime instance
  std::string name;
};

extern "C" int bl_neuron_partition_load(const char* bundle_dir, const char* name, bl_neuron_partition** out,
                                        char* err) {
  auto* p = new bl_neuron_partition();
  p->name = name;
  EnvOptions env = {};
  env.deviceKind = kEnvOptHardware;  // run on the APU
  if (NeuronRuntime_create(&env, &p->runtime) != NEURONRUNTIME_NO_ERROR) {
    delete p;
    set_err(err, "NeuronRuntime_create failed");
    return 1;
  }
  std::string dla = std::string(bundle_dir) + "/apu/" + name + ".dla";
  if (NeuronRuntime_loadNetworkFromFile(p->runtime, dla.c_str()) != NEURONRUNTIME_NO_ERROR) {
    NeuronRuntime_release(p->runtime);
    delete p;
    set_err(err, "cannot load " + dla);
    return 1;
  }
  *out = p;
  return 0;
}

extern "C" int bl_neuron_bind_input(bl_neuron_partition* p, int index, const bl_buffer* b, char* err) {
  BufferAttribute attr = {-1};  // plain host memory (an ION/dma-buf fd would avoid a copy)
  if (NeuronRuntime_setInput(p->runtime, uint64_t(index), b->data, nbytes(*b), attr) != NEURONRUNTIME_NO_ERROR) {
    set_err(err, p->name + ": NeuronRuntime_setInput failed for input " + std::to_string(index));
    return 1;
  }
  return 0;
}

extern "C" int bl_neuron_bind_output(bl_neuron_partition* p, int index, const bl_buffer* b, char* err) {
  BufferAttribute attr = {-1};
  if (NeuronRuntime_setOutput(p->runtime, uint64_t(index), b->data, nbytes(*b), attr) != NEURONRUNTIME_NO_ERROR) {
    set_err(err, p->name + ": NeuronRuntime_setOutput failed for output " + std::to_string(index));
    return 1;
  }
  return 0;
}

extern "C" int bl_neuron_run(bl_neuron_partition* p, char* err) {
  if (NeuronRuntime_inference(p->runtime) != NEURONRUNTIME_NO_ERROR) {
    set_err(err, p->name + ": NeuronRuntime_inference failed");
    return 1;
  }
  return 0;
}

extern "C" void bl_neuron_partition_release(bl_neuron_partition* p) {
  if (p) NeuronRuntime_release(p->runtime);
  delete p;
}

#endif  // BLUELOWER_HAVE_NEURON
