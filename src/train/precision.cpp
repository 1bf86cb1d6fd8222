// The C ABI of vtp's mixed precision (src/train/precision.rs): libtorch's autocast regions, as
// `torch.autocast(device_type, dtype=torch.bfloat16)` enters and leaves them, and the TF32 switch of
// `torch.backends.cuda.matmul.allow_tf32` / `torch.backends.cudnn.allow_tf32`. Each returns false when
// libtorch raised (no C++ exception crosses the boundary).
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>

namespace {

at::DeviceType device_type(bool cuda) { return cuda ? at::kCUDA : at::kCPU; }

template <typename F>
bool guarded(F&& f) {
  try {
    f();
    return true;
  } catch (...) {
    return false;
  }
}

}  // namespace

extern "C" {

// Enters a bf16 autocast region on the CPU or CUDA, writing the state to restore on exit.
bool vtp_autocast_enter(bool cuda, bool* was_enabled, int* was_dtype) {
  return guarded([&] {
    auto t = device_type(cuda);
    *was_enabled = at::autocast::is_autocast_enabled(t);
    *was_dtype = static_cast<int>(at::autocast::get_autocast_dtype(t));
    at::autocast::set_autocast_enabled(t, true);
    at::autocast::set_autocast_dtype(t, at::kBFloat16);
    at::autocast::increment_nesting();
  });
}

// Leaves the region `vtp_autocast_enter` opened; the outermost exit frees the cast-weight cache.
bool vtp_autocast_exit(bool cuda, bool was_enabled, int was_dtype) {
  return guarded([&] {
    auto t = device_type(cuda);
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(t, was_enabled);
    at::autocast::set_autocast_dtype(t, static_cast<at::ScalarType>(was_dtype));
  });
}

// Lets CUDA float32 matmuls and convolutions use TF32 tensor cores (PyTorch's two allow_tf32 flags).
bool vtp_set_tf32(bool allow) {
  return guarded([&] {
    at::globalContext().setAllowTF32CuBLAS(allow);
    at::globalContext().setAllowTF32CuDNN(allow);
  });
}

// Whether an autocast region is open on the device (for tests).
bool vtp_autocast_enabled(bool cuda) { return at::autocast::is_autocast_enabled(device_type(cuda)); }

}  // extern "C"
