// The "sim" APU backend: every partition is a function of the CPU-compiled model.so, run
// through TVM's Relax VM (libtvm_runtime + libtvm_ffi). Inputs are wrapped without a copy;
// outputs are copied from the VM's result into the bound buffers.
//
// This file also holds the backend dispatcher of apu_backend.h: `bl_backend_open("neuron")`
// routes every later call to apu_neuron.cc when the runtime is built with the Neuron SDK
// (BLUELOWER_HAVE_NEURON), and is a one-line error otherwise.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <optional>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "apu_backend.h"
#include "apu_neuron.h"

namespace ffi = tvm::ffi;

namespace {

// A non-owning allocator: the tensor views caller memory.
struct ViewAlloc {
  void* data;
  void AllocData(DLTensor* t) { t->data = data; }
  void FreeData(DLTensor*) {}
};

DLDataType to_dl(bl_dtype d) {
  switch (d) {
    case BL_F32: return DLDataType{kDLFloat, 32, 1};
    case BL_I64: return DLDataType{kDLInt, 64, 1};
    case BL_I32: return DLDataType{kDLInt, 32, 1};
    case BL_F16: return DLDataType{kDLFloat, 16, 1};
    case BL_I8: return DLDataType{kDLInt, 8, 1};
    case BL_U8: return DLDataType{kDLUInt, 8, 1};
  }
  return DLDataType{kDLFloat, 32, 1};
}

size_t nbytes(const bl_buffer& b) {
  size_t n = 1;
  for (int i = 0; i < b.ndim; ++i) n *= size_t(b.shape[i]);
  return n * size_t((to_dl(b.dtype).bits + 7) / 8);
}

std::string shape_str(const int64_t* s, int n) {
  std::string out = "[";
  for (int i = 0; i < n; ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

ffi::Tensor view(const bl_buffer& b) {
  std::vector<int64_t> shape(b.shape, b.shape + b.ndim);
  return ffi::Tensor::FromNDAlloc(ViewAlloc{b.data}, ffi::ShapeView(shape.data(), shape.size()), to_dl(b.dtype),
                                  DLDevice{kDLCPU, 0});
}

void set_err(char* err, const std::string& msg) {
  if (!err) return;
  std::string one = msg;
  for (auto& c : one)
    if (c == '\n' || c == '\r') c = ' ';
  std::snprintf(err, BL_APU_ERR_LEN, "%s", one.c_str());
}

std::string first_line(const std::exception& e) {
  std::string s = e.what();
  size_t nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

}  // namespace

struct bl_backend {
  std::string kind;        // "sim" or "neuron"
  std::string bundle_dir;
  std::optional<ffi::Module> lib, vm;
  bl_param_lookup params;
  void* params_ctx;
};

struct bl_partition {
  std::string name;
  ffi::Function fn;
  std::vector<ffi::Tensor> params;
  std::vector<bl_buffer> inputs, outputs;
  std::vector<bool> in_bound, out_bound;
  bl_neuron_partition* neuron = nullptr;  // set for the neuron backend
};

#ifdef BLUELOWER_HAVE_NEURON
static const char* kBackends = "sim, neuron";
#else
static const char* kBackends = "sim";
#endif

extern "C" int bl_backend_open(const char* kind, const bl_backend_config* cfg, bl_backend** out, char* err) {
  *out = nullptr;
  if (std::string(kind) == "neuron") {
#ifdef BLUELOWER_HAVE_NEURON
    if (bl_neuron_open(err) != 0) return 1;
    auto* b = new bl_backend();
    b->kind = "neuron";
    b->bundle_dir = cfg->bundle_dir;
    b->params = cfg->params;
    b->params_ctx = cfg->params_ctx;
    *out = b;
    return 0;
#else
    set_err(err, "APU backend 'neuron' is not compiled into this runtime (built without the Neuron SDK headers; "
                 "rebuild with cmake -DNEURON_SDK_DIR=<sdk>); available: " + std::string(kBackends));
    return 1;
#endif
  }
  if (std::string(kind) != "sim") {
    set_err(err, std::string("unknown APU backend '") + kind + "' (available: " + kBackends + ")");
    return 1;
  }
  std::string path = std::string(cfg->bundle_dir) + "/" + cfg->library;
  try {
    auto* b = new bl_backend();
    b->kind = "sim";
    b->bundle_dir = cfg->bundle_dir;
    b->params = cfg->params;
    b->params_ctx = cfg->params_ctx;
    try {
      b->lib = ffi::Module::LoadFromFile(path);
      auto load = (*b->lib)->GetFunction("vm_load_executable");
      if (!load.has_value()) throw std::runtime_error(path + " is not a Relax VM executable");
      b->vm = (*load)().cast<ffi::Module>();
      auto init = (*b->vm)->GetFunction("vm_initialization");
      if (!init.has_value()) throw std::runtime_error("VM has no vm_initialization");
      // device (CPU, 0), allocator kind 2 (pooled), for the device and the host
      (*init)(int(kDLCPU), 0, 2, int(kDLCPU), 0, 2);
    } catch (...) {
      delete b;
      throw;
    }
    *out = b;
    return 0;
  } catch (const std::exception& e) {
    set_err(err, "cannot load " + path + ": " + first_line(e));
    return 1;
  }
}

extern "C" void bl_backend_close(bl_backend* b) { delete b; }

extern "C" int bl_partition_load(bl_backend* b, const char* name, const char* const* param_names, int num_params,
                                 bl_partition** out, char* err) {
  *out = nullptr;
  if (b->kind == "neuron") {
#ifdef BLUELOWER_HAVE_NEURON
    (void)param_names;  // the weights are compiled into the .dla
    (void)num_params;
    auto* p = new bl_partition();
    p->name = name;
    if (bl_neuron_partition_load(b->bundle_dir.c_str(), name, &p->neuron, err) != 0) {
      delete p;
      return 1;
    }
    *out = p;
    return 0;
#endif
  }
  try {
    auto fn = (*b->vm)->GetFunction(name);
    if (!fn.has_value()) {
      set_err(err, std::string("model.so has no function '") + name + "'");
      return 1;
    }
    auto* p = new bl_partition();
    p->name = name;
    p->fn = *fn;
    for (int i = 0; i < num_params; ++i) {
      bl_buffer buf;
      if (b->params(b->params_ctx, param_names[i], &buf) != 0) {
        delete p;
        set_err(err, std::string("weight '") + param_names[i] + "' of " + name + " is not in params.safetensors");
        return 1;
      }
      p->params.push_back(view(buf));
    }
    *out = p;
    return 0;
  } catch (const std::exception& e) {
    set_err(err, std::string("cannot load partition ") + name + ": " + first_line(e));
    return 1;
  }
}

extern "C" void bl_partition_release(bl_partition* p) {
#ifdef BLUELOWER_HAVE_NEURON
  if (p && p->neuron) bl_neuron_partition_release(p->neuron);
#endif
  bool sim = p && !p->neuron;
  delete p;
  // The VM's pooled allocator keeps every block a call freed for the next call: a released
  // partition (the image encoder, once the image is encoded) returns its blocks to the system.
  if (sim) {
    try {
      if (auto clear = ffi::Function::GetGlobal("vm.builtin.memory_manager.clear")) (*clear)();
    } catch (const std::exception&) {
    }
  }
}

static int bind(std::vector<bl_buffer>& v, std::vector<bool>& bound, int index, const bl_buffer* buf) {
  if (index < 0 || index > 64) return 1;
  if (size_t(index) >= v.size()) { v.resize(size_t(index) + 1); bound.resize(size_t(index) + 1, false); }
  v[size_t(index)] = *buf;
  bound[size_t(index)] = true;
  return 0;
}

extern "C" int bl_partition_bind_input(bl_partition* p, int index, const bl_buffer* buf, char* err) {
  if (bind(p->inputs, p->in_bound, index, buf)) { set_err(err, "bad input index"); return 1; }
#ifdef BLUELOWER_HAVE_NEURON
  if (p->neuron) return bl_neuron_bind_input(p->neuron, index, buf, err);
#endif
  return 0;
}

extern "C" int bl_partition_bind_output(bl_partition* p, int index, const bl_buffer* buf, char* err) {
  if (bind(p->outputs, p->out_bound, index, buf)) { set_err(err, "bad output index"); return 1; }
#ifdef BLUELOWER_HAVE_NEURON
  if (p->neuron) return bl_neuron_bind_output(p->neuron, index, buf, err);
#endif
  return 0;
}

extern "C" int bl_partition_run(bl_partition* p, char* err) {
#ifdef BLUELOWER_HAVE_NEURON
  if (p->neuron) return bl_neuron_run(p->neuron, err);
#endif
  try {
    for (size_t i = 0; i < p->in_bound.size(); ++i)
      if (!p->in_bound[i]) { set_err(err, p->name + ": input " + std::to_string(i) + " is not bound"); return 1; }
    std::vector<ffi::Tensor> ins;
    for (auto& b : p->inputs) ins.push_back(view(b));
    std::vector<ffi::AnyView> args;
    for (auto& t : ins) args.emplace_back(t);
    for (auto& t : p->params) args.emplace_back(t);
    ffi::Any ret;
    p->fn.CallPacked(args.data(), int32_t(args.size()), &ret);
    std::vector<ffi::Tensor> results;
    if (auto t = ret.as<ffi::Tensor>()) {
      results.push_back(*t);
    } else if (auto arr = ret.as<ffi::Array<ffi::Any>>()) {
      for (const ffi::Any& a : *arr) {
        auto t2 = a.as<ffi::Tensor>();
        if (!t2) { set_err(err, p->name + ": result tuple holds a non-tensor"); return 1; }
        results.push_back(*t2);
      }
    } else {
      set_err(err, p->name + ": unexpected result type " + ret.GetTypeKey());
      return 1;
    }
    if (results.size() != p->outputs.size()) {
      set_err(err, p->name + ": returned " + std::to_string(results.size()) + " outputs, " +
                       std::to_string(p->outputs.size()) + " bound");
      return 1;
    }
    // Inputs were all consumed by the call; now write outputs (may alias inputs).
    for (size_t i = 0; i < results.size(); ++i) {
      const DLTensor* t = results[i].GetDLTensorPtr();
      const bl_buffer& o = p->outputs[i];
      bool same = t->ndim == o.ndim;
      for (int d = 0; same && d < o.ndim; ++d) same = t->shape[d] == o.shape[d];
      DLDataType want = to_dl(o.dtype);
      same = same && t->dtype.code == want.code && t->dtype.bits == want.bits && t->dtype.lanes == 1;
      if (!same) {
        set_err(err, p->name + ": output " + std::to_string(i) + " has shape " +
                         shape_str(t->shape, t->ndim) + ", expected " + shape_str(o.shape, o.ndim));
        return 1;
      }
      if (t->device.device_type != kDLCPU || !ffi::IsContiguous(*t)) {
        set_err(err, p->name + ": output " + std::to_string(i) + " is not a contiguous CPU tensor");
        return 1;
      }
      const char* src = static_cast<const char*>(t->data) + t->byte_offset;
      if (src != o.data) std::memmove(o.data, src, nbytes(o));
    }
    return 0;
  } catch (const std::exception& e) {
    set_err(err, p->name + " failed: " + first_line(e));
    return 1;
  }
}
