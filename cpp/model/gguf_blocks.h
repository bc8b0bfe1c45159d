// GGUF (llama.cpp) quantized blocks unpacked into normengine's packed weight formats, exactly: the codes
// and scales the file holds, nothing re-quantized. The reference is python/normengine/checkpoint/gguf.py
// (_int4_groups / _int8_groups over gguf_io's *_parts): the same values bit for bit, at memory speed and on
// every thread (a 7B model's file is about 4 GB).
#pragma once
#include <cstdint>
#include <string>

namespace ne {

struct GgufUnpackArgs {
  const uint8_t* blocks = nullptr;  // the tensor's rows of blocks, row_bytes each
  int64_t src_rows = 0, row_bytes = 0;
  int64_t K = 0;                    // elements a row
  const int64_t* rows = nullptr;    // the source row of each output row (null: rows 0 .. n_rows - 1)
  int64_t n_rows = 0;
  bool int4 = false;                // int4: codes uint8 [n_rows, K / 2], k = 2j the low nibble of byte j,
                                    // 2j + 1 the high; else int8 codes [n_rows, K]
  void* codes = nullptr;
  float* scale = nullptr;           // [n_rows, K / group]
  float* zero = nullptr;            // [n_rows, K / group]: w = (q - z) s; null where gguf_has_zero is false
  // Two-level (the K-quants, gguf_two_level; QWeight::sub): the blocks' scales kept as they are. scale and zero
  // then hold a block's d and dmin ([n_rows, K / 256]; zero only for the types with an offset), sub its groups'
  // integer scales sc_j ([n_rows, K / group]; Q3_K's sc_j - 32) and sub_zero their mins m_j (offset types):
  // w = q (d sc_j) - dmin m_j, the float32 products ggml forms; codes as above (offset types unsigned).
  int8_t* sub = nullptr;
  int8_t* sub_zero = nullptr;
};

// Whether `type` (ggml's name: "Q4_0", "Q4_K", ...) unpacks into int4 (the 4-bit types, and the 2 / 3-bit
// K-quants) or int8-weight
// (every quantized type); the group its scales cover (16 or 32); whether it takes zero points (the types with
// an offset, and int4 always (single-level: Q4_0's are 8); its block's elements and bytes.
bool gguf_unpacks(const std::string& type, bool int4);
int gguf_group(const std::string& type);
bool gguf_has_zero(const std::string& type, bool int4, bool two_level = false);
int64_t gguf_block_elems(const std::string& type);
// The K-quants (Q2_K .. Q6_K): scales d sc_j that two-level scales hold exactly (GgufUnpackArgs::sub); int4: Q4_K,
// and Q3_K / Q2_K (groups of 16, only so: their codes in nibbles; Q3_K's values d (sc_j - 32) (u - 4) as offsets,
// s = d (sc_j - 32), o = (4 d) (sc_j - 32), both exact). A super-block of 256 / gguf_group(type) groups; two-level
// zero points (gguf_has_zero with two_level) are those offsets.
bool gguf_two_level(const std::string& type, bool int4);
int64_t gguf_block_bytes(const std::string& type);

// Unpacks a.n_rows rows (throws ValueError for a type or a row it cannot take; the binding checks shapes).
void gguf_unpack(const std::string& type, const GgufUnpackArgs& a);

}  // namespace ne
