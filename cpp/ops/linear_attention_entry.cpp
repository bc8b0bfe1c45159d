// CPU entry points of the linear-attention training kernels (ops/linear_attention.h): argument checks
// (the contract of ne::cuda::linear_attention_forward/backward, on CPU tensors), work split over the
// B * H (batch, head) pairs, ISA pick. The kernels: cpp/ops/linear_attention_train.cpp.
#include <algorithm>
#include <string>

#include "core/parallel.h"
#include "normengine/errors.h"
#include "ops/linear_attention.h"

namespace ne {

namespace {

const LinAttnTrainTable& table() { return *NE_PICK_ISA(linear_attention_train_table); }

constexpr int kMaxHeadDim = 1024;

void check_cpu(const TensorView& t, const char* name) {
  if (t.device.type != DeviceType::CPU)
    throw DeviceError(std::string(name) + ": expected a CPU tensor, got one on " + t.device.str());
}

std::string shape_str(std::initializer_list<int64_t> s) {
  std::string r = "[";
  for (int64_t x : s) r += (r.size() > 1 ? ", " : "") + std::to_string(x);
  return r + "]";
}

// A [B, T, H, D] view in the element type `dt` with unit stride in the last dim.
LinAttnTrainArgs::View view4(const TensorView& t, const char* name, DType dt, int64_t B, int64_t T, int64_t H,
                             int64_t D) {
  check_cpu(t, name);
  if (t.dtype != dt)
    throw DTypeError(std::string(name) + ": expected " + dtype_name(dt) + " (the dtype of q), got " +
                     dtype_name(t.dtype));
  if (t.ndim != 4 || t.shape[0] != B || t.shape[1] != T || t.shape[2] != H || t.shape[3] != D)
    throw ShapeError(std::string(name) + ": expected shape " + shape_str({B, T, H, D}));
  if (D > 1 && t.strides[3] != 1) throw ShapeError(std::string(name) + ": the last dimension must have stride 1");
  LinAttnTrainArgs::View v;
  v.data = t.data;
  v.sb = t.strides[0];
  v.st = t.strides[1];
  v.sh = t.strides[2];
  return v;
}

const float* state_ptr(const TensorView* t, const char* name, int64_t B, int64_t H, int Dk, int Dv) {
  if (!t) return nullptr;
  check_cpu(*t, name);
  if (t->dtype != DType::F32) throw DTypeError(std::string(name) + ": expected float32, got " + dtype_name(t->dtype));
  if (t->ndim != 4 || t->shape[0] != B || t->shape[1] != H || t->shape[2] != Dk + 1 || t->shape[3] != Dv + 1 ||
      !t->is_contiguous())
    throw ShapeError(std::string(name) + ": expected a contiguous float32 [B, H, Dk+1, Dv+1] = " +
                     shape_str({B, H, Dk + 1, Dv + 1}) + " tensor");
  return static_cast<const float*>(t->data);
}

// Checks what forward and backward share; fills the shape, params and q, k, v of `a`.
LinAttnTrainArgs common(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView* decay) {
  check_cpu(q, "q");
  if (q.ndim != 4) throw ShapeError("q: expected [B, T, H, Dk]");
  if (v.ndim != 4) throw ShapeError("v: expected [B, T, H, Dv]");
  if (q.dtype != DType::F32 && q.dtype != DType::BF16 && q.dtype != DType::F16)
    throw DTypeError(std::string("q: expected float32, float16 or bfloat16, got ") + dtype_name(q.dtype));
  if (static_cast<int>(p.kind) < 0 || static_cast<int>(p.kind) > 2)
    throw ValueError("kind: unknown value " + std::to_string(static_cast<int>(p.kind)));
  if (p.kind == LinAttnKind::Linear && (static_cast<int>(p.fmap) < 0 || static_cast<int>(p.fmap) > 2))
    throw ValueError("feature_map: unknown value " + std::to_string(static_cast<int>(p.fmap)));
  if (p.kind == LinAttnKind::Norm && (p.out_norm < 0 || p.out_norm > 1))
    throw ValueError("norm: expected 0 (rms) or 1 (layer)");
  if (!(p.eps > 0.0f)) throw ValueError("eps: expected a positive number");
  LinAttnTrainArgs a;
  a.p = p;
  a.B = q.shape[0];
  a.T = q.shape[1];
  const int64_t H = q.shape[2], Dk = q.shape[3], Dv = v.shape[3];
  if (Dk < 1 || Dk > kMaxHeadDim)
    throw ShapeError("q: head dim Dk = " + std::to_string(Dk) + " not supported (1 .. " + std::to_string(kMaxHeadDim) + ")");
  if (Dv < 1 || Dv > kMaxHeadDim)
    throw ShapeError("v: head dim Dv = " + std::to_string(Dv) + " not supported (1 .. " + std::to_string(kMaxHeadDim) + ")");
  if (H > (int64_t{1} << 30)) throw ShapeError("q: too many heads");
  a.H = static_cast<int>(H);
  a.Dk = static_cast<int>(Dk);
  a.Dv = static_cast<int>(Dv);
  a.dtype = q.dtype;
  a.q = view4(q, "q", q.dtype, a.B, a.T, H, Dk);
  a.k = view4(k, "k", q.dtype, a.B, a.T, H, Dk);
  a.v = view4(v, "v", q.dtype, a.B, a.T, H, Dv);
  if (decay) {
    check_cpu(*decay, "decay");
    if (p.kind != LinAttnKind::Norm) throw ValueError("decay: only norm attention takes a decay");
    if (!p.causal) throw ValueError("decay: must be None for non-causal norm attention");
    if (decay->dtype != DType::F32 || decay->ndim != 1 || decay->shape[0] != H || !decay->is_contiguous())
      throw ShapeError("decay: expected a contiguous float32 [H] tensor");
    a.decay = static_cast<const float*>(decay->data);
    for (int64_t h = 0; h < H; ++h)
      if (!(a.decay[h] > 0.0f && a.decay[h] <= 1.0f)) throw ValueError("decay: every lambda must be in (0, 1]");
  }
  return a;
}

void run(const LinAttnTrainArgs& a, void (*fn)(const LinAttnTrainArgs&, int64_t, int64_t)) {
  const int64_t nbh = a.B * a.H;
  if (nbh == 0) return;
  parallel_for(nbh, 1, [&](int64_t bh0, int64_t bh1, int) { fn(a, bh0, bh1); });
}

}  // namespace

void linear_attention_forward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                              const TensorView* decay, const TensorView* initial_state, const TensorView& o,
                              const TensorView* final_state) {
  LinAttnTrainArgs a = common(p, q, k, v, decay);
  a.o = view4(o, "o", a.dtype, a.B, a.T, a.H, a.Dv);
  a.init = state_ptr(initial_state, "initial_state", a.B, a.H, a.Dk, a.Dv);
  a.fin = const_cast<float*>(state_ptr(final_state, "final_state", a.B, a.H, a.Dk, a.Dv));
  run(a, table().forward);
}

void linear_attention_backward(const LinAttnParams& p, const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView* decay, const TensorView* initial_state, const TensorView& grad_o,
                               const TensorView* grad_final_state, const TensorView& grad_q, const TensorView& grad_k,
                               const TensorView& grad_v, const TensorView* grad_initial_state) {
  LinAttnTrainArgs a = common(p, q, k, v, decay);
  a.go = view4(grad_o, "grad_o", a.dtype, a.B, a.T, a.H, a.Dv);
  a.gq = view4(grad_q, "grad_q", a.dtype, a.B, a.T, a.H, a.Dk);
  a.gk = view4(grad_k, "grad_k", a.dtype, a.B, a.T, a.H, a.Dk);
  a.gv = view4(grad_v, "grad_v", a.dtype, a.B, a.T, a.H, a.Dv);
  a.init = state_ptr(initial_state, "initial_state", a.B, a.H, a.Dk, a.Dv);
  a.gfin = state_ptr(grad_final_state, "grad_final_state", a.B, a.H, a.Dk, a.Dv);
  a.ginit = const_cast<float*>(state_ptr(grad_initial_state, "grad_initial_state", a.B, a.H, a.Dk, a.Dv));
  run(a, table().backward);
}

}  // namespace ne
