// Test driver for single TIR kernels cross-compiled for another architecture (built and run
// under qemu-aarch64 by tests/test_a8_modes.py).
//
//   kernel_runner LIB FUNC ARG... [-- FUNC ARG...]...
//
// LIB: a shared library exported by tvm.compile(...).export_library (one or more PrimFuncs).
// Each ARG is DTYPE:SHAPE:PATH (e.g. int8:64x128:/tmp/xq.bin; DTYPE float32 float16 int32
// int8 uint8, SHAPE dimensions joined by 'x'): the raw little-endian bytes of the tensor,
// read into a 64-byte aligned buffer (TVM buffers assume that alignment). Each FUNC is called
// with its ARGs in order (destination-passing style: the outputs are ARGs too), then every
// ARG of that call is written back to PATH.out. The calls run in one process (one qemu
// start-up for many kernels); the first failure stops with "error: ..." and exit status 1.
//
// Link against libtvm_runtime.so (with --no-as-needed): a TVM library module looks up the
// runtime's parallel launcher and workspace allocator when it is loaded.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

namespace ffi = tvm::ffi;

namespace {
constexpr size_t kAlign = 64;

struct ViewAlloc {  // the tensor views a buffer the Arg owns
  void* data;
  void AllocData(DLTensor* t) { t->data = data; }
  void FreeData(DLTensor*) {}
};

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

struct Arg {
  DLDataType dtype;
  std::vector<int64_t> shape;
  std::string path;
  size_t nbytes = 0;
  std::unique_ptr<char, FreeDeleter> data;
};

DLDataType parse_dtype(const std::string& s) {
  if (s == "float32") return DLDataType{kDLFloat, 32, 1};
  if (s == "float16") return DLDataType{kDLFloat, 16, 1};
  if (s == "int32") return DLDataType{kDLInt, 32, 1};
  if (s == "int8") return DLDataType{kDLInt, 8, 1};
  if (s == "uint8") return DLDataType{kDLUInt, 8, 1};
  throw std::runtime_error("unknown dtype " + s);
}

Arg parse(const std::string& spec) {
  size_t a = spec.find(':');
  size_t b = a == std::string::npos ? a : spec.find(':', a + 1);
  if (a == std::string::npos || b == std::string::npos) throw std::runtime_error("bad argument " + spec);
  Arg arg;
  arg.dtype = parse_dtype(spec.substr(0, a));
  std::stringstream dims(spec.substr(a + 1, b - a - 1));
  std::string d;
  size_t n = 1;
  while (std::getline(dims, d, 'x')) {
    long long v = std::stoll(d);
    if (v <= 0) throw std::runtime_error("bad dimension in " + spec);
    arg.shape.push_back(v);
    n *= size_t(v);
  }
  if (arg.shape.empty()) throw std::runtime_error("no shape in " + spec);
  arg.path = spec.substr(b + 1);
  arg.nbytes = n * arg.dtype.bits / 8;
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, (arg.nbytes + kAlign - 1) / kAlign * kAlign) != 0) throw std::runtime_error("out of memory");
  arg.data.reset(static_cast<char*>(p));
  std::ifstream in(arg.path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + arg.path);
  in.read(arg.data.get(), std::streamsize(arg.nbytes));
  if (size_t(in.gcount()) != arg.nbytes) throw std::runtime_error(arg.path + " is too short");
  return arg;
}

void call(ffi::Module& lib, const std::string& name, std::vector<Arg>& args) {
  auto fn = lib->GetFunction(name);
  if (!fn.has_value()) throw std::runtime_error("no function " + name);
  std::vector<ffi::Tensor> tensors;
  tensors.reserve(args.size());
  for (auto& a : args) {
    tensors.push_back(ffi::Tensor::FromNDAlloc(ViewAlloc{a.data.get()}, ffi::ShapeView(a.shape.data(), a.shape.size()),
                                               a.dtype, DLDevice{kDLCPU, 0}));
  }
  std::vector<ffi::AnyView> views(tensors.begin(), tensors.end());
  ffi::Any ret;
  (*fn).CallPacked(views.data(), int32_t(views.size()), &ret);
  for (auto& a : args) {
    std::ofstream out(a.path + ".out", std::ios::binary);
    out.write(a.data.get(), std::streamsize(a.nbytes));
    if (!out) throw std::runtime_error("cannot write " + a.path + ".out");
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: kernel_runner LIB FUNC DTYPE:SHAPE:PATH... [-- FUNC DTYPE:SHAPE:PATH...]...\n");
    return 2;
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    int i = 2;
    while (i < argc) {
      std::string name = argv[i++];
      std::vector<Arg> args;
      for (; i < argc && std::strcmp(argv[i], "--") != 0; ++i) args.push_back(parse(argv[i]));
      if (i < argc) ++i;  // the "--"
      call(lib, name, args);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
