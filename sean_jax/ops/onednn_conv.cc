// 2D convolutions (NHWC activations, HWIO kernel, stride 1, symmetric zero padding,
// float32) on oneDNN, as XLA FFI handlers: forward, input gradient, kernel gradient.
//
// XLA:CPU's convolutions (YNNPACK/Eigen) reach 25-110 GFLOP/s on the encoder's shapes
// and its kernel gradients are the slowest; oneDNN's JIT kernels run the same shapes
// near the machine's FMA peak (docs/performance.md). Built by sean_jax/ops/onednn.py.
//
// oneDNN is reached through its C API, declared below rather than included: the
// `onednn-cpu-gomp` wheel ships the library without headers. The C API and its
// enumerations are ABI-stable across oneDNN 3.x; the values were read from oneDNN's
// dnnl_types.h and are checked at run time by the tests (results against lax).

#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"

extern "C" {
typedef int dnnl_status_t;
typedef int64_t dnnl_dims_t[12];
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc* const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef const struct dnnl_primitive* const_dnnl_primitive_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef const struct dnnl_primitive_attr* const_dnnl_primitive_attr_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;

dnnl_status_t dnnl_engine_create(dnnl_engine_t*, int kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t*, dnnl_engine_t, unsigned flags);
dnnl_status_t dnnl_stream_wait(dnnl_stream_t);
dnnl_status_t dnnl_stream_destroy(dnnl_stream_t);
dnnl_status_t dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t*, int ndims,
                                               const dnnl_dims_t dims, int data_type,
                                               int tag);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t);
int dnnl_memory_desc_equal(const_dnnl_memory_desc_t, const_dnnl_memory_desc_t);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t);
dnnl_status_t dnnl_memory_create(dnnl_memory_t*, const_dnnl_memory_desc_t,
                                 dnnl_engine_t, void* handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t);
dnnl_status_t dnnl_primitive_attr_create(dnnl_primitive_attr_t*);
dnnl_status_t dnnl_primitive_attr_destroy(dnnl_primitive_attr_t);
dnnl_status_t dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t, int mode);
dnnl_status_t dnnl_convolution_forward_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int prop_kind, int alg_kind,
    const_dnnl_memory_desc_t src, const_dnnl_memory_desc_t weights,
    const_dnnl_memory_desc_t bias, const_dnnl_memory_desc_t dst,
    const dnnl_dims_t strides, const dnnl_dims_t dilates, const dnnl_dims_t padding_l,
    const dnnl_dims_t padding_r, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_convolution_backward_data_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind,
    const_dnnl_memory_desc_t diff_src, const_dnnl_memory_desc_t weights,
    const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides,
    const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_desc_t hint_fwd, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_convolution_backward_weights_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t diff_weights, const_dnnl_memory_desc_t diff_bias,
    const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides,
    const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_desc_t hint_fwd, const_dnnl_primitive_attr_t);
dnnl_status_t dnnl_reorder_primitive_desc_create(dnnl_primitive_desc_t*,
                                                 const_dnnl_memory_desc_t src,
                                                 dnnl_engine_t, const_dnnl_memory_desc_t dst,
                                                 dnnl_engine_t,
                                                 const_dnnl_primitive_attr_t);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(const_dnnl_primitive_desc_t,
                                                      int what, int index);
dnnl_status_t dnnl_primitive_desc_query(const_dnnl_primitive_desc_t, int what,
                                        int index, void* result);
dnnl_status_t dnnl_primitive_desc_destroy(dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t*, const_dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_execute(const_dnnl_primitive_t, dnnl_stream_t, int nargs,
                                     const dnnl_exec_arg_t* args);
}

namespace {

namespace ffi = xla::ffi;

// oneDNN enumerations (dnnl_types.h, dnnl_common_types.h of oneDNN 3.x).
constexpr int kF32 = 3;                 // dnnl_f32
constexpr int kTagAny = 1;              // dnnl_format_tag_any
// Channels-last activations and spatial-first kernels, by number of spatial dims:
// logical (N, C, H, W) stored N H W C (dnnl_acdb), (O, I, H, W) stored H W I O
// (dnnl_cdba); 3-D: dnnl_acdeb, dnnl_cdeba.
constexpr int kActivationTag[] = {0, 0, 22, 33};
constexpr int kKernelTag[] = {0, 0, 28, 38};
constexpr int kCpu = 1;                 // dnnl_cpu
constexpr int kInOrder = 1;             // dnnl_stream_in_order
constexpr int kScratchpadUser = 1;      // dnnl_scratchpad_mode_user
constexpr int kForwardTraining = 64;    // dnnl_forward_training
constexpr int kConvolutionDirect = 1;   // dnnl_convolution_direct
constexpr int kQueryImplInfo = 8;       // dnnl_query_impl_info_str
constexpr int kQueryWeightsMd = 131;    // dnnl_query_weights_md
constexpr int kQueryDiffWeightsMd = 132;
constexpr int kQueryScratchpadMd = 136;
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80,
              kArgDiffSrc = 129, kArgDiffDst = 145, kArgDiffWeights = 161;

void Check(dnnl_status_t status, const char* what) {
  if (status != 0) {
    throw std::runtime_error(std::string("oneDNN ") + what + " failed with status " +
                             std::to_string(status));
  }
}

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e;
    Check(dnnl_engine_create(&e, kCpu, 0), "engine_create");
    return e;
  }();
  return engine;
}

// A memory descriptor (dims in oneDNN's logical order), destroyed with the object
// unless released.
struct Md {
  dnnl_memory_desc_t md = nullptr;
  Md(const std::vector<int64_t>& logical, int tag) {
    dnnl_dims_t dims = {};
    for (size_t i = 0; i < logical.size(); ++i) dims[i] = logical[i];
    Check(dnnl_memory_desc_create_with_tag(&md, static_cast<int>(logical.size()), dims,
                                           kF32, tag),
          "memory_desc");
  }
  Md(const Md&) = delete;
  ~Md() {
    if (md) dnnl_memory_desc_destroy(md);
  }
  dnnl_memory_desc_t Release() {
    auto m = md;
    md = nullptr;
    return m;
  }
};

enum Kind { kForward, kBackwardData, kBackwardWeights };

// One convolution: x (N, *S, Ci) -> y (N, *S, Co) with kernel (*K, Ci, Co), S and K
// the 2 or 3 spatial sizes; output size = input size ("same" padding, odd kernels).
struct Geometry {
  int kind;
  int64_t n, ci, co;
  std::vector<int64_t> spatial, window;
  auto Tie() const { return std::tie(kind, n, ci, co, spatial, window); }
  bool operator<(const Geometry& o) const { return Tie() < o.Tie(); }
  std::vector<int64_t> Activation(int64_t c) const {  // logical (N, C, *S)
    std::vector<int64_t> d = {n, c};
    d.insert(d.end(), spatial.begin(), spatial.end());
    return d;
  }
  std::vector<int64_t> Kernel() const {  // logical (O, I, *K)
    std::vector<int64_t> d = {co, ci};
    d.insert(d.end(), window.begin(), window.end());
    return d;
  }
  int Dims() const { return static_cast<int>(spatial.size()); }
};

// The primitive of one geometry, plus the reorder between the spatial-first kernel the
// caller holds and the blocked layout the primitive chose for it (kernels are small).
struct Conv {
  dnnl_primitive_t primitive = nullptr;
  const_dnnl_memory_desc_t kernel_md = nullptr;  // the primitive's layout
  const_dnnl_memory_desc_t scratchpad_md = nullptr;
  size_t scratchpad_bytes = 0;
  size_t kernel_bytes = 0;
  dnnl_memory_desc_t plain_kernel_md = nullptr;  // (*K, Ci, Co)
  dnnl_memory_desc_t x_md = nullptr, y_md = nullptr;
  dnnl_primitive_t reorder = nullptr;  // plain -> kernel_md (forward, backward data)
                                       // or kernel_md -> plain (backward weights)
  std::string impl;
};

Conv Build(const Geometry& g) {
  if (g.Dims() < 2 || g.Dims() > 3) throw std::runtime_error("2 or 3 spatial dims");
  dnnl_dims_t strides = {}, dilates = {}, pad_l = {}, pad_r = {};
  for (int i = 0; i < g.Dims(); ++i) {
    if (g.window[i] % 2 == 0) throw std::runtime_error("kernel sizes must be odd");
    strides[i] = 1;
    pad_l[i] = pad_r[i] = (g.window[i] - 1) / 2;
  }
  const int act = kActivationTag[g.Dims()], ker = kKernelTag[g.Dims()];
  Md x(g.Activation(g.ci), act), y(g.Activation(g.co), act), any(g.Kernel(), kTagAny),
      plain(g.Kernel(), ker);
  dnnl_primitive_attr_t attr;
  Check(dnnl_primitive_attr_create(&attr), "attr_create");
  Check(dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser), "scratchpad");
  dnnl_primitive_desc_t fwd, pd;
  Check(dnnl_convolution_forward_primitive_desc_create(
            &fwd, Engine(), kForwardTraining, kConvolutionDirect, x.md, any.md, nullptr,
            y.md, strides, dilates, pad_l, pad_r, attr),
        "convolution_forward");
  if (g.kind == kForward) {
    pd = fwd;
  } else if (g.kind == kBackwardData) {
    Check(dnnl_convolution_backward_data_primitive_desc_create(
              &pd, Engine(), kConvolutionDirect, x.md, any.md, y.md, strides, dilates,
              pad_l, pad_r, fwd, attr),
          "convolution_backward_data");
  } else {
    Check(dnnl_convolution_backward_weights_primitive_desc_create(
              &pd, Engine(), kConvolutionDirect, x.md, any.md, nullptr, y.md, strides,
              dilates, pad_l, pad_r, fwd, attr),
          "convolution_backward_weights");
  }
  dnnl_primitive_attr_destroy(attr);
  if (pd != fwd) dnnl_primitive_desc_destroy(fwd);  // only a hint for the backward pd
  Conv conv;
  Check(dnnl_primitive_create(&conv.primitive, pd), "primitive_create");
  // pd stays alive: kernel_md and scratchpad_md point into it.
  conv.kernel_md = dnnl_primitive_desc_query_md(
      pd, g.kind == kBackwardWeights ? kQueryDiffWeightsMd : kQueryWeightsMd, 0);
  conv.scratchpad_md = dnnl_primitive_desc_query_md(pd, kQueryScratchpadMd, 0);
  conv.scratchpad_bytes = dnnl_memory_desc_get_size(conv.scratchpad_md);
  conv.kernel_bytes = dnnl_memory_desc_get_size(conv.kernel_md);
  const char* impl = nullptr;
  dnnl_primitive_desc_query(pd, kQueryImplInfo, 0, &impl);
  conv.impl = impl ? impl : "";
  if (!dnnl_memory_desc_equal(conv.kernel_md, plain.md)) {
    dnnl_primitive_desc_t reorder_pd;
    const bool to_plain = g.kind == kBackwardWeights;
    Check(dnnl_reorder_primitive_desc_create(
              &reorder_pd, to_plain ? conv.kernel_md : plain.md, Engine(),
              to_plain ? plain.md : conv.kernel_md, Engine(), nullptr),
          "reorder");
    Check(dnnl_primitive_create(&conv.reorder, reorder_pd), "reorder_create");
  }
  conv.plain_kernel_md = plain.Release();
  conv.x_md = x.Release();
  conv.y_md = y.Release();
  return conv;
}

const Conv& Get(const Geometry& g) {
  static std::mutex mutex;
  static std::map<Geometry, Conv> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(g);
  if (it == cache.end()) it = cache.emplace(g, Build(g)).first;
  return it->second;
}

// Temporary memory objects around caller-owned buffers, destroyed on scope exit.
struct Memories {
  std::vector<dnnl_memory_t> all;
  dnnl_memory_t Wrap(const_dnnl_memory_desc_t md, void* data) {
    dnnl_memory_t m;
    Check(dnnl_memory_create(&m, md, Engine(), data), "memory_create");
    all.push_back(m);
    return m;
  }
  ~Memories() {
    for (auto m : all) dnnl_memory_destroy(m);
  }
};

void Execute(dnnl_primitive_t primitive, std::vector<dnnl_exec_arg_t> args) {
  // One in-order stream per thread: XLA may run two convolutions at once.
  thread_local dnnl_stream_t stream = [] {
    dnnl_stream_t s;
    Check(dnnl_stream_create(&s, Engine(), kInOrder), "stream_create");
    return s;
  }();
  Check(dnnl_primitive_execute(primitive, stream, static_cast<int>(args.size()),
                               args.data()),
        "execute");
  Check(dnnl_stream_wait(stream), "stream_wait");
}

Geometry Describe(Kind kind, ffi::Span<const int64_t> x, ffi::Span<const int64_t> kernel) {
  Geometry g{kind, x[0], x[x.size() - 1], kernel[kernel.size() - 1], {}, {}};
  g.spatial.assign(x.begin() + 1, x.end() - 1);
  g.window.assign(kernel.begin(), kernel.end() - 2);
  return g;
}

// Runs one convolution. `in` is the activation read (x, or dy for backward data),
// `other` the second operand (the kernel, or dy for backward weights), `out` the result.
ffi::Error Run(Kind kind, ffi::AnyBuffer in, ffi::AnyBuffer other,
               ffi::Result<ffi::AnyBuffer> out) {
  try {
    // Shapes in the caller's terms: x (N, *S, Ci), kernel (*K, Ci, Co).
    const auto x_shape = kind == kBackwardData ? out->dimensions() : in.dimensions();
    const auto kernel_shape =
        kind == kBackwardWeights ? out->dimensions() : other.dimensions();
    const Conv& conv = Get(Describe(kind, x_shape, kernel_shape));
    thread_local std::vector<char> scratchpad, blocked_kernel;
    if (scratchpad.size() < conv.scratchpad_bytes) scratchpad.resize(conv.scratchpad_bytes);
    Memories mem;
    void* kernel = kind == kBackwardWeights ? out->untyped_data() : other.untyped_data();
    dnnl_memory_t kernel_mem;
    if (conv.reorder) {
      if (blocked_kernel.size() < conv.kernel_bytes) blocked_kernel.resize(conv.kernel_bytes);
      kernel_mem = mem.Wrap(conv.kernel_md, blocked_kernel.data());
      if (kind != kBackwardWeights) {
        Execute(conv.reorder, {{kArgSrc, mem.Wrap(conv.plain_kernel_md, kernel)},
                               {kArgDst, kernel_mem}});
      }
    } else {
      kernel_mem = mem.Wrap(conv.plain_kernel_md, kernel);
    }
    dnnl_memory_t scratch = mem.Wrap(conv.scratchpad_md, scratchpad.data());
    if (kind == kForward) {
      Execute(conv.primitive, {{kArgSrc, mem.Wrap(conv.x_md, in.untyped_data())},
                               {kArgWeights, kernel_mem},
                               {kArgDst, mem.Wrap(conv.y_md, out->untyped_data())},
                               {kArgScratchpad, scratch}});
    } else if (kind == kBackwardData) {
      Execute(conv.primitive, {{kArgDiffDst, mem.Wrap(conv.y_md, in.untyped_data())},
                               {kArgWeights, kernel_mem},
                               {kArgDiffSrc, mem.Wrap(conv.x_md, out->untyped_data())},
                               {kArgScratchpad, scratch}});
    } else {
      Execute(conv.primitive, {{kArgSrc, mem.Wrap(conv.x_md, in.untyped_data())},
                               {kArgDiffDst, mem.Wrap(conv.y_md, other.untyped_data())},
                               {kArgDiffWeights, kernel_mem},
                               {kArgScratchpad, scratch}});
      if (conv.reorder) {
        Execute(conv.reorder, {{kArgSrc, kernel_mem},
                               {kArgDst, mem.Wrap(conv.plain_kernel_md, kernel)}});
      }
    }
    return ffi::Error::Success();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(e.what());
  }
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer kernel,
                   ffi::Result<ffi::AnyBuffer> y) {
  return Run(kForward, x, kernel, y);
}
ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer kernel,
                        ffi::Result<ffi::AnyBuffer> dx) {
  return Run(kBackwardData, dy, kernel, dx);
}
ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                           ffi::Result<ffi::AnyBuffer> dkernel) {
  return Run(kBackwardWeights, x, dy, dkernel);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeanConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SeanConvBackwardData, BackwardData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(SeanConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// Which oneDNN implementation a geometry runs (e.g. "brg_conv_fwd:avx512_core"), for
// the benchmarks and tests: kind 0/1/2 = forward/backward data/backward weights;
// x_shape (N, *S, Ci), kernel_shape (*K, Ci, Co), `rank` entries each.
extern "C" const char* SeanConvImpl(int kind, int rank, const int64_t* x_shape,
                                    const int64_t* kernel_shape) {
  thread_local std::string impl;
  try {
    impl = Get(Describe(static_cast<Kind>(kind), ffi::Span<const int64_t>(x_shape, rank),
                        ffi::Span<const int64_t>(kernel_shape, rank)))
               .impl;
  } catch (const std::exception& e) {
    impl = std::string("error: ") + e.what();
  }
  return impl.c_str();
}
