// Python bindings of the engine (module kt_ops_cpuinfer._engine).
//
// Tensors cross the boundary as raw addresses and sizes (torch's data_ptr(), numpy's
// ctypes.data): the extension needs no torch headers and no torch at build time. The
// Python side is responsible for passing contiguous buffers of the documented dtype and
// for keeping them alive while the engine uses them. Every call that computes releases
// the GIL, so other Python threads (and the caller, between submit and sync) keep running.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "absorbed_mla.hpp"
#include "cpu_features.hpp"
#include "engine_types.hpp"
#include "kernel_table.hpp"
#include "latent_attention.hpp"
#include "linear_op.hpp"
#include "memory_probe.hpp"
#include "moe_layer.hpp"
#include "thread_pool.hpp"

namespace py = pybind11;
using namespace kt;

namespace {

template <class T>
T* as_ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

WType parse_wtype(const std::string& name) {
    for (int i = 0; i < static_cast<int>(WType::Count); ++i)
        if (name == kWTypeInfo[i].name) return static_cast<WType>(i);
    throw std::invalid_argument("the CPU engine cannot compute on GGML type '" + name + "'");
}

// A tensor dtype the engine reads and writes activations in: F32, F16 or BF16.
WType parse_float_type(const std::string& name) {
    const WType t = parse_wtype(name);
    if (!is_float_type(t))
        throw std::invalid_argument("expected a float type (F32, F16, BF16), got '" + name + "'");
    return t;
}

const char* act_kind_name(ActKind k) {
    switch (k) {
        case ActKind::F32: return "F32";
        case ActKind::BF16: return "BF16";
        case ActKind::Q8_32: return "Q8_32";
        case ActKind::Q8_256: return "Q8_256";
        default: return "?";
    }
}

ActKind parse_act_kind(const std::string& name) {
    for (int i = 0; i < static_cast<int>(ActKind::Count); ++i)
        if (name == act_kind_name(static_cast<ActKind>(i))) return static_cast<ActKind>(i);
    throw std::invalid_argument("unknown activation format '" + name + "'");
}

ActFn parse_act_fn(const std::string& name) {
    if (name == "silu" || name == "swish") return ActFn::SiLU;
    if (name == "relu") return ActFn::ReLU;
    if (name == "gelu") return ActFn::GeLU;
    if (name == "gelu_pytorch_tanh" || name == "gelu_new" || name == "gelu_fast") return ActFn::GeLUTanh;
    throw std::invalid_argument("the CPU engine has no activation '" + name +
                                "'; supported: silu, swish, relu, gelu, gelu_pytorch_tanh, gelu_new, gelu_fast");
}

// (address, GGML type, rows, cols, row stride, expert stride), as built by the Python side.
using MatrixSpec = std::tuple<uintptr_t, std::string, int, int, size_t, size_t>;

MatrixView to_view(const MatrixSpec& s) {
    MatrixView m;
    m.data = as_ptr<const uint8_t>(std::get<0>(s));
    m.type = parse_wtype(std::get<1>(s));
    m.rows = std::get<2>(s);
    m.cols = std::get<3>(s);
    m.row_stride = std::get<4>(s);
    m.expert_stride = std::get<5>(s);
    return m;
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
    m.doc() = "kt CPU engine: MoE experts and linear layers computed on GGUF blocks";

    m.def("supported_isas", &supported_isas, "Kernel paths this CPU can run, best first.");
    m.def("resolve_isa", [](const std::string& isa) { return std::string(kernels_for(isa).isa); },
          "The kernel path `isa` selects ('auto' -> the best supported); errors if unsupported.");
    m.def("weight_types", [] {
        std::vector<std::string> names;
        for (const auto& info : kWTypeInfo) names.emplace_back(info.name);
        return names;
    }, "GGML types the kernels compute on.");
    m.def("block_values", [](const std::string& t) { return wtype_info(parse_wtype(t)).block_values; });
    m.def("activation_format", [](const std::string& isa, const std::string& wtype) {
        return std::string(act_kind_name(kernels_for(isa).act_for[static_cast<int>(parse_wtype(wtype))]));
    }, "The activation format ('F32', 'BF16', 'Q8_32', 'Q8_256') weights of `wtype` are multiplied with.");
    m.def("activation_row_bytes", [](const std::string& kind, int n) { return act_row_bytes(parse_act_kind(kind), n); });

    m.def("quantize_row", [](const std::string& isa, const std::string& kind, uintptr_t x, int n, uintptr_t dst) {
        const KernelTable& k = kernels_for(isa);
        py::gil_scoped_release release;
        k.quantize_row(parse_act_kind(kind), as_ptr<const float>(x), n, as_ptr<uint8_t>(dst));
    }, "Prepare one activation row of n float32 values in format `kind` at dst.");

    m.def("gemm", [](const std::string& isa, const std::string& wtype, uintptr_t w, int rows, int cols,
                     size_t row_stride, uintptr_t x, int tokens, uintptr_t out) {
        const KernelTable& k = kernels_for(isa);
        const WType t = parse_wtype(wtype);
        if (cols % wtype_info(t).block_values != 0) throw std::invalid_argument("cols is not a whole number of blocks");
        const ActKind kind = k.act_for[static_cast<int>(t)];
        const size_t bytes = act_row_bytes(kind, cols);
        py::gil_scoped_release release;
        AlignedBuffer buf;
        uint8_t* xq = buf.reserve(static_cast<size_t>(std::max(tokens, 1)) * bytes);
        std::vector<const uint8_t*> rows_ptr(static_cast<size_t>(tokens));
        for (int i = 0; i < tokens; ++i) {
            k.quantize_row(kind, as_ptr<const float>(x) + static_cast<size_t>(i) * cols, cols, xq + i * bytes);
            rows_ptr[static_cast<size_t>(i)] = xq + i * bytes;
        }
        k.gemm(t, as_ptr<const uint8_t>(w), row_stride, rows, cols, rows_ptr.data(), tokens, as_ptr<float>(out),
               static_cast<size_t>(rows));
    }, "out[T, rows] = x[T, cols] W^T on one thread, activations prepared as the kernels expect (for tests).");

    m.def("activate", [](const std::string& isa, const std::string& fn, uintptr_t g, uintptr_t u, uintptr_t h, int n) {
        const KernelTable& k = kernels_for(isa);
        const ActFn f = parse_act_fn(fn);
        py::gil_scoped_release release;
        k.activate(f, as_ptr<const float>(g), as_ptr<const float>(u), as_ptr<float>(h), n);
    }, "h = act(g) * u elementwise (for tests).");
    m.def("rms_norm", [](const std::string& isa, uintptr_t x, const std::string& x_type, int rows, int cols,
                         uintptr_t w, const std::string& w_type, float eps, uintptr_t out, const std::string& out_type) {
        const KernelTable& k = kernels_for(isa);
        const WType xt = parse_float_type(x_type), wt = parse_float_type(w_type), ot = parse_float_type(out_type);
        if (rows < 0 || cols < 1) throw std::invalid_argument("rms_norm needs rows >= 0 and cols >= 1");
        const size_t xb = wtype_info(xt).block_bytes, ob = wtype_info(ot).block_bytes;
        for (int r = 0; r < rows; ++r)
            k.rms_norm_row(as_ptr<const uint8_t>(x) + static_cast<size_t>(r) * cols * xb, xt, cols,
                           as_ptr<const uint8_t>(w), wt, eps, as_ptr<uint8_t>(out) + static_cast<size_t>(r) * cols * ob, ot);
    }, "RMSNorm of `rows` contiguous rows of `cols` values on the calling thread (transformers' roundings).");

    m.def("check_activation", [](const std::string& fn) { parse_act_fn(fn); },
          "Raise ValueError if the engine has no activation of this name.");

    py::class_<ThreadPool, std::shared_ptr<ThreadPool>>(m, "ThreadPool")
        .def(py::init<int>(), py::arg("threads"))
        .def_property_readonly("threads", &ThreadPool::threads)
        .def_property_readonly("jobs_completed", &ThreadPool::jobs_completed)
        .def_property_readonly("scratch_bytes", [](ThreadPool& self) { return self.scratch().bytes(); },
                               "Bytes of the working buffers the pool's ops borrow (lent out or free).")
        .def("release_scratch", [](ThreadPool& self) { self.scratch().release_free(); },
             "Free the working buffers no call holds now (a long prompt's, say); later calls make them again.");

    m.def("stream_read", [](ThreadPool& pool, uintptr_t data, size_t bytes) {
        py::gil_scoped_release release;
        return stream_read(pool, as_ptr<const uint8_t>(data), bytes);
    }, "Read a buffer once on the pool's threads (bandwidth probe); returns a checksum.");

    py::class_<MoELayer>(m, "MoELayer")
        .def(py::init([](std::shared_ptr<ThreadPool> pool, const std::string& isa, int experts, int hidden,
                         int intermediate, const MatrixSpec& gate, const MatrixSpec& up, const MatrixSpec& down,
                         const std::string& act) {
                 return std::make_unique<MoELayer>(std::move(pool), kernels_for(isa), experts, hidden, intermediate,
                                                   to_view(gate), to_view(up), to_view(down), parse_act_fn(act));
             }),
             py::arg("pool"), py::arg("isa"), py::arg("experts"), py::arg("hidden"), py::arg("intermediate"),
             py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("act"))
        .def("submit", [](MoELayer& self, uintptr_t x, uintptr_t ids, uintptr_t weights, uintptr_t out, int tokens,
                          int top_k, const std::string& x_type, const std::string& out_type) {
                 const WType xt = parse_float_type(x_type), ot = parse_float_type(out_type);
                 py::gil_scoped_release release;
                 self.submit(as_ptr<const void>(x), xt, as_ptr<const int64_t>(ids), as_ptr<const float>(weights),
                             as_ptr<void>(out), ot, tokens, top_k);
             },
             py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("out"), py::arg("tokens"), py::arg("top_k"),
             py::arg("x_type") = "F32", py::arg("out_type") = "F32")
        .def("sync", &MoELayer::sync, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("done", &MoELayer::done)
        .def_property_readonly("pending", &MoELayer::pending)
        .def_property_readonly("isa", [](const MoELayer& self) { return std::string(self.isa()); });

    py::class_<LinearOp>(m, "Linear")
        .def(py::init([](std::shared_ptr<ThreadPool> pool, const std::string& isa, const MatrixSpec& weight,
                         int groups) {
                 return std::make_unique<LinearOp>(std::move(pool), kernels_for(isa), to_view(weight), groups);
             }),
             py::arg("pool"), py::arg("isa"), py::arg("weight"), py::arg("groups") = 1)
        .def("forward", [](LinearOp& self, uintptr_t x, int tokens, uintptr_t out, uintptr_t bias,
                           const std::string& x_type, const std::string& out_type) {
                 const WType xt = parse_float_type(x_type), ot = parse_float_type(out_type);
                 py::gil_scoped_release release;
                 self.forward(as_ptr<const void>(x), xt, tokens, as_ptr<void>(out), ot, as_ptr<const float>(bias));
             },
             py::arg("x"), py::arg("tokens"), py::arg("out"), py::arg("bias"), py::arg("x_type") = "F32",
             py::arg("out_type") = "F32")
        .def_property_readonly("isa", [](const LinearOp& self) { return std::string(self.isa()); })
        .def_property_readonly("groups", &LinearOp::groups);

    // forward(q_latent, q_pe, queries, heads, latent, rope, (c_kv addr, type, stride),
    //         (k_pe addr, type, stride), keys, visible int32[queries], scale, out)
    py::class_<LatentAttention>(m, "LatentAttention")
        .def(py::init([](std::shared_ptr<ThreadPool> pool, const std::string& isa) {
                 return std::make_unique<LatentAttention>(std::move(pool), kernels_for(isa));
             }),
             py::arg("pool"), py::arg("isa"))
        .def("forward",
             [](LatentAttention& self, uintptr_t q_latent, uintptr_t q_pe, int queries, int heads, int latent, int rope,
                const std::tuple<uintptr_t, std::string, size_t>& c_kv, const std::tuple<uintptr_t, std::string, size_t>& k_pe,
                int keys, uintptr_t visible, float scale, uintptr_t out) {
                 const CachedRows ckv{as_ptr<const uint8_t>(std::get<0>(c_kv)), parse_wtype(std::get<1>(c_kv)), std::get<2>(c_kv)};
                 const CachedRows kpe{as_ptr<const uint8_t>(std::get<0>(k_pe)), parse_wtype(std::get<1>(k_pe)), std::get<2>(k_pe)};
                 py::gil_scoped_release release;
                 self.forward(as_ptr<const float>(q_latent), as_ptr<const float>(q_pe), queries, heads, latent, rope, ckv, kpe,
                              keys, as_ptr<const int32_t>(visible), scale, as_ptr<float>(out));
             },
             py::arg("q_latent"), py::arg("q_pe"), py::arg("queries"), py::arg("heads"), py::arg("latent"), py::arg("rope"),
             py::arg("c_kv"), py::arg("k_pe"), py::arg("keys"), py::arg("visible"), py::arg("scale"), py::arg("out"))
        .def_property_readonly("isa", [](const LatentAttention& self) { return std::string(self.isa()); });

    // AbsorbedMLA(pool, isa, (heads, nope, rope, latent, v_dim), q_a or None, (q_a norm weight addr, type, eps),
    //             q, kv_a, (kv norm weight addr, type, eps), uk, uv, o, rope_form, scale): borrows the Linear
    // ops, which stay alive as long as it does.
    py::class_<AbsorbedMLA>(m, "AbsorbedMLA")
        .def(py::init([](std::shared_ptr<ThreadPool> pool, const std::string& isa, const std::tuple<int, int, int, int, int>& shape,
                         LinearOp* q_a, const std::tuple<uintptr_t, std::string, float>& q_a_norm, LinearOp& q,
                         LinearOp& kv_a, const std::tuple<uintptr_t, std::string, float>& kv_norm, LinearOp& uk,
                         LinearOp& uv, LinearOp& o, const std::string& rope_form, float scale) {
                 const auto norm = [](const std::tuple<uintptr_t, std::string, float>& n) {
                     return NormWeight{as_ptr<const uint8_t>(std::get<0>(n)),
                                       std::get<0>(n) ? parse_float_type(std::get<1>(n)) : WType::F32, std::get<2>(n)};
                 };
                 RopeForm form;
                 if (rope_form == "complex") form = RopeForm::Complex;
                 else if (rope_form == "interleaved") form = RopeForm::Interleaved;
                 else if (rope_form == "half") form = RopeForm::Half;
                 else throw std::invalid_argument("rope_form must be 'complex', 'interleaved' or 'half', not '" + rope_form + "'");
                 const MLAShape dims{std::get<0>(shape), std::get<1>(shape), std::get<2>(shape), std::get<3>(shape),
                                     std::get<4>(shape)};
                 return std::make_unique<AbsorbedMLA>(std::move(pool), kernels_for(isa), dims, q_a, norm(q_a_norm), &q,
                                                      &kv_a, norm(kv_norm), &uk, &uv, &o, form, scale);
             }),
             py::arg("pool"), py::arg("isa"), py::arg("shape"), py::arg("q_a"), py::arg("q_a_norm"), py::arg("q"),
             py::arg("kv_a"), py::arg("kv_norm"), py::arg("uk"), py::arg("uv"), py::arg("o"), py::arg("rope_form"),
             py::arg("scale"), py::keep_alive<1, 5>(), py::keep_alive<1, 7>(), py::keep_alive<1, 8>(),
             py::keep_alive<1, 10>(), py::keep_alive<1, 11>(), py::keep_alive<1, 12>())
        // forward(x, dtype, tokens, cos, sin, table_type, (c_kv addr, type, stride), (k_pe addr, type, stride),
        //         start, cache_rows, visible int32[tokens], out)
        .def("forward",
             [](AbsorbedMLA& self, uintptr_t x, const std::string& dtype, int tokens, uintptr_t cos, uintptr_t sin,
                const std::string& table_type, const std::tuple<uintptr_t, std::string, size_t>& c_kv,
                const std::tuple<uintptr_t, std::string, size_t>& k_pe, int start, int cache_rows, uintptr_t visible,
                uintptr_t out) {
                 const WType dt = parse_float_type(dtype), tt = parse_float_type(table_type);
                 const CachedRows ckv{as_ptr<const uint8_t>(std::get<0>(c_kv)), parse_float_type(std::get<1>(c_kv)), std::get<2>(c_kv)};
                 const CachedRows kpe{as_ptr<const uint8_t>(std::get<0>(k_pe)), parse_float_type(std::get<1>(k_pe)), std::get<2>(k_pe)};
                 py::gil_scoped_release release;
                 self.forward(as_ptr<const void>(x), dt, tokens, as_ptr<const uint8_t>(cos), as_ptr<const uint8_t>(sin), tt,
                              ckv, kpe, start, cache_rows, as_ptr<const int32_t>(visible), as_ptr<void>(out));
             },
             py::arg("x"), py::arg("dtype"), py::arg("tokens"), py::arg("cos"), py::arg("sin"), py::arg("table_type"),
             py::arg("c_kv"), py::arg("k_pe"), py::arg("start"), py::arg("cache_rows"), py::arg("visible"), py::arg("out"));
}
