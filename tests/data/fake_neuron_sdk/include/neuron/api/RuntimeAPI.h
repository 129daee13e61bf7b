/* Test stand-in for the NeuroPilot SDK's neuron/api/RuntimeAPI.h (see ../../../README.md).
 * Declarations only, following MediaTek's public Neuron Runtime API documentation. */
#ifndef FAKE_NEURON_RUNTIME_API_H_
#define FAKE_NEURON_RUNTIME_API_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { NEURONRUNTIME_NO_ERROR = 0, NEURONRUNTIME_BAD_DATA = 2, NEURONRUNTIME_RUNTIME_ERROR = 7 };

typedef enum { kEnvOptNullDevice = 0, kEnvOptCModelDevice = 1, kEnvOptHardware = 2 } EnvDeviceKind;

typedef struct {
  uint32_t deviceKind;
  uint8_t MDLACoreOption;
  uint8_t CPUThreadNum;
  uint8_t suppressInputConversion;
  uint8_t suppressOutputConversion;
} EnvOptions;

typedef struct {
  int ionFd;
} BufferAttribute;

int NeuronRuntime_create(const EnvOptions* options, void** runtime);
int NeuronRuntime_loadNetworkFromFile(void* runtime, const char* pathToDlaFile);
int NeuronRuntime_setInput(void* runtime, uint64_t handle, const void* buffer, size_t length, BufferAttribute attr);
int NeuronRuntime_setOutput(void* runtime, uint64_t handle, void* buffer, size_t length, BufferAttribute attr);
int NeuronRuntime_inference(void* runtime);
void NeuronRuntime_release(void* runtime);

#ifdef __cplusplus
}
#endif

#endif
