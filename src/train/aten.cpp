// The C ABI of the ATen calls tch does not bind. Mixed precision (src/train/precision.rs): libtorch's
// autocast regions, as `torch.autocast(device_type, dtype=torch.bfloat16)` enters and leaves them, and
// the TF32 switch of `torch.backends.cuda.matmul.allow_tf32` / `torch.backends.cudnn.allow_tf32`. The
// fused AdamW update (src/train/optim.rs): `torch._fused_adamw_`, the kernel of
// `torch.optim.AdamW(fused=True)`. Each returns false when libtorch raised (no C++ exception crosses
// the boundary).
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/_fused_adamw.h>

#include <vector>

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

// One `_fused_adamw_` call over `n` parameters that share lr and weight decay (torch.optim.AdamW's
// `_fused_adamw` for one param group): every tensor's update in one pass over it; `steps` are the
// float32 step counters after this step's increment.
bool vtp_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                     at::Tensor** steps, size_t n, double lr, double beta1, double beta2, double weight_decay,
                     double eps) {
  auto list = [n](at::Tensor** tensors) {
    std::vector<at::Tensor> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
    return out;
  };
  return guarded([&] {
    at::_fused_adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), {}, list(steps), lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

// Whether an autocast region is open on the device (for tests).
bool vtp_autocast_enabled(bool cuda) { return at::autocast::is_autocast_enabled(device_type(cuda)); }

}  // extern "C"
