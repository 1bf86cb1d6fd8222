// The C ABI between vtp's Rust code and libtorch's c10d (docs/design.md §10).
//
// A process group is a c10d TCPStore (torchrun's agent store, or one served by rank 0) and a c10d
// backend (ProcessGroupGloo on CPU). Collectives run on tch tensors (`at::Tensor*`, tch's `C_tensor`)
// and return c10d Work handles. `vtp_gather_with_grad` is OpenCLIP's `gather_with_grad` as a
// torch::autograd::Function: forward all-gathers, backward all-reduces the incoming gradient and
// returns this rank's slice. `vtp_dist_new_reducer` is DDP's c10d::Reducer (gradient buckets
// all-reduced while the backward pass runs). Every function returns NULL on success or a malloc'd
// error message (C++ exceptions never cross the boundary); free it with `vtp_dist_free_error`.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int size;
  // The backend wrapped as a c10d::ProcessGroup, which the Reducer takes (made on first use).
  c10::intrusive_ptr<c10d::ProcessGroup> group;
};

char* error_message(const char* what) {
  char* out = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (out != nullptr) std::strcpy(out, what);
  return out;
}

template <typename F>
char* protect(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return error_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return error_message(e.what());
  } catch (...) {
    return error_message("unknown C++ exception");
  }
}

std::vector<at::Tensor> tensor_list(at::Tensor** tensors, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}

at::Tensor all_gather_cat(Group* g, const at::Tensor& input) {
  std::vector<at::Tensor> inputs{input.contiguous()};
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < g->size; ++r) outputs[0].push_back(at::empty_like(inputs[0]));
  g->backend->allgather(outputs, inputs)->wait();
  return at::cat(outputs[0], 0);
}

// OpenCLIP gather_with_grad (torch.distributed.nn.all_gather): rows of every rank concatenated in rank
// order; the gradient of this rank's rows is the sum over ranks of the incoming gradients of those rows.
struct GatherWithGrad : public torch::autograd::Function<GatherWithGrad> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input, int64_t group) {
    ctx->saved_data["group"] = group;
    ctx->saved_data["rows"] = input.size(0);
    return all_gather_cat(reinterpret_cast<Group*>(group), input);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    int64_t rows = ctx->saved_data["rows"].toInt();
    std::vector<at::Tensor> summed{grads[0].contiguous().clone()};
    g->backend->allreduce(summed)->wait();
    return {summed[0].narrow(0, g->rank * rows, rows), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void vtp_dist_free_error(char* error) { std::free(error); }

// Joins the group `rank` of `size` through the TCPStore at `host:port` (served here when
// `serve_store`, else a client of rank 0's or torchrun's store) with a Gloo backend on `hostname`'s
// interface (empty: Gloo's default device, which honours GLOO_SOCKET_IFNAME). `store_timeout_ms` bounds the rendezvous, `timeout_ms` every collective.
char* vtp_dist_new_gloo(const char* host, uint16_t port, int rank, int size, bool serve_store,
                        int64_t store_timeout_ms, int64_t timeout_ms, const char* hostname, Group** out) {
  return protect([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = serve_store;
    opts.numWorkers = size;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(store_timeout_ms);
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>("vtp/", tcp);
    // Gloo's full-mesh connection (the rendezvous) runs under the backend timeout: the join timeout
    // first, the collective timeout once every rank is connected.
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(store_timeout_ms));
    std::string name(hostname);
    options->devices.push_back(name.empty() ? c10d::ProcessGroupGloo::createDefaultDevice()
                                            : c10d::ProcessGroupGloo::createDeviceForHostname(name));
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
    backend->setTimeout(std::chrono::milliseconds(timeout_ms));
    *out = new Group{store, backend, rank, size};
  });
}

void vtp_dist_free_group(Group* g) { delete g; }

void vtp_dist_free_work(c10d::Work* w) { c10::intrusive_ptr<c10d::Work>::reclaim(w); }

// Waits for `work` (bounded by the backend timeout); its error, if any.
char* vtp_dist_wait(c10d::Work* w) {
  return protect([&] { w->wait(); });
}

// In-place sum of `tensors` over the group (asynchronous: wait on `out`).
char* vtp_dist_all_reduce_sum(Group* g, at::Tensor** tensors, size_t n, c10d::Work** out) {
  return protect([&] {
    auto list = tensor_list(tensors, n);
    *out = g->backend->allreduce(list).release();
  });
}

// In-place broadcast of `tensors` from `root` (asynchronous: wait on `out`).
char* vtp_dist_broadcast(Group* g, at::Tensor** tensors, size_t n, int root, c10d::Work** out) {
  return protect([&] {
    auto list = tensor_list(tensors, n);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    *out = g->backend->broadcast(list, opts).release();
  });
}

// Every rank's `input` concatenated along dim 0 in rank order (no gradient), into a new tensor.
char* vtp_dist_all_gather(Group* g, at::Tensor* input, at::Tensor** out) {
  return protect([&] { *out = new at::Tensor(all_gather_cat(g, *input)); });
}

// As `vtp_dist_all_gather`, differentiable (OpenCLIP gather_with_grad).
char* vtp_dist_gather_with_grad(Group* g, at::Tensor* input, at::Tensor** out) {
  return protect([&] { *out = new at::Tensor(GatherWithGrad::apply(*input, reinterpret_cast<int64_t>(g))); });
}

char* vtp_dist_barrier(Group* g) {
  return protect([&] { g->backend->barrier()->wait(); });
}

// DDP's gradient Reducer (c10d::Reducer, the code torch.nn.parallel.DistributedDataParallel runs): the
// gradients of `params` are bucketed as DDP buckets them (parameters in reverse order, a first bucket of
// 1 MiB, then `bucket_bytes`), each bucket's all-reduce starts as soon as autograd has produced its
// gradients, and once the backward pass ends every gradient holds its mean over the ranks. Parameters a
// step does not use are found from the loss (`find_unused_parameters`) and left without a gradient.
char* vtp_dist_new_reducer(Group* g, at::Tensor** params, size_t n, int64_t bucket_bytes, c10d::Reducer** out) {
  return protect([&] {
    if (!g->group) {
      g->group = c10::make_intrusive<c10d::ProcessGroup>(g->store, g->rank, g->size);
      g->group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, g->backend);
      g->group->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    }
    auto list = tensor_list(params, n);
    const int64_t first_bucket = 1024 * 1024;
    std::vector<size_t> limits{static_cast<size_t>(first_bucket), static_cast<size_t>(bucket_bytes)};
    std::vector<bool> sparse(n, false);
    auto buckets = std::get<0>(c10d::compute_bucket_assignment_by_size(list, limits, sparse));
    std::reverse(buckets.begin(), buckets.end());
    *out = new c10d::Reducer(list, buckets, g->group, sparse, bucket_bytes, /*find_unused_parameters=*/true,
                             /*gradient_as_bucket_view=*/false, {}, first_bucket,
                             /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
                             {first_bucket, bucket_bytes});
  });
}

// Frees `r` (its destructor may throw: caught, as everywhere).
void vtp_dist_free_reducer(c10d::Reducer* r) { vtp_dist_free_error(protect([&] { delete r; })); }

// Arms `r` for the backward pass of `loss` (DDP's forward does this): call just before it.
char* vtp_dist_prepare_for_backward(c10d::Reducer* r, at::Tensor* loss) {
  return protect([&] { r->prepare_for_backward({*loss}); });
}

// `loss.backward()`, during which `r` all-reduces the gradients (its errors, e.g. a lost rank, included).
char* vtp_dist_backward(at::Tensor* loss) {
  return protect([&] { loss->backward(); });
}

}  // extern "C"
