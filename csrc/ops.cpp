// The fastresnet_ext operator library: schemas of the four tier-A primitives (semantics: fastresnet/reference.py)
// and the Python module fastresnet._C, whose import loads the library. Kernels register per dispatch key in
// bn_cpu.cpp (CPU) and bn_cuda.cpp (CUDA, only in builds with CUDA).
//
// Layout rule of every output tensor: channels_last if x (a for add_stats) is channels_last and not also
// NCHW-contiguous, else contiguous. Statistics are float32 ([C]); float64 for float64 inputs.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastresnet_ext, m) {
  // x [N, C, H, W] -> (mean [C], biased var [C]); deterministic per-tile partials merged with Chan's formula.
  m.def("batch_stats(Tensor x) -> (Tensor mean, Tensor var)");
  // a = max(x·scale + shift, 0) rounded once to out_dtype; scale/shift [C] in x's statistics dtype.
  m.def("bn_relu(Tensor x, Tensor scale, Tensor shift, ScalarType out_dtype) -> Tensor");
  // (dx, Σdz, Σdz·x̂) of a = relu(BN(x)) given dy = dL/da; dz = dy·[x·scale + shift > 0]; dx in x's dtype,
  // training: dx = scale·(dz − Σdz/M − x̂·Σdz·x̂/M), eval: dx = scale·dz; plus dres if given.
  m.def("bn_relu_backward(Tensor dy, Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, bool training, "
        "Tensor? dres=None) -> (Tensor dx, Tensor sum_dz, Tensor sum_dz_xhat)");
  // y = a + b (fp32 add, rounded once to a's dtype) and the batch statistics of the rounded y.
  m.def("add_stats(Tensor a, Tensor b) -> (Tensor y, Tensor mean, Tensor var)");
}

#define FASTRESNET_STR_(x) #x
#define FASTRESNET_STR(x) FASTRESNET_STR_(x)

namespace {

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "fastresnet's C++/CUDA kernels: importing it registers torch.ops.fastresnet_ext.*", -1,
                          nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef FASTRESNET_WITH_CUDA
  const long with_cuda = 1;
  const char* cuda_archs = FASTRESNET_STR(FASTRESNET_CUDA_ARCHS);
#else
  const long with_cuda = 0;
  const char* cuda_archs = "";
#endif
  // with_cuda: whether the CUDA kernels were compiled in (else only the CPU kernels are registered).
  // cuda_archs: their compute capabilities as setup.py passed them ("80_90"; "" without CUDA).
  if (PyModule_AddObject(mod, "with_cuda", PyBool_FromLong(with_cuda)) != 0 ||
      PyModule_AddStringConstant(mod, "cuda_archs", cuda_archs) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
