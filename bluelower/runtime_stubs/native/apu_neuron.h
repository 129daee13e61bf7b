// The "neuron" APU backend's entry points (apu_neuron.cc), called by the backend
// dispatcher in apu_sim.cc only when the runtime is built with BLUELOWER_HAVE_NEURON
// (CMake found the Neuron SDK headers). Same contract as apu_backend.h: 0 on success,
// otherwise non-zero and one line in `err`.
#ifndef BLUELOWER_APU_NEURON_H_
#define BLUELOWER_APU_NEURON_H_

#include "apu_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bl_neuron_partition bl_neuron_partition;

/* dlopen() libneuron_runtime.so and resolve the Neuron Runtime functions (once). */
int bl_neuron_open(char* err);
/* <bundle_dir>/apu/<name>.dla: NeuronRuntime_create + NeuronRuntime_loadNetworkFromFile. */
int bl_neuron_partition_load(const char* bundle_dir, const char* name, bl_neuron_partition** out, char* err);
int bl_neuron_bind_input(bl_neuron_partition* p, int index, const bl_buffer* b, char* err);
int bl_neuron_bind_output(bl_neuron_partition* p, int index, const bl_buffer* b, char* err);
int bl_neuron_run(bl_neuron_partition* p, char* err);
void bl_neuron_partition_release(bl_neuron_partition* p);

#ifdef __cplusplus
}
#endif

#endif  // BLUELOWER_APU_NEURON_H_
