/* The accelerator backend interface of bluelower-run: load a partition, bind buffers, run.
 *
 * A "partition" is one compiled function of the bundle (encode_image, embed, prefill,
 * decode, or an APU sub-graph of one of them). The runtime's generation loop only talks
 * to this interface, so the same loop drives
 *   - "sim"    (apu_sim.cc): the CPU-compiled functions of model.so through TVM's Relax VM;
 *   - "neuron" (apu_neuron.cc, built only when a MediaTek NeuroPilot SDK is found): the
 *              APU partitions compiled to .dla by MediaTek's compiler, via the Neuron
 *              runtime (see docs/native-runtime.md for the mapping).
 *
 * Buffers are host memory owned by the caller, 64-byte aligned, C-contiguous. A buffer
 * may be bound as both an input and an output of the same run (the KV cache): a backend
 * must then behave as if all inputs were read before any output is written.
 * Every function returns 0 on success, or non-zero and writes one line into `err`.
 */
#ifndef BLUELOWER_APU_BACKEND_H_
#define BLUELOWER_APU_BACKEND_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BL_APU_ERR_LEN 512

typedef enum { BL_F32 = 0, BL_I64 = 1, BL_I32 = 2, BL_F16 = 3, BL_I8 = 4, BL_U8 = 5 } bl_dtype;

typedef struct {
  void* data;           /* host pointer, 64-byte aligned */
  bl_dtype dtype;
  int32_t ndim;
  int64_t shape[8];
} bl_buffer;

/* Supplies weights to a backend that needs them at load time (sim); the pointer stays
 * valid for the backend's lifetime. Returns 0 if found. */
typedef int (*bl_param_lookup)(void* ctx, const char* name, bl_buffer* out);

typedef struct {
  const char* bundle_dir;    /* where model.so / *.dla live */
  const char* library;       /* the compiled library inside bundle_dir, e.g. "model.so" */
  bl_param_lookup params;    /* weight lookup */
  void* params_ctx;
  int num_threads;           /* 0: backend default */
} bl_backend_config;

typedef struct bl_backend bl_backend;
typedef struct bl_partition bl_partition;

/* Backend by name ("sim", "neuron"); fails with a clear message if not compiled in. */
int bl_backend_open(const char* kind, const bl_backend_config* cfg, bl_backend** out, char* err);
void bl_backend_close(bl_backend* b);

/* Load partition `name`; its weights are `param_names` (bound once, here). */
int bl_partition_load(bl_backend* b, const char* name, const char* const* param_names, int num_params,
                      bl_partition** out, char* err);
void bl_partition_release(bl_partition* p);

/* Bind the i-th input / output. Bindings persist across runs until re-bound. */
int bl_partition_bind_input(bl_partition* p, int index, const bl_buffer* buf, char* err);
int bl_partition_bind_output(bl_partition* p, int index, const bl_buffer* buf, char* err);

/* Run synchronously: every bound output holds the result on return. */
int bl_partition_run(bl_partition* p, char* err);

#ifdef __cplusplus
}
#endif

#endif /* BLUELOWER_APU_BACKEND_H_ */
