// GGUF quantized blocks -> normengine's int4 / int8-weight packing (see gguf_blocks.h).
//
// Every block type decodes to the same form: codes u_i (small unsigned integers), a scale s_j per group of
// 16 or 32 elements and either an offset o_j (values s_j u_i - o_j) or a fixed bias c (values s_j (u_i - c)):
//
//   type  block  bytes  group  values                      layout (ggml's block_*)
//   Q4_0    32     18    32    d (u - 8)                   d f16, 16 bytes of nibbles
//   Q4_1    32     20    32    d u + m                     d, m f16, nibbles                    (o = -m)
//   Q5_0    32     22    32    d (u - 16)                  d, u32 of 5th bits, nibbles
//   Q5_1    32     24    32    d u + m                     d, m, 5th bits, nibbles               (o = -m)
//   Q8_0    32     34    32    d q                         d, 32 int8 (signed codes, c = 0)
//   Q2_K   256     84    16    d sc_j u - dmin m_j         4-bit sc / m, 2-bit codes, d, dmin
//   Q3_K   256    110    16    d (sc_j - 32) (u - 4)       high-bit mask, 2-bit codes, 6-bit sc, d
//   Q4_K   256    144    32    d sc_j u - dmin m_j         d, dmin, 6-bit sc / m, nibbles
//   Q5_K   256    176    32    d sc_j u - dmin m_j         d, dmin, 6-bit sc / m, 5th bits, nibbles
//   Q6_K   256    210    16    d sc_j (u - 32)             low nibbles, 2-bit highs, int8 sc, d
//
// (d sc_j and dmin m_j are float32 products, as ggml's dequantization computes them.) The packings:
//   int8-weight, no offset:  q = u - c, s = scale                            (exact)
//   int4 (u in 0..15):       q = u, s = scale, z = c (Q4_0: 8)               (exact)
//   with an offset:          q = u, s = scale, z = o / s                     ((q - z) s = s u - o to float32
//                            rounding); a group of s = 0 and o != 0 (all its values -o) becomes q = 0, s = o,
//                            z = 1, exactly -o; s = 0 and o = 0: z = 0
// the same operations, in the same float32 arithmetic, as the numpy reference (gguf.py _zero_points).
// Two-level (the K-quants into QWeight::sub; GgufUnpackArgs::sub set): the block's d (and dmin) and its groups'
// integers sc_j (and m_j) kept as they are, codes as above; the kernels form d sc_j and dmin m_j, exactly ggml's.
#include "model/gguf_blocks.h"

#include <cstring>

#include "core/half.h"
#include "core/parallel.h"
#include "normengine/errors.h"

namespace ne {
namespace {

// One decoded block: codes u (Q8_0: signed), a scale and an offset per group; the K-quants also their parts,
// s_j = d sc_j and o_j = dmin m_j.
struct Block {
  int16_t u[256];
  float s[16], o[16];
  float d, dmin;
  int8_t sc[16], m[16];
};

enum class T { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, None };

struct TypeInfo {
  const char* name;
  T t;
  int elems, bytes, group;
  bool offset;  // values s u - o (else s (u - bias))
  int bias;
};

constexpr TypeInfo kTypes[] = {
    {"Q4_0", T::Q4_0, 32, 18, 32, false, 8},   {"Q4_1", T::Q4_1, 32, 20, 32, true, 0},
    {"Q5_0", T::Q5_0, 32, 22, 32, false, 16},  {"Q5_1", T::Q5_1, 32, 24, 32, true, 0},
    {"Q8_0", T::Q8_0, 32, 34, 32, false, 0},   {"Q2_K", T::Q2_K, 256, 84, 16, true, 0},
    {"Q3_K", T::Q3_K, 256, 110, 16, false, 4}, {"Q4_K", T::Q4_K, 256, 144, 32, true, 0},
    {"Q5_K", T::Q5_K, 256, 176, 32, true, 0},  {"Q6_K", T::Q6_K, 256, 210, 16, false, 32},
};

const TypeInfo* info_of(const std::string& type) {
  for (const auto& i : kTypes)
    if (type == i.name) return &i;
  return nullptr;
}

float f16_at(const uint8_t* p) { return f16_to_f32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }
uint32_t u32_at(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24); }

// 16 bytes of nibbles: elements 0-15 the low nibbles, 16-31 the high ones (plus bit i of qh at element i, << 4)
void nibbles32(const uint8_t* qs, uint32_t qh, int16_t* u) {
  for (int i = 0; i < 16; ++i) {
    u[i] = static_cast<int16_t>((qs[i] & 15) | (((qh >> i) & 1) << 4));
    u[i + 16] = static_cast<int16_t>((qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
  }
}

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j from 12 bytes (ggml's get_scale_min_k4)
void scale_min_k4(const uint8_t* q, int j, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void decode(T t, const uint8_t* b, Block& k) {
  switch (t) {
    case T::Q4_0: k.s[0] = f16_at(b); nibbles32(b + 2, 0, k.u); break;
    case T::Q4_1: k.s[0] = f16_at(b); k.o[0] = -f16_at(b + 2); nibbles32(b + 4, 0, k.u); break;
    case T::Q5_0: k.s[0] = f16_at(b); nibbles32(b + 6, u32_at(b + 2), k.u); break;
    case T::Q5_1: k.s[0] = f16_at(b); k.o[0] = -f16_at(b + 2); nibbles32(b + 8, u32_at(b + 4), k.u); break;
    case T::Q8_0:
      k.s[0] = f16_at(b);
      for (int i = 0; i < 32; ++i) k.u[i] = static_cast<int8_t>(b[2 + i]);
      break;
    case T::Q4_K:
    case T::Q5_K: {
      // element 64 c + l: the low nibble of qs[32 c + l]; 64 c + 32 + l: its high nibble (sub-blocks 2c, 2c + 1);
      // Q5_K: the fifth bit of element 32 j + l is bit j of qh[l]
      const bool five = t == T::Q5_K;
      const float d = f16_at(b), dmin = f16_at(b + 2);
      k.d = d;
      k.dmin = dmin;
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (five ? 48 : 16);
      for (int j = 0; j < 8; ++j) {
        int sc, m;
        scale_min_k4(b + 4, j, sc, m);
        k.s[j] = d * static_cast<float>(sc);
        k.o[j] = dmin * static_cast<float>(m);
        k.sc[j] = static_cast<int8_t>(sc);
        k.m[j] = static_cast<int8_t>(m);
        const int c = j / 2, shift = 4 * (j % 2);
        for (int l = 0; l < 32; ++l)
          k.u[32 * j + l] =
              static_cast<int16_t>(((qs[32 * c + l] >> shift) & 15) | (five ? ((qh[l] >> j) & 1) << 4 : 0));
      }
      break;
    }
    case T::Q6_K: {
      // element 128 h + 32 g + l (h the half, g 0..3): the nibble of ql[64 h + l + 32 (g & 1)] (high when g >= 2)
      // with bits 2g, 2g + 1 of qh[32 h + l] above it; scale j (int8) covers elements 16 j .. 16 j + 15
      const uint8_t *ql = b, *qh = b + 128;
      const float d = f16_at(b + 208);
      k.d = d;
      for (int j = 0; j < 16; ++j) {
        k.sc[j] = static_cast<int8_t>(b[192 + j]);
        k.s[j] = d * static_cast<float>(k.sc[j]);
      }
      for (int h = 0; h < 2; ++h)
        for (int g = 0; g < 4; ++g)
          for (int l = 0; l < 32; ++l) {
            const int lo = (ql[64 * h + l + 32 * (g & 1)] >> (4 * (g >> 1))) & 15;
            k.u[128 * h + 32 * g + l] = static_cast<int16_t>(lo | (((qh[32 * h + l] >> (2 * g)) & 3) << 4));
          }
      break;
    }
    case T::Q2_K: {
      // element 128 h + 32 f + l: bits 2f, 2f + 1 of qs[32 h + l]; sub-block j of 16: s = d (sc_j & 15),
      // o = dmin (sc_j >> 4)
      const uint8_t* qs = b + 16;
      const float d = f16_at(b + 80), dmin = f16_at(b + 82);
      k.d = d;
      k.dmin = dmin;
      for (int j = 0; j < 16; ++j) {
        k.sc[j] = static_cast<int8_t>(b[j] & 15);
        k.m[j] = static_cast<int8_t>(b[j] >> 4);
        k.s[j] = d * static_cast<float>(k.sc[j]);
        k.o[j] = dmin * static_cast<float>(k.m[j]);
      }
      for (int h = 0; h < 2; ++h)
        for (int f = 0; f < 4; ++f)
          for (int l = 0; l < 32; ++l)
            k.u[128 * h + 32 * f + l] = static_cast<int16_t>((qs[32 * h + l] >> (2 * f)) & 3);
      break;
    }
    case T::Q3_K: {
      // element 128 h + 32 f + l: bits 2f, 2f + 1 of qs[32 h + l], plus 4 when bit 4h + f of hmask[l] is set (the
      // values are u - 4); scale j of 6 bits: its low 4 the nibble j of bytes 0-7 (low nibbles first), its top 2
      // field j / 4 of byte 8 + j % 4; s = d (sc - 32)
      const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
      const float d = f16_at(b + 108);
      k.d = d;
      for (int j = 0; j < 16; ++j) {
        const int low = j < 8 ? sc[j] & 15 : sc[j - 8] >> 4, top = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        k.sc[j] = static_cast<int8_t>((low | (top << 4)) - 32);
        k.s[j] = d * static_cast<float>(k.sc[j]);  // (= d (sc - 32): the integer difference is exact)
      }
      for (int h = 0; h < 2; ++h)
        for (int f = 0; f < 4; ++f)
          for (int l = 0; l < 32; ++l)
            k.u[128 * h + 32 * f + l] =
                static_cast<int16_t>(((qs[32 * h + l] >> (2 * f)) & 3) | (((hm[l] >> (4 * h + f)) & 1) << 2));
      break;
    }
    case T::None:
      break;
  }
}

}  // namespace

bool gguf_unpacks(const std::string& type, bool int4) {
  const TypeInfo* i = info_of(type);
  return i && (!int4 || i->t == T::Q4_0 || i->t == T::Q4_1 || i->t == T::Q4_K || i->t == T::Q3_K || i->t == T::Q2_K);
}
int gguf_group(const std::string& type) {
  const TypeInfo* i = info_of(type);
  return i ? i->group : 0;
}
bool gguf_has_zero(const std::string& type, bool int4, bool two_level) {
  const TypeInfo* i = info_of(type);
  return i && (i->offset || (int4 && (!two_level || i->bias != 0)));
}
bool gguf_two_level(const std::string& type, bool int4) {
  const TypeInfo* i = info_of(type);
  return i && i->elems == 256 && (!int4 || i->t == T::Q4_K || i->t == T::Q3_K || i->t == T::Q2_K);
}
int64_t gguf_block_elems(const std::string& type) {
  const TypeInfo* i = info_of(type);
  return i ? i->elems : 0;
}
int64_t gguf_block_bytes(const std::string& type) {
  const TypeInfo* i = info_of(type);
  return i ? i->bytes : 0;
}

void gguf_unpack(const std::string& type, const GgufUnpackArgs& a) {
  if (!gguf_unpacks(type, a.int4))
    throw ValueError("gguf_unpack: type " + type + " does not unpack into " + (a.int4 ? "int4" : "int8-weight"));
  const TypeInfo& ti = *info_of(type);
  const int64_t nb = a.K / ti.elems, G = a.K / ti.group, per = ti.elems / ti.group;
  if (a.K % ti.elems || a.row_bytes != nb * ti.bytes)
    throw ValueError("gguf_unpack: a row of " + std::to_string(a.K) + " elements is not " +
                     std::to_string(a.row_bytes) + " bytes of " + type + " blocks");
  for (int64_t r = 0; r < a.n_rows; ++r) {
    const int64_t src = a.rows ? a.rows[r] : r;
    if (src < 0 || src >= a.src_rows)
      throw ValueError("gguf_unpack: rows[" + std::to_string(r) + "] = " + std::to_string(src) + " is not a row of " +
                       std::to_string(a.src_rows));
  }
  const bool two = a.sub != nullptr;
  if (two && !gguf_two_level(type, a.int4))
    throw ValueError("gguf_unpack: type " + type + " has no two-level scales in " + (a.int4 ? "int4" : "int8-weight"));
  if (!two && a.int4 && ti.group == 16)
    throw ValueError("gguf_unpack: type " + type + " unpacks into int4 only with two-level scales (sub)");
  const bool zeros = gguf_has_zero(type, a.int4, two);
  parallel_for(a.n_rows, 16, [&](int64_t r0, int64_t r1, int) {
    Block k;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = a.blocks + (a.rows ? a.rows[r] : r) * a.row_bytes;
      float* s = a.scale + r * (two ? nb : G);
      float* z = zeros ? a.zero + r * (two ? nb : G) : nullptr;
      for (int64_t bi = 0; bi < nb; ++bi) {
        decode(ti.t, row + bi * ti.bytes, k);
        if (two) {  // the block's d (and dmin), its groups' integer scales (and mins) as they are
          s[bi] = k.d;
          if (zeros) z[bi] = ti.offset ? k.dmin : k.d * static_cast<float>(ti.bias);  // (int4 Q3_K: o = 4 d sc_j)
          for (int j = 0; j < per; ++j) {
            a.sub[r * G + bi * per + j] = k.sc[j];
            if (zeros) a.sub_zero[r * G + bi * per + j] = ti.offset ? k.m[j] : k.sc[j];
          }
        } else {
          for (int j = 0; j < per; ++j) {
            int16_t* u = k.u + j * ti.group;
            const int64_t gi = bi * per + j;
            if (ti.offset) {
              float sj = k.s[j];
              const float oj = k.o[j];
              if (sj == 0.0f && oj != 0.0f) {  // (NaN != 0 too, as numpy's mask)
                sj = oj;
                std::memset(u, 0, sizeof(int16_t) * ti.group);
              }
              s[gi] = sj;
              z[gi] = sj != 0.0f ? oj / sj : 0.0f;
            } else {
              s[gi] = k.s[j];
              if (a.int4) z[gi] = static_cast<float>(ti.bias);
            }
          }
        }
        const int64_t k0 = bi * ti.elems;
        if (a.int4) {
          uint8_t* q = static_cast<uint8_t*>(a.codes) + r * (a.K / 2) + k0 / 2;
          for (int i = 0; i < ti.elems / 2; ++i) q[i] = static_cast<uint8_t>(k.u[2 * i] | (k.u[2 * i + 1] << 4));
        } else {
          int8_t* q = static_cast<int8_t*>(a.codes) + r * a.K + k0;
          const int c = ti.offset ? 0 : ti.bias;
          for (int i = 0; i < ti.elems; ++i) q[i] = static_cast<int8_t>(k.u[i] - c);
        }
      }
    }
  });
}

}  // namespace ne
