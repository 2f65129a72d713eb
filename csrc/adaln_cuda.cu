// Fused AdaLN modulation, CUDA kernels (contract: top of vidgen_kernels/ops/adaln.py).
//
// No ATen / c10 / torch header here: this file compiles with nvcc alone.
//
// Layout. A row (C channels) is cut into chunks of VEC consecutive channels, VEC = 16 / sizeof(T)
// (4 for float, 8 for half / bf16) when C % VEC == 0, else VEC = 1. The NT threads working on a
// row own the chunks j = t + k * NT, k < KMAX (chunk j covers channels j*VEC .. j*VEC+VEC-1);
// chunks j >= C / VEC are masked off. Each tensor is read / written a whole chunk at a time, with
// 16-byte accesses when its host-side `vec` flag says so (last stride 1, 16-byte aligned base,
// outer strides multiples of 16 bytes), else element by element through its strides (any, 0
// included). Elements per thread EPT = KMAX * VEC.
//
// Forward (one pass over memory: x, y, gate read once; out, h written once):
//   C <= 256         one warp per row, 8 rows per 256-thread block, EPT 8, shuffles only;
//   256 < C <= 2048  one block per row, NT = ceil(C / 8) rounded up to a warp (<= 256), EPT 8;
//   C <= 8192        one block per row, EPT 16, NT <= 512;
//   C <= 16384       one block per row, EPT 32, NT <= 512.
//   The row (h in fp32) stays in registers; statistics in fp32, two passes over the registers
//   (mean, then the centred sums of deviations and squares, the former correcting the mean's
//   rounding; one for rms), warp xor-shuffles plus one shared-memory step per block reduction.
// Backward: one block per (b, chunk of R rows) walking the chunk's rows in order; per row one
//   fused block reduction of (sum dxhat, sum dxhat * xhat). EPT 8 for C <= 4096 (NT <= 512),
//   EPT 16 above (NT <= 512 up to 8192, <= 1024 beyond); dh and y are read before the row
//   reduction when NT <= 512. The partial sums (dgate / dshift / dscale in partial mode, dweight,
//   dbias) are accumulated in fp32 in dynamic shared memory, one row of C floats each (a thread
//   only touches its own chunks: no barrier, no atomic), or, when that does not fit in the
//   device's shared memory, in place in the block's own rows of the float32 partial buffers.
//   Per-token parameter gradients are stored directly in their buffer's dtype.
// No host synchronisation anywhere; launch errors come back from cudaGetLastError().
#include "adaln_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace vidgen {
namespace adaln {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kFwdWarpBlock = 256;    // forward warp-per-row path: 8 rows per block
constexpr int kFwdMaxBlock = 512;     // forward block-per-row path

// ------------------------------------------------------------------------------------------
// element types: fp32 <-> storage bits
// ------------------------------------------------------------------------------------------
template <typename U>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float from_bits(uint32_t b) { return __uint_as_float(b); }
  static __device__ __forceinline__ uint32_t to_bits(float v) { return __float_as_uint(v); }
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
  static __device__ __forceinline__ float round(float v) { return v; }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float from_bits(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  static __device__ __forceinline__ uint32_t to_bits(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
  static __device__ __forceinline__ float load(const __half* p) {
    return from_bits(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  static __device__ __forceinline__ void store(__half* p, float v) {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(to_bits(v));
  }
  static __device__ __forceinline__ float round(float v) {
    return __half2float(__float2half_rn(v));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float from_bits(uint32_t b) { return __uint_as_float(b << 16); }
  static __device__ __forceinline__ uint32_t to_bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return from_bits(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(to_bits(v));
  }
  static __device__ __forceinline__ float round(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
  }
};

// ------------------------------------------------------------------------------------------
// chunk access: VEC consecutive channels as fp32
// ------------------------------------------------------------------------------------------
template <typename U, int VEC>
struct Chunk {
  // 16-byte accesses possible at all for this (U, VEC)?
  static constexpr bool kVec = VEC > 1 && (VEC * sizeof(U)) % 16 == 0;

  // p: element c0 of the row. vec: p is 16-byte aligned and the stride along C is 1.
  // Read-only inputs (non-coherent cache).
  static __device__ __forceinline__ void load(const U* p, int64_t s, bool vec, float (&o)[VEC]) {
    if constexpr (kVec) {
      if (vec) {
        constexpr int kPer = 16 / static_cast<int>(sizeof(U));     // elements per uint4
        constexpr int kWords = VEC * static_cast<int>(sizeof(U)) / 16;  // uint4s per chunk
        const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
        for (int w = 0; w < kWords; ++w) unpack(__ldg(q + w), o, w * kPer);
        return;
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) o[v] = Elem<U>::load(p + v * s);
  }

  // Contiguous destination (stride 1 along C).
  static __device__ __forceinline__ void store(U* p, const float (&o)[VEC], bool vec) {
    if constexpr (kVec) {
      if (vec) {
        constexpr int kPer = 16 / static_cast<int>(sizeof(U));
        constexpr int kWords = VEC * static_cast<int>(sizeof(U)) / 16;
        uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
        for (int w = 0; w < kWords; ++w) q[w] = pack(o, w * kPer);
        return;
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) Elem<U>::store(p + v, o[v]);
  }

  static __device__ __forceinline__ void unpack(const uint4 r, float (&o)[VEC], int base) {
    const uint32_t wd[4] = {r.x, r.y, r.z, r.w};
    if constexpr (sizeof(U) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[base + i] = Elem<U>::from_bits(wd[i]);
    } else {  // two 16-bit elements per word, the lower address in the low half
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        o[base + 2 * i] = Elem<U>::from_bits(wd[i] & 0xffffu);
        o[base + 2 * i + 1] = Elem<U>::from_bits(wd[i] >> 16);
      }
    }
  }

  static __device__ __forceinline__ uint4 pack(const float (&o)[VEC], int base) {
    uint32_t wd[4];
    if constexpr (sizeof(U) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) wd[i] = Elem<U>::to_bits(o[base + i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        wd[i] = Elem<U>::to_bits(o[base + 2 * i]) | (Elem<U>::to_bits(o[base + 2 * i + 1]) << 16);
    }
    return make_uint4(wd[0], wd[1], wd[2], wd[3]);
  }
};

// float32, contiguous, read back after this thread wrote it (coherent loads: no __ldg).
template <int VEC>
__device__ __forceinline__ void load_rw(const float* p, bool vec, float (&o)[VEC]) {
  if constexpr (VEC % 4 == 0) {
    if (vec) {
#pragma unroll
      for (int w = 0; w < VEC / 4; ++w) {
        const float4 r = reinterpret_cast<const float4*>(p)[w];
        o[4 * w] = r.x; o[4 * w + 1] = r.y; o[4 * w + 2] = r.z; o[4 * w + 3] = r.w;
      }
      return;
    }
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) o[v] = p[v];
}

// Store to a per-token gradient buffer whose dtype is only known at run time (uniform branch).
template <int VEC>
__device__ __forceinline__ void store_dyn(void* base, DType dt, int64_t off, const float (&o)[VEC],
                                          bool vec) {
  switch (dt) {
    case DType::kFloat16:
      Chunk<__half, VEC>::store(static_cast<__half*>(base) + off, o, vec);
      break;
    case DType::kBFloat16:
      Chunk<__nv_bfloat16, VEC>::store(static_cast<__nv_bfloat16*>(base) + off, o, vec);
      break;
    default:
      Chunk<float, VEC>::store(static_cast<float*>(base) + off, o, vec);
      break;
  }
}

// ------------------------------------------------------------------------------------------
// kernel-side tensor descriptors (host fills them, including the `vec` flags)
// ------------------------------------------------------------------------------------------
struct KRow {  // [B, N, C], any strides
  const void* p;
  int64_t sb, sn, sc;
  bool vec;
};

struct KPar {  // [Bp, F, C]; sb is 0 when Bp == 1; tpr = N / F
  const void* p;
  int64_t sb, sf, sc, tpr;
  bool vec;
};

struct KGrad {  // parameter gradient sink
  void* p;
  GradMode mode;
  DType dtype;
  int64_t tpr;
  bool vec;
};

template <typename U>
__device__ __forceinline__ const U* row_ptr(const KRow& t, int64_t b, int64_t n) {
  return static_cast<const U*>(t.p) + b * t.sb + n * t.sn;
}

template <typename U>
__device__ __forceinline__ const U* par_ptr(const KPar& t, int64_t b, int64_t n) {
  return static_cast<const U*>(t.p) + b * t.sb + (n / t.tpr) * t.sf;
}

// ------------------------------------------------------------------------------------------
// reductions. xor butterflies: every lane ends with the bitwise-same value.
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float2 warp_sum2(float2 v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(kFull, v.x, o);
    v.y += __shfl_xor_sync(kFull, v.y, o);
  }
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32). `red` is one of two alternating
// buffers: a buffer is written again only two reductions later, i.e. after a __syncthreads that
// every thread reaches only once it has read the buffer, so one barrier per reduction suffices.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & (kWarp - 1), wid = threadIdx.x / kWarp;
  if (lane == 0) red[wid] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? red[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float2 block_sum2(float2 v, float2* red) {
  v = warp_sum2(v);
  const int lane = threadIdx.x & (kWarp - 1), wid = threadIdx.x / kWarp;
  if (lane == 0) red[wid] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? red[lane] : make_float2(0.f, 0.f);
  return warp_sum2(v);
}

// ------------------------------------------------------------------------------------------
// forward
// ------------------------------------------------------------------------------------------
struct FwdK {
  int64_t B, N;
  int C;
  float cf, eps;
  bool is_rms, gated;
  KRow x, y;
  KPar gate, shift, scale;
  const float* w;
  const float* bias;
  bool w_vec, b_vec;
  void* out;
  void* h;
  bool out_vec, h_vec;
  float* mean;
  float* rstd;
};

// WARP: one warp per row (rows_per_block = blockDim.x / 32), else one block per row.
template <typename T, typename P, int VEC, int KMAX, bool WARP>
__global__ void __launch_bounds__(WARP ? kFwdWarpBlock : kFwdMaxBlock)
adaln_fwd_kernel(const FwdK a) {
  __shared__ float red[2][kWarp];
  __shared__ float2 red2[2][kWarp];  // (reduction k uses buffer k & 1 of whichever it takes)
  const int NT = WARP ? kWarp : static_cast<int>(blockDim.x);
  const int t = WARP ? static_cast<int>(threadIdx.x & (kWarp - 1)) : static_cast<int>(threadIdx.x);
  const int64_t rpb = WARP ? static_cast<int64_t>(blockDim.x / kWarp) : 1;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rpb;
  const int64_t rows = a.B * a.N;
  const int nchunks = a.C / VEC;
  int rb = 0;  // alternating reduction buffer (block path)

  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rpb + (WARP ? threadIdx.x / kWarp : 0);
       row < rows; row += step) {
    const int64_t b = row / a.N, n = row - b * a.N;
    const T* xr = row_ptr<T>(a.x, b, n);

    // ---- h = round_T(x + gate * y) (gated) or x, in fp32 registers; masked chunks are 0
    float hv[KMAX][VEC];
    if (a.gated) {
      const T* yr = row_ptr<T>(a.y, b, n);
      const P* gr = par_ptr<P>(a.gate, b, n);
      T* hr = static_cast<T*>(a.h) + row * a.C;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        const int j = t + k * NT;
        if (j < nchunks) {
          const int c0 = j * VEC;
          float xv[VEC], yv[VEC], gv[VEC];
          Chunk<T, VEC>::load(xr + c0 * a.x.sc, a.x.sc, a.x.vec, xv);
          Chunk<T, VEC>::load(yr + c0 * a.y.sc, a.y.sc, a.y.vec, yv);
          Chunk<P, VEC>::load(gr + c0 * a.gate.sc, a.gate.sc, a.gate.vec, gv);
#pragma unroll
          for (int v = 0; v < VEC; ++v)  // x + (gate * y), two IEEE roundings as in the contract
            hv[k][v] = Elem<T>::round(__fadd_rn(xv[v], __fmul_rn(gv[v], yv[v])));
          Chunk<T, VEC>::store(hr + c0, hv[k], a.h_vec);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) hv[k][v] = 0.f;
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        const int j = t + k * NT;
        if (j < nchunks) {
          const int c0 = j * VEC;
          Chunk<T, VEC>::load(xr + c0 * a.x.sc, a.x.sc, a.x.vec, hv[k]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) hv[k][v] = 0.f;
        }
      }
    }

    // ---- statistics (fp32)
    float mu = 0.f, ss = 0.f;
    if (a.is_rms) {
      float q = 0.f;
#pragma unroll
      for (int k = 0; k < KMAX; ++k)
#pragma unroll
        for (int v = 0; v < VEC; ++v) q += hv[k][v] * hv[k][v];  // masked chunks are 0
      if constexpr (WARP) {
        ss = warp_sum(q);
      } else {
        ss = block_sum(q, red[rb & 1]);
        ++rb;
      }
    } else {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < KMAX; ++k)
#pragma unroll
        for (int v = 0; v < VEC; ++v) s += hv[k][v];
      if constexpr (WARP) {
        s = warp_sum(s);
      } else {
        s = block_sum(s, red[rb & 1]);
        ++rb;
      }
      // corrected two-pass (as the C++ and Triton kernels): the sum of the deviations from
      // the first mean m takes out its rounding (a row of one value: mean exact, variance 0)
      const float m = s / a.cf;
      float2 dq = make_float2(0.f, 0.f);  // sum(d), sum(d * d), d = h - m
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        if (t + k * NT < nchunks) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const float d = hv[k][v] - m;
            dq.x += d;
            dq.y += d * d;
          }
        }
      }
      if constexpr (WARP) {
        dq = warp_sum2(dq);
      } else {
        dq = block_sum2(dq, red2[rb & 1]);
        ++rb;
      }
      const float corr = dq.x / a.cf;
      mu = m + corr;
      ss = fmaxf(dq.y - corr * dq.x, 0.f);
    }
    const float rs = rsqrtf(ss / a.cf + a.eps);

    // ---- out = (xhat * w + b) * (1 + scale) + shift
    const P* shr = par_ptr<P>(a.shift, b, n);
    const P* scr = par_ptr<P>(a.scale, b, n);
    T* outr = static_cast<T*>(a.out) + row * a.C;
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      const int j = t + k * NT;
      if (j < nchunks) {
        const int c0 = j * VEC;
        float shv[VEC], scv[VEC], wv[VEC], bv[VEC], o[VEC];
        Chunk<P, VEC>::load(shr + c0 * a.shift.sc, a.shift.sc, a.shift.vec, shv);
        Chunk<P, VEC>::load(scr + c0 * a.scale.sc, a.scale.sc, a.scale.vec, scv);
        if (a.w != nullptr) {
          Chunk<float, VEC>::load(a.w + c0, 1, a.w_vec, wv);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) wv[v] = 1.f;
        }
        if (a.bias != nullptr) {
          Chunk<float, VEC>::load(a.bias + c0, 1, a.b_vec, bv);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) bv[v] = 0.f;
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float nrm = (hv[k][v] - mu) * rs * wv[v] + bv[v];
          o[v] = nrm * (1.f + scv[v]) + shv[v];
        }
        Chunk<T, VEC>::store(outr + c0, o, a.out_vec);
      }
    }
    if (t == 0) {
      a.mean[row] = mu;
      a.rstd[row] = rs;
    }
  }
}

// ------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------
struct BwdK {
  int64_t B, N, R, NC;
  int C;
  float cf;
  bool is_rms;
  bool acc_smem;         // accumulators in dynamic shared memory, else in place in the buffers
  KRow dout, dh, hx, y;  // dh.p / y.p null when absent
  KPar gate, scale;      // gate.p null when absent
  const float* w;
  const float* bias;
  bool w_vec, b_vec;
  const float* mean;
  const float* rstd;
  int64_t m_sb, m_sn, r_sb, r_sn;
  void* dx;
  void* dy;
  bool dx_vec, dy_vec;
  KGrad dgate, dshift, dscale;
  float* dw;
  float* db;
  bool dw_vec, db_vec;
  // offsets (floats) of the accumulator rows in dynamic shared memory (acc_smem)
  int off_gate, off_shift, off_scale, off_w, off_b;
};

// Running fp32 sums of the partial gradients over the rows of the current chunk
// (item = b * NC + chunk):
//   * parameter gradient in kPartial mode, buffer [B, NC, 2, C]: slot 0 sums the rows with
//     n / tpr == g_lo = n0 / tpr, slot 1 those with n / tpr == g_lo + 1, i.e. the rows
//     n >= sw = (g_lo + 1) * tpr (R <= tpr, so no chunk reaches g_lo + 2); slot 1 is written as
//     zeros when no row falls in it;
//   * dweight / dbias, buffer [B, NC, C]: one row, the sum over all the chunk's rows (sw = +inf).
// The sum lives either in a shared-memory row (acc_smem; copied to the slot's global row once
// the slot is complete) or directly in the global row of the slot. Either way the first row of a
// slot overwrites (the buffers are not zeroed) and later rows read-add-write; a thread only ever
// touches its own chunks, so no barrier and no atomic is involved.
__device__ __forceinline__ float* slot_row(void* buf, int64_t item, int64_t slot, int C) {
  return static_cast<float*>(buf) + (item * 2 + slot) * C;
}

template <int VEC>
__device__ __forceinline__ void rmw(float* p, bool first, bool vec, const float (&val)[VEC]) {
  if (first) {
    Chunk<float, VEC>::store(p, val, vec);
  } else {
    float cur[VEC];
    load_rw<VEC>(p, vec, cur);
#pragma unroll
    for (int v = 0; v < VEC; ++v) cur[v] += val[v];
    Chunk<float, VEC>::store(p, cur, vec);
  }
}

// Add one chunk (channel c0) of a row's value to the running sum.
template <int VEC>
__device__ __forceinline__ void acc_add(bool smem, float* sm_row, float* g_row, bool first,
                                        bool gvec, int c0, const float (&val)[VEC]) {
  if (smem) {
    rmw<VEC>(sm_row + c0, first, VEC % 4 == 0, val);  // smem rows are 16-byte aligned if VEC >= 4
  } else {
    rmw<VEC>(g_row + c0, first, gvec, val);
  }
}

// Copy this thread's chunks of a shared-memory accumulator row to a global row.
template <int VEC, int KMAX>
__device__ __forceinline__ void acc_copy(const float* src, float* dst, bool vec, int t, int NT,
                                         int nchunks) {
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    const int j = t + k * NT;
    if (j < nchunks) {
      float v[VEC];
      load_rw<VEC>(src + j * VEC, VEC % 4 == 0, v);
      Chunk<float, VEC>::store(dst + j * VEC, v, vec);
    }
  }
}

template <int VEC, int KMAX>
__device__ __forceinline__ void store_zeros(float* dst, bool vec, int t, int NT, int nchunks) {
  float z[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) z[v] = 0.f;
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    const int j = t + k * NT;
    if (j < nchunks) Chunk<float, VEC>::store(dst + j * VEC, z, vec);
  }
}

// After the chunk's last row (n1 - 1), for a two-slot partial.
template <int VEC, int KMAX>
__device__ __forceinline__ void slots_end(bool smem, const float* sm_row, const KGrad& g,
                                          int64_t item, int64_t sw, int64_t n1, int C, int t,
                                          int NT, int nchunks) {
  const bool used1 = sw < n1;  // slot 1 got rows (slot 0 was then copied out at row sw)
  if (smem) acc_copy<VEC, KMAX>(sm_row, slot_row(g.p, item, used1 ? 1 : 0, C), g.vec, t, NT, nchunks);
  if (!used1) store_zeros<VEC, KMAX>(slot_row(g.p, item, 1, C), g.vec, t, NT, nchunks);
}

// One block per (b, chunk of R rows); blockDim.x = NT threads share each row.
// MAXT <= 512 leaves registers to read dh and y before the row reduction (one memory round trip
// per row instead of two).
template <typename T, typename P, int VEC, int KMAX, int MAXT>
__global__ void __launch_bounds__(MAXT) adaln_bwd_kernel(const BwdK a) {
  constexpr bool kPrefetch = MAXT <= 512;
  constexpr int KP = kPrefetch ? KMAX : 1;
  extern __shared__ float4 smem_acc[];
  __shared__ float2 red[2][kWarp];
  float* const sacc = reinterpret_cast<float*>(smem_acc);

  const int NT = static_cast<int>(blockDim.x);
  const int t = static_cast<int>(threadIdx.x);
  const int C = a.C;
  const int nchunks = C / VEC;
  const int64_t items = a.B * a.NC;
  const bool smem = a.acc_smem;
  const bool has_w = a.w != nullptr, has_b = a.bias != nullptr, has_dh = a.dh.p != nullptr;
  const bool want_dy = a.dy != nullptr;
  const bool pg = a.dgate.mode == GradMode::kPartial, tg = a.dgate.mode == GradMode::kPerToken;
  const bool ps = a.dshift.mode == GradMode::kPartial, ts = a.dshift.mode == GradMode::kPerToken;
  const bool pc = a.dscale.mode == GradMode::kPartial, tc = a.dscale.mode == GradMode::kPerToken;
  const bool want_dgate = pg || tg;
  const bool want_w = a.dw != nullptr, want_b = a.db != nullptr;
  int rb = 0;  // alternating reduction buffer

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t b = item / a.NC, ch = item - b * a.NC;
    const int64_t n0 = ch * a.R;
    const int64_t n1 = n0 + a.R < a.N ? n0 + a.R : a.N;
    // first row of slot 1 of each two-slot partial
    const int64_t sw_g = pg ? (n0 / a.dgate.tpr + 1) * a.dgate.tpr : 0;
    const int64_t sw_s = ps ? (n0 / a.dshift.tpr + 1) * a.dshift.tpr : 0;
    const int64_t sw_c = pc ? (n0 / a.dscale.tpr + 1) * a.dscale.tpr : 0;
    float* const dw_row = want_w ? a.dw + item * C : nullptr;
    float* const db_row = want_b ? a.db + item * C : nullptr;

    for (int64_t n = n0; n < n1; ++n) {
      const int64_t row = b * a.N + n;
      const bool first = n == n0;
      if (smem) {  // slot 0 complete when row n opens slot 1: copy it out
        if (pg && n == sw_g)
          acc_copy<VEC, KMAX>(sacc + a.off_gate, slot_row(a.dgate.p, item, 0, C), a.dgate.vec, t, NT, nchunks);
        if (ps && n == sw_s)
          acc_copy<VEC, KMAX>(sacc + a.off_shift, slot_row(a.dshift.p, item, 0, C), a.dshift.vec, t, NT, nchunks);
        if (pc && n == sw_c)
          acc_copy<VEC, KMAX>(sacc + a.off_scale, slot_row(a.dscale.p, item, 0, C), a.dscale.vec, t, NT, nchunks);
      }

      const float mu = __ldg(a.mean + b * a.m_sb + n * a.m_sn);
      const float rs = __ldg(a.rstd + b * a.r_sb + n * a.r_sn);
      const T* hr = row_ptr<T>(a.hx, b, n);
      const T* dor = row_ptr<T>(a.dout, b, n);
      const P* scr = par_ptr<P>(a.scale, b, n);
      const T* dhr = has_dh ? row_ptr<T>(a.dh, b, n) : nullptr;
      const T* yr = want_dgate ? row_ptr<T>(a.y, b, n) : nullptr;

      // ---- pass 1: xhat, dxhat kept in registers; the gradients that do not need g
      float xh[KMAX][VEC], dxh[KMAX][VEC], dhv[KP][VEC], yv[KP][VEC];
      float s1 = 0.f, s2 = 0.f;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        const int j = t + k * NT;
        if (j < nchunks) {
          const int c0 = j * VEC;
          float hv[VEC], dov[VEC], scv[VEC], wv[VEC], bv[VEC], dn[VEC];
          Chunk<T, VEC>::load(hr + c0 * a.hx.sc, a.hx.sc, a.hx.vec, hv);
          Chunk<T, VEC>::load(dor + c0 * a.dout.sc, a.dout.sc, a.dout.vec, dov);
          if constexpr (kPrefetch) {
            if (has_dh) Chunk<T, VEC>::load(dhr + c0 * a.dh.sc, a.dh.sc, a.dh.vec, dhv[k]);
            if (want_dgate) Chunk<T, VEC>::load(yr + c0 * a.y.sc, a.y.sc, a.y.vec, yv[k]);
          }
          Chunk<P, VEC>::load(scr + c0 * a.scale.sc, a.scale.sc, a.scale.vec, scv);
          if (has_w) {
            Chunk<float, VEC>::load(a.w + c0, 1, a.w_vec, wv);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) wv[v] = 1.f;
          }
          if (has_b) {
            Chunk<float, VEC>::load(a.bias + c0, 1, a.b_vec, bv);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) bv[v] = 0.f;
          }
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            xh[k][v] = (hv[v] - mu) * rs;
            dn[v] = dov[v] * (1.f + scv[v]);
            dxh[k][v] = dn[v] * wv[v];
            s1 += dxh[k][v];
            s2 += dxh[k][v] * xh[k][v];
          }
          // dshift = dout
          if (ps)
            acc_add<VEC>(smem, sacc + a.off_shift, slot_row(a.dshift.p, item, n >= sw_s, C),
                         first || n == sw_s, a.dshift.vec, c0, dov);
          else if (ts) store_dyn<VEC>(a.dshift.p, a.dshift.dtype, row * C + c0, dov, a.dshift.vec);
          // dscale = dout * nrm
          if (pc || tc) {
            float d[VEC];
#pragma unroll
            for (int v = 0; v < VEC; ++v) d[v] = dov[v] * (xh[k][v] * wv[v] + bv[v]);
            if (pc)
              acc_add<VEC>(smem, sacc + a.off_scale, slot_row(a.dscale.p, item, n >= sw_c, C),
                           first || n == sw_c, a.dscale.vec, c0, d);
            else store_dyn<VEC>(a.dscale.p, a.dscale.dtype, row * C + c0, d, a.dscale.vec);
          }
          // dweight = dn * xhat, dbias = dn
          if (want_w) {
            float d[VEC];
#pragma unroll
            for (int v = 0; v < VEC; ++v) d[v] = dn[v] * xh[k][v];
            acc_add<VEC>(smem, sacc + a.off_w, dw_row, first, a.dw_vec, c0, d);
          }
          if (want_b) acc_add<VEC>(smem, sacc + a.off_b, db_row, first, a.db_vec, c0, dn);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) xh[k][v] = dxh[k][v] = 0.f;
        }
      }

      // ---- row reductions: mean_c(dxhat), mean_c(dxhat * xhat)
      const float2 r = block_sum2(make_float2(s1, s2), red[rb & 1]);
      ++rb;
      const float mdx = r.x / a.cf, proj = r.y / a.cf;

      // ---- pass 2: g, dx, dy, dgate
      const P* gr = want_dy ? par_ptr<P>(a.gate, b, n) : nullptr;
      T* dxr = static_cast<T*>(a.dx) + row * C;
      T* dyr = want_dy ? static_cast<T*>(a.dy) + row * C : nullptr;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        const int j = t + k * NT;
        if (j < nchunks) {
          const int c0 = j * VEC;
          float g[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            float gv = dxh[k][v] - xh[k][v] * proj;
            if (!a.is_rms) gv -= mdx;
            g[v] = gv * rs;
          }
          if (has_dh) {
            if constexpr (kPrefetch) {
#pragma unroll
              for (int v = 0; v < VEC; ++v) g[v] += dhv[k][v];
            } else {
              float d[VEC];
              Chunk<T, VEC>::load(dhr + c0 * a.dh.sc, a.dh.sc, a.dh.vec, d);
#pragma unroll
              for (int v = 0; v < VEC; ++v) g[v] += d[v];
            }
          }
          Chunk<T, VEC>::store(dxr + c0, g, a.dx_vec);
          if (want_dy) {  // dy = g * gate
            float gt[VEC], d[VEC];
            Chunk<P, VEC>::load(gr + c0 * a.gate.sc, a.gate.sc, a.gate.vec, gt);
#pragma unroll
            for (int v = 0; v < VEC; ++v) d[v] = g[v] * gt[v];
            Chunk<T, VEC>::store(dyr + c0, d, a.dy_vec);
          }
          if (want_dgate) {  // dgate = g * y
            float d[VEC];
            if constexpr (kPrefetch) {
#pragma unroll
              for (int v = 0; v < VEC; ++v) d[v] = g[v] * yv[k][v];
            } else {
              float y[VEC];
              Chunk<T, VEC>::load(yr + c0 * a.y.sc, a.y.sc, a.y.vec, y);
#pragma unroll
              for (int v = 0; v < VEC; ++v) d[v] = g[v] * y[v];
            }
            if (pg)
              acc_add<VEC>(smem, sacc + a.off_gate, slot_row(a.dgate.p, item, n >= sw_g, C),
                           first || n == sw_g, a.dgate.vec, c0, d);
            else store_dyn<VEC>(a.dgate.p, a.dgate.dtype, row * C + c0, d, a.dgate.vec);
          }
        }
      }
    }

    if (pg) slots_end<VEC, KMAX>(smem, sacc + a.off_gate, a.dgate, item, sw_g, n1, C, t, NT, nchunks);
    if (ps) slots_end<VEC, KMAX>(smem, sacc + a.off_shift, a.dshift, item, sw_s, n1, C, t, NT, nchunks);
    if (pc) slots_end<VEC, KMAX>(smem, sacc + a.off_scale, a.dscale, item, sw_c, n1, C, t, NT, nchunks);
    if (smem && want_w) acc_copy<VEC, KMAX>(sacc + a.off_w, dw_row, a.dw_vec, t, NT, nchunks);
    if (smem && want_b) acc_copy<VEC, KMAX>(sacc + a.off_b, db_row, a.db_vec, t, NT, nchunks);
  }
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------
size_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

bool dtype_valid(DType d) {
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte chunk accesses need every chunk start (c0 = j * VEC, C % VEC == 0) 16-byte aligned
// relative to the row start, i.e. VEC * element size a multiple of 16.
bool chunk_vec_ok(int vec, size_t es) { return vec > 1 && (vec * es) % 16 == 0; }

// An outer stride keeps rows 16-byte aligned (irrelevant for a dimension of size <= 1).
bool stride_ok(int64_t stride, int64_t size, size_t es) {
  return size <= 1 || (stride * static_cast<int64_t>(es)) % 16 == 0;
}

KRow make_row(const RowTensor& r, int64_t B, int64_t N, int vec, size_t es) {
  KRow k{r.ptr, r.sb, r.sn, r.sc, false};
  k.vec = r.ptr != nullptr && chunk_vec_ok(vec, es) && r.sc == 1 && aligned16(r.ptr) &&
          stride_ok(r.sb, B, es) && stride_ok(r.sn, N, es);
  return k;
}

// Row of token n of batch b: [b if Bp == B else 0, n / (N / F)]; with Bp == 1 the batch stride
// is replaced by 0 (when Bp == B == 1, b is 0 anyway).
KPar make_par(const ParamTensor& p, int64_t N, int vec, size_t es) {
  KPar k{p.ptr, p.size_b == 1 ? 0 : p.sb, p.sf, p.sc, p.size_f > 0 ? N / p.size_f : 1, false};
  k.vec = p.ptr != nullptr && chunk_vec_ok(vec, es) && p.sc == 1 && aligned16(p.ptr) &&
          stride_ok(k.sb, p.size_b, es) && stride_ok(p.sf, p.size_f, es);
  return k;
}

// Contiguous [rows, C] buffer with element size es.
bool contig_vec_ok(const void* p, int64_t C, int vec, size_t es) {
  return p != nullptr && chunk_vec_ok(vec, es) && aligned16(p) &&
         (C * static_cast<int64_t>(es)) % 16 == 0;
}

KGrad make_grad(const ParamGrad& g, int64_t C, int vec) {
  KGrad k{g.ptr, g.ptr != nullptr ? g.mode : GradMode::kNone, g.dtype, g.tpr, false};
  if (k.mode == GradMode::kPartial) k.dtype = DType::kFloat32;
  k.vec = k.mode != GradMode::kNone && contig_vec_ok(g.ptr, C, vec, dtype_size(k.dtype));
  return k;
}

bool param_ok(const ParamTensor& p, int64_t B, int64_t N) {
  return p.ptr != nullptr && (p.size_b == 1 || p.size_b == B) && p.size_f >= 1 &&
         N % p.size_f == 0;
}

int round_up_warp(int64_t n) {
  const int64_t r = (n + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(r < kWarp ? kWarp : r);
}

unsigned grid_for(int64_t blocks) {
  return static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX);
}

// ---- forward launch
template <typename T, typename P, int VEC, int KMAX, bool WARP>
cudaError_t launch_fwd(const FwdK& k, int64_t nchunks, cudaStream_t stream) {
  const int threads = WARP ? kFwdWarpBlock : round_up_warp((nchunks + KMAX - 1) / KMAX);
  const int64_t rows = k.B * k.N;
  const int64_t rpb = WARP ? threads / kWarp : 1;
  adaln_fwd_kernel<T, P, VEC, KMAX, WARP>
      <<<grid_for((rows + rpb - 1) / rpb), threads, 0, stream>>>(k);
  return cudaGetLastError();
}

template <typename T, typename P, int VEC>
cudaError_t fwd_vec(const FwdArgs& a, cudaStream_t stream) {
  const size_t et = sizeof(T), ep = sizeof(P);
  FwdK k;
  k.B = a.B;
  k.N = a.N;
  k.C = static_cast<int>(a.C);
  k.cf = static_cast<float>(a.C);
  k.eps = a.eps;
  k.is_rms = a.is_rms;
  k.gated = a.y.ptr != nullptr;
  k.x = make_row(a.x, a.B, a.N, VEC, et);
  k.y = make_row(a.y, a.B, a.N, VEC, et);
  k.gate = make_par(a.gate, a.N, VEC, ep);
  k.shift = make_par(a.shift, a.N, VEC, ep);
  k.scale = make_par(a.scale, a.N, VEC, ep);
  k.w = a.weight;
  k.bias = a.bias;
  k.w_vec = a.weight != nullptr && chunk_vec_ok(VEC, 4) && aligned16(a.weight);
  k.b_vec = a.bias != nullptr && chunk_vec_ok(VEC, 4) && aligned16(a.bias);
  k.out = a.out;
  k.h = a.h;
  k.out_vec = contig_vec_ok(a.out, a.C, VEC, et);
  k.h_vec = contig_vec_ok(a.h, a.C, VEC, et);
  k.mean = a.mean;
  k.rstd = a.rstd;

  // Elements per thread: 8 up to C = 2048 (NT <= 256), 16 up to 8192 (NT <= 512), else 32
  // (NT <= 512); C <= 256: a warp per row with 8 elements per lane.
  const int64_t nchunks = a.C / VEC;
  if (a.C <= 256) return launch_fwd<T, P, VEC, 8 / VEC, true>(k, nchunks, stream);
  if (a.C <= 2048) return launch_fwd<T, P, VEC, 8 / VEC, false>(k, nchunks, stream);
  if (a.C <= 8192) return launch_fwd<T, P, VEC, 16 / VEC, false>(k, nchunks, stream);
  return launch_fwd<T, P, VEC, 32 / VEC, false>(k, nchunks, stream);
}

template <typename T, typename P>
cudaError_t fwd_typed(const FwdArgs& a, cudaStream_t stream) {
  constexpr int kV = 16 / static_cast<int>(sizeof(T));
  if (a.C % kV == 0) return fwd_vec<T, P, kV>(a, stream);
  return fwd_vec<T, P, 1>(a, stream);
}

// ---- backward launch
template <typename T, typename P, int VEC, int KMAX, int MAXT>
cudaError_t launch_bwd(BwdK k, int64_t nchunks, cudaStream_t stream) {
  const int threads = round_up_warp((nchunks + KMAX - 1) / KMAX);
  auto kernel = adaln_bwd_kernel<T, P, VEC, KMAX, MAXT>;
  // one shared-memory accumulator row per partial gradient asked for
  int nacc = 0;
  k.off_gate = k.dgate.mode == GradMode::kPartial ? k.C * nacc++ : 0;
  k.off_shift = k.dshift.mode == GradMode::kPartial ? k.C * nacc++ : 0;
  k.off_scale = k.dscale.mode == GradMode::kPartial ? k.C * nacc++ : 0;
  k.off_w = k.dw != nullptr ? k.C * nacc++ : 0;
  k.off_b = k.db != nullptr ? k.C * nacc++ : 0;
  size_t smem = static_cast<size_t>(nacc) * static_cast<size_t>(k.C) * sizeof(float);
  k.acc_smem = true;
  if (smem + sizeof(float2) * 2 * kWarp > 48 * 1024) {  // beyond the default: opt in, or fall back
    int dev = 0, optin = 0;
    cudaFuncAttributes attr;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    const size_t avail = static_cast<size_t>(optin) > attr.sharedSizeBytes
                             ? static_cast<size_t>(optin) - attr.sharedSizeBytes
                             : 0;
    if (smem <= avail) {
      // Always the device's whole allowance (not `smem`): a value that only ever goes up cannot
      // race with a concurrent host thread launching the same kernel with a larger C.
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(avail));
      if (err != cudaSuccess) return err;
    } else {  // accumulate in place in the (float32) partial buffers instead
      k.acc_smem = false;
      smem = 0;
    }
  }
  kernel<<<grid_for(k.B * k.NC), threads, smem, stream>>>(k);
  return cudaGetLastError();
}

template <typename T, typename P, int VEC>
cudaError_t bwd_vec(const BwdArgs& a, cudaStream_t stream) {
  const size_t et = sizeof(T), ep = sizeof(P);
  BwdK k;
  k.B = a.B;
  k.N = a.N;
  k.R = a.rows_per_chunk;
  k.NC = (a.N + a.rows_per_chunk - 1) / a.rows_per_chunk;
  k.C = static_cast<int>(a.C);
  k.cf = static_cast<float>(a.C);
  k.is_rms = a.is_rms;
  k.acc_smem = true;
  k.dout = make_row(a.dout, a.B, a.N, VEC, et);
  k.dh = make_row(a.dh, a.B, a.N, VEC, et);
  k.hx = make_row(a.hx, a.B, a.N, VEC, et);
  k.y = make_row(a.y, a.B, a.N, VEC, et);
  k.gate = make_par(a.gate, a.N, VEC, ep);
  k.scale = make_par(a.scale, a.N, VEC, ep);
  k.w = a.weight;
  k.bias = a.bias;
  k.w_vec = a.weight != nullptr && chunk_vec_ok(VEC, 4) && aligned16(a.weight);
  k.b_vec = a.bias != nullptr && chunk_vec_ok(VEC, 4) && aligned16(a.bias);
  k.mean = a.mean;
  k.rstd = a.rstd;
  k.m_sb = a.mean_sb;
  k.m_sn = a.mean_sn;
  k.r_sb = a.rstd_sb;
  k.r_sn = a.rstd_sn;
  k.dx = a.dx;
  k.dy = a.dy;
  k.dx_vec = contig_vec_ok(a.dx, a.C, VEC, et);
  k.dy_vec = contig_vec_ok(a.dy, a.C, VEC, et);
  k.dgate = make_grad(a.dgate, a.C, VEC);
  k.dshift = make_grad(a.dshift, a.C, VEC);
  k.dscale = make_grad(a.dscale, a.C, VEC);
  k.dw = a.dweight;
  k.db = a.dbias;
  k.dw_vec = contig_vec_ok(a.dweight, a.C, VEC, 4);
  k.db_vec = contig_vec_ok(a.dbias, a.C, VEC, 4);
  k.off_gate = k.off_shift = k.off_scale = k.off_w = k.off_b = 0;

  // Elements per thread: 8 up to C = 4096 (NT <= 512), 16 above (NT <= 512 up to 8192, <= 1024).
  const int64_t nchunks = a.C / VEC;
  if (a.C <= 4096) return launch_bwd<T, P, VEC, 8 / VEC, 512>(k, nchunks, stream);
  if (a.C <= 8192) return launch_bwd<T, P, VEC, 16 / VEC, 512>(k, nchunks, stream);
  return launch_bwd<T, P, VEC, 16 / VEC, 1024>(k, nchunks, stream);
}

template <typename T, typename P>
cudaError_t bwd_typed(const BwdArgs& a, cudaStream_t stream) {
  constexpr int kV = 16 / static_cast<int>(sizeof(T));
  if (a.C % kV == 0) return bwd_vec<T, P, kV>(a, stream);
  return bwd_vec<T, P, 1>(a, stream);
}

template <typename T, typename P>
struct FwdRun {
  static cudaError_t run(const FwdArgs& a, cudaStream_t s) { return fwd_typed<T, P>(a, s); }
};

template <typename T, typename P>
struct BwdRun {
  static cudaError_t run(const BwdArgs& a, cudaStream_t s) { return bwd_typed<T, P>(a, s); }
};

// (T, P) dispatch: P is T or float32.
template <template <typename, typename> class F, typename A>
cudaError_t dispatch(DType t, DType p, const A& args, cudaStream_t stream) {
  const bool pf = p == DType::kFloat32;
  switch (t) {
    case DType::kFloat32:
      if (pf) return F<float, float>::run(args, stream);
      break;
    case DType::kFloat16:
      if (pf) return F<__half, float>::run(args, stream);
      if (p == DType::kFloat16) return F<__half, __half>::run(args, stream);
      break;
    case DType::kBFloat16:
      if (pf) return F<__nv_bfloat16, float>::run(args, stream);
      if (p == DType::kBFloat16) return F<__nv_bfloat16, __nv_bfloat16>::run(args, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t adaln_fwd_launch(const FwdArgs& a, cudaStream_t stream) {
  if (a.B < 0 || a.N < 0 || a.C < 1 || a.C > kMaxChannels) return cudaErrorInvalidValue;
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  const bool gated = a.y.ptr != nullptr;
  if (a.x.ptr == nullptr || a.out == nullptr || a.mean == nullptr || a.rstd == nullptr ||
      !param_ok(a.shift, a.B, a.N) || !param_ok(a.scale, a.B, a.N) ||
      (gated && (a.h == nullptr || !param_ok(a.gate, a.B, a.N))))
    return cudaErrorInvalidValue;
  return dispatch<FwdRun>(a.x_dtype, a.param_dtype, a, stream);
}

cudaError_t adaln_bwd_launch(const BwdArgs& a, cudaStream_t stream) {
  if (a.B < 0 || a.N < 0 || a.C < 1 || a.C > kMaxChannels || a.rows_per_chunk < 1)
    return cudaErrorInvalidValue;
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  if (a.dout.ptr == nullptr || a.hx.ptr == nullptr || a.mean == nullptr || a.rstd == nullptr ||
      a.dx == nullptr || !param_ok(a.scale, a.B, a.N))
    return cudaErrorInvalidValue;
  if (a.dy != nullptr && !param_ok(a.gate, a.B, a.N)) return cudaErrorInvalidValue;
  const ParamGrad* grads[3] = {&a.dgate, &a.dshift, &a.dscale};
  for (const ParamGrad* g : grads) {
    if (g->ptr == nullptr || g->mode == GradMode::kNone) continue;
    if (g->mode == GradMode::kPartial) {
      if (g->tpr < a.rows_per_chunk) return cudaErrorInvalidValue;  // R <= tpr
    } else if (g->mode != GradMode::kPerToken || !dtype_valid(g->dtype)) {
      return cudaErrorInvalidValue;
    }
  }
  if (a.dgate.ptr != nullptr && a.dgate.mode != GradMode::kNone && a.y.ptr == nullptr)
    return cudaErrorInvalidValue;
  return dispatch<BwdRun>(a.x_dtype, a.param_dtype, a, stream);
}

}  // namespace adaln
}  // namespace vidgen
