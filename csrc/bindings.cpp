// pybind11 module fastbn._C: raw addresses, sizes and strides in, no torch headers.
// Element tensors are (ptr, sK, sN, sC, sL) tuples; the geometry is (N, C, L, channels_last,
// fold, tile) (see Geom).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>

#include "cpu/ops.h"
#include "cpu/parallel.h"

namespace py = pybind11;
using fastbn::Geom;
using fastbn::TD;

namespace {

using TDArg = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t>;
// N, C, L, cl, fold, tile
using GeomArg = std::tuple<int64_t, int64_t, int64_t, bool, int64_t, int64_t>;

TD td(const TDArg& a) {
  return TD{std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<3>(a), std::get<4>(a)};
}

Geom geom(const GeomArg& a) {
  return Geom{std::get<0>(a), std::get<1>(a), std::get<2>(a), std::get<3>(a), std::get<4>(a),
              std::get<5>(a)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastbn fused CPU batch-norm kernels (see fastbn/backends/cpu.py)";
  m.attr("FLOAT64") = int(fastbn::kFloat64);
  m.attr("FLOAT32") = int(fastbn::kFloat32);
  m.attr("BFLOAT16") = int(fastbn::kBFloat16);
  m.attr("FLOAT16") = int(fastbn::kFloat16);
  m.def("threading", [] { return std::string(fastbn::threading()); });
  m.def("build_info", [] {
    std::string isa =
#if defined(__AVX512F__) && defined(__AVX512BF16__)
        "AVX-512 (with BF16 conversions)";
#elif defined(__AVX512F__)
        "AVX-512";
#elif defined(__AVX2__)
        "AVX2";
#elif defined(__aarch64__)
        "AArch64";
#else
        "baseline ISA";
#endif
    const std::string stores =
        fastbn::NON_TEMPORAL_STORES
            ? "non-temporal stores for outputs from " +
                  std::to_string(fastbn::stream_min_bytes()) + " bytes (2-byte outputs " +
                  std::to_string(fastbn::HALF_STREAM_FACTOR) + "x that)"
            : "plain stores (no non-temporal stores on this ISA)";
    return std::string("compiler ") + __VERSION__ + ", " + isa + ", threads: " +
           fastbn::threading() + ", " + stores + ", NCHW passes back to back for blocks of " +
           "up to " + std::to_string(fastbn::fuse_max_bytes()) + " input bytes";
  });
  m.def("stream_min_bytes", &fastbn::stream_min_bytes,
        "The output size (bytes) from which the kernels use non-temporal stores "
        "(bfloat16 and float16 outputs: from HALF_STREAM_FACTOR times it).");
  m.def("set_stream_min_bytes", &fastbn::set_stream_min_bytes, py::arg("bytes"),
        "Outputs from this many bytes are written with non-temporal stores (-1: the "
        "default, FASTBN_STREAM_MIN_BYTES or half the last-level cache, counted as 32 MiB "
        "at most). Returns the "
        "previous setting.");

  m.def("fuse_max_bytes", &fastbn::fuse_max_bytes,
        "The input bytes an NCHW channel block may hold for its two passes to run back "
        "to back (its second pass reading them from L2); 0: never.");
  m.def("set_fuse_max_bytes", &fastbn::set_fuse_max_bytes, py::arg("bytes"),
        "Sets fuse_max_bytes (-1: the default, FASTBN_FUSE_MAX_BYTES or half the L2 "
        "cache). Returns the previous setting.");
  m.attr("FUSE_MIN_RUN") = fastbn::FUSE_MIN_RUN;
  m.attr("ONE_CHANNEL_FUSE") = fastbn::ONE_CHANNEL_FUSE;
  m.attr("HALF_STREAM_FACTOR") = fastbn::HALF_STREAM_FACTOR;
  m.def("fused_block",
        [](const GeomArg& g, int nth, int64_t K, int64_t bytes_per_value) {
          const fastbn::Geom gm = geom(g);
          const int T = fastbn::threads_for(gm, K, nth, gm.channels());
          return fastbn::fused_block(gm, T, K, bytes_per_value);
        },
        py::arg("geom"), py::arg("nth"), py::arg("K"), py::arg("bytes_per_value"),
        "Channels per block where a kernel's two passes run back to back on this geometry "
        "(inputs of bytes_per_value bytes per value, all problems), 0 where they run whole.");

  m.def("forward_train",
        [](int dtype, const GeomArg& g, int nth, const TDArg& x, const TDArg& y, uintptr_t w,
           uintptr_t b, bool stats_in_t, double eps, bool relu, uintptr_t mean,
           uintptr_t invstd, uintptr_t var, uintptr_t running_mean, uintptr_t running_var,
           double momentum) {
          py::gil_scoped_release nogil;
          fastbn::forward_train(dtype, geom(g), nth, td(x), td(y), w, b, stats_in_t, eps, relu,
                                mean, invstd, var, running_mean, running_var, momentum);
        });
  m.def("forward_eval", [](int dtype, const GeomArg& g, int nth, const TDArg& x,
                           const TDArg& y, uintptr_t running_mean, uintptr_t running_var,
                           uintptr_t w, uintptr_t b, bool stats_in_t, double eps, bool relu) {
    py::gil_scoped_release nogil;
    fastbn::forward_eval(dtype, geom(g), nth, td(x), td(y), running_mean, running_var, w, b,
                         stats_in_t, eps, relu);
  });
  m.def("backward", [](int dtype, const GeomArg& g, int nth, int64_t K, bool relu,
                       const TDArg& x, const TDArg& dy, const TDArg& dx, uintptr_t mean,
                       uintptr_t invstd, uintptr_t w, uintptr_t b, bool params_in_t,
                       uintptr_t gw, uintptr_t gb) {
    py::gil_scoped_release nogil;
    fastbn::backward(dtype, geom(g), nth, K, relu, td(x), td(dy), td(dx), mean, invstd, w, b,
                     params_in_t, gw, gb);
  });
  m.def("forward_jvp", [](int dtype, const GeomArg& g, int nth, int64_t K, bool relu,
                          const TDArg& x, const TDArg& xt, const TDArg& yt, uintptr_t mean,
                          uintptr_t invstd, uintptr_t w, uintptr_t b, uintptr_t wt,
                          uintptr_t bt, bool params_in_t) {
    py::gil_scoped_release nogil;
    fastbn::forward_jvp(dtype, geom(g), nth, K, relu, td(x), td(xt), td(yt), mean, invstd, w,
                        b, wt, bt, params_in_t);
  });
  m.def("backward_backward",
        [](int dtype, const GeomArg& g, int nth, int64_t K, bool relu, const TDArg& x,
           const TDArg& dy, const TDArg& ggx, uintptr_t ggw, uintptr_t ggb, uintptr_t mean,
           uintptr_t invstd, uintptr_t w, uintptr_t b, bool params_in_t, const TDArg& out_gdy,
           const TDArg& out_gx, uintptr_t out_gw) {
          py::gil_scoped_release nogil;
          fastbn::backward_backward(dtype, geom(g), nth, K, relu, td(x), td(dy), td(ggx), ggw,
                                    ggb, mean, invstd, w, b, params_in_t, td(out_gdy),
                                    td(out_gx), out_gw);
        });
  m.def("backward_jvp",
        [](int dtype, const GeomArg& g, int nth, int64_t K, bool relu, const TDArg& x,
           const TDArg& dy, const TDArg& dyt, const TDArg& xt, uintptr_t wt, uintptr_t mean,
           uintptr_t invstd, uintptr_t w, uintptr_t b, bool params_in_t, const TDArg& out_gx,
           uintptr_t out_gw, uintptr_t out_gb) {
          py::gil_scoped_release nogil;
          fastbn::backward_jvp(dtype, geom(g), nth, K, relu, td(x), td(dy), td(dyt), td(xt),
                               wt, mean, invstd, w, b, params_in_t, td(out_gx), out_gw, out_gb);
        });
}
