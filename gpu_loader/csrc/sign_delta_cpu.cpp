// CPU kernel of the multi-tenant sign-delta matmul (gpu_loader/sign_cpu.py builds and calls it):
// for every group of tokens sharing a slot, y[t] += sum_p scale[s,p,o] * sum_i x[t,i] * (2*bit - 1),
// computed by byte tables instead of multiply-adds.
//
// The possible +-1 dot products of a few input columns are tabulated once per token (built with one
// add per entry from the entry without the index's lowest bit), and each packed group of sign bits
// of a row selects its entry, so no +-1 matrix is ever built and a row costs in/4 (AVX-512) or in/8
// look-ups per token instead of `in` multiply-adds:
// - AVX-512 builds: 16-entry tables per 4 columns live in vector registers; 16 rows' sign words are
//   gathered at once and each nibble picks its rows' entries with one permute (rows_avx512);
// - elsewhere: 256-entry tables per 8 columns for a chunk of C <= 8 tokens (T[b][v][c]); each sign
//   byte selects one C-float entry (rows).
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

constexpr int64_t kRowBlock = 64;  // output rows per work item

struct Chunk {
  int64_t slot, planes, n;  // n <= width tokens, padded with zero columns in the table
  int64_t width;             // 1, 2, 4 or 8
  int64_t tokens[8];
  int64_t table_offset;      // floats into the shared table buffer
};

// Table of input byte group b of chunk c: T[v][t] = sum_j x[t, 8b + j] * (bit j of v ? 1 : -1).
template <typename scalar_t>
void build_table(const Chunk& c, int64_t b, const scalar_t* x, int64_t x_stride, int64_t K, float* table) {
  const int64_t w = c.width;
  float xs[8][8] = {};
  for (int64_t j = 0; j < 8 && 8 * b + j < K; ++j)
    for (int64_t t = 0; t < c.n; ++t) xs[j][t] = static_cast<float>(x[c.tokens[t] * x_stride + 8 * b + j]);
  float* tb = table + c.table_offset + b * 256 * w;
  for (int64_t t = 0; t < w; ++t) {
    float s = 0.f;
    for (int j = 0; j < 8; ++j) s += xs[j][t];
    tb[t] = -s;  // every bit 0: every sign -1
  }
  for (int v = 1; v < 256; ++v) {
    const int k = __builtin_ctz(v);
    const float* from = tb + (v & (v - 1)) * w;
    float* to = tb + v * w;
    for (int64_t t = 0; t < w; ++t) to[t] = from[t] + 2.f * xs[k][t];
  }
}

// Output rows [o0, o1) (at most kRowBlock) of chunk c. The loop runs over input bytes outside and
// rows inside: one byte group's table (256 * W floats) stays in L1 while every row of the block
// looks up its entry, and the rows' accumulators are independent (no add-latency chain).
template <int W, typename scalar_t>
void rows(const Chunk& c, int64_t o0, int64_t o1, const float* table, const uint8_t* words, int64_t P,
          int64_t N, int64_t word_bytes, const float* scales, int64_t nb, scalar_t* y, int64_t y_stride) {
  const int64_t n_rows = o1 - o0;
  float total[kRowBlock][W] = {};
  for (int64_t p = 0; p < c.planes; ++p) {
    const uint8_t* block = words + ((c.slot * P + p) * N + o0) * word_bytes;
    float acc[kRowBlock][W] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const float* tb = table + b * 256 * W;
      const uint8_t* col = block + b;
      for (int64_t r = 0; r < n_rows; ++r) {
        const float* e = tb + col[r * word_bytes] * W;
        for (int t = 0; t < W; ++t) acc[r][t] += e[t];
      }
    }
    const float* s = scales + (c.slot * P + p) * N + o0;
    for (int64_t r = 0; r < n_rows; ++r)
      for (int t = 0; t < W; ++t) total[r][t] += s[r] * acc[r][t];
  }
  for (int64_t t = 0; t < c.n; ++t) {
    scalar_t* out = y + c.tokens[t] * y_stride + o0;
    for (int64_t r = 0; r < n_rows; ++r) out[r] = static_cast<scalar_t>(static_cast<float>(out[r]) + total[r][t]);
  }
}

#if defined(__AVX512F__)
// AVX-512: nibble tables held in vector registers. For each 4 input columns q and token t,
// N[t][q][v] = sum_j x[t, 4q + j] * (bit j of v ? 1 : -1) (16 floats: one zmm register); 16 rows'
// words are gathered at once, and each nibble of them picks its rows' entries with one permute.
// Per 16 rows and 32 columns: one gather, then 8 permutes and adds per token.
template <typename scalar_t>
void build_nibbles(const Chunk& c, int64_t w, const scalar_t* x, int64_t x_stride, int64_t K, int64_t n_words,
                   float* tables) {
  for (int64_t t = 0; t < c.n; ++t) {
    const scalar_t* xt = x + c.tokens[t] * x_stride;
    for (int64_t q = 8 * w; q < 8 * w + 8; ++q) {
      float xs[4];
      for (int j = 0; j < 4; ++j) xs[j] = 4 * q + j < K ? static_cast<float>(xt[4 * q + j]) : 0.f;
      float* tb = tables + c.table_offset + (t * 8 * n_words + q) * 16;
      tb[0] = -((xs[0] + xs[1]) + (xs[2] + xs[3]));
      for (int v = 1; v < 16; ++v) tb[v] = tb[v & (v - 1)] + 2.f * xs[__builtin_ctz(v)];
    }
  }
}

template <typename scalar_t>
void rows_avx512(const Chunk& c, int64_t o0, int64_t o1, const float* tables, const int32_t* words, int64_t P,
                 int64_t N, int64_t n_words, const float* scales, scalar_t* y, int64_t y_stride) {
  const int64_t G = 8 * n_words;
  const float* tab = tables + c.table_offset;
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i vindex = _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(n_words)));
  const __m512i low4 = _mm512_set1_epi32(15);
  int64_t o = o0;
  for (; o + 16 <= o1; o += 16) {
    __m512 total[8];
    for (int t = 0; t < 8; ++t) total[t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < c.planes; ++p) {
      const int32_t* base = words + ((c.slot * P + p) * N + o) * n_words;
      __m512 acc[8];
      for (int t = 0; t < 8; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t w = 0; w < n_words; ++w) {
        __m512i v = _mm512_i32gather_epi32(vindex, base + w, 4);
        for (int q = 0; q < 8; ++q) {
          const __m512i idx = _mm512_and_si512(v, low4);
          v = _mm512_srli_epi32(v, 4);
          const float* tq = tab + (w * 8 + q) * 16;
          for (int64_t t = 0; t < c.n; ++t)
            acc[t] = _mm512_add_ps(acc[t], _mm512_permutexvar_ps(idx, _mm512_loadu_ps(tq + t * G * 16)));
        }
      }
      const __m512 s = _mm512_loadu_ps(scales + (c.slot * P + p) * N + o);
      for (int64_t t = 0; t < c.n; ++t) total[t] = _mm512_fmadd_ps(s, acc[t], total[t]);
    }
    for (int64_t t = 0; t < c.n; ++t) {
      alignas(64) float out[16];
      _mm512_store_ps(out, total[t]);
      scalar_t* yr = y + c.tokens[t] * y_stride + o;
      for (int r = 0; r < 16; ++r) yr[r] = static_cast<scalar_t>(static_cast<float>(yr[r]) + out[r]);
    }
  }
  for (; o < o1; ++o) {  // the last < 16 rows, one at a time
    for (int64_t t = 0; t < c.n; ++t) {
      float total = 0.f;
      for (int64_t p = 0; p < c.planes; ++p) {
        const int32_t* row = words + ((c.slot * P + p) * N + o) * n_words;
        float acc = 0.f;
        for (int64_t w = 0; w < n_words; ++w) {
          uint32_t v = static_cast<uint32_t>(row[w]);
          for (int q = 0; q < 8; ++q, v >>= 4) acc += tab[(t * G + w * 8 + q) * 16 + (v & 15u)];
        }
        total += scales[(c.slot * P + p) * N + o] * acc;
      }
      scalar_t* out = y + c.tokens[t] * y_stride + o;
      *out = static_cast<scalar_t>(static_cast<float>(*out) + total);
    }
  }
}
#endif

}  // namespace

// y [T, N] and x [T, K] (one float dtype, unit stride along features); words int32 [S, P, N, ceil(K/32)]
// and scales f32 [S, P, N], contiguous; perm int64 token indices; groups int64 [G, 4] rows of
// (slot, start into perm, token count, planes). Adds in place into y, rounding once per element.
void sign_delta_add(at::Tensor y, const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales,
                    const at::Tensor& perm, const at::Tensor& groups) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x must be [T, in] and y [T, out]");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must share a dtype");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x and y must have unit stride along features");
  TORCH_CHECK(words.scalar_type() == at::kInt && words.dim() == 4 && words.is_contiguous(),
              "words must be contiguous int32 [S, P, out, W]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 3 && scales.is_contiguous(),
              "scales must be contiguous float32 [S, P, out]");
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.is_contiguous(), "perm must be contiguous int64");
  TORCH_CHECK(groups.scalar_type() == at::kLong && groups.dim() == 2 && groups.size(1) == 4 &&
              groups.is_contiguous(), "groups must be contiguous int64 [G, 4]");
  const int64_t K = x.size(1), N = y.size(1), S = words.size(0), P = words.size(1);
  TORCH_CHECK(words.size(2) == N && words.size(3) == (K + 31) / 32, "words do not match x and y");
  TORCH_CHECK(scales.size(0) == S && scales.size(1) == P && scales.size(2) == N, "scales do not match words");
  const int64_t nb = (K + 7) / 8, n_words = words.size(3), T = x.size(0), n_perm = perm.size(0);
  const int64_t* g = groups.data_ptr<int64_t>();
  const int64_t* pm = perm.data_ptr<int64_t>();

  std::vector<Chunk> chunks;
  int64_t table_floats = 0;
  for (int64_t i = 0; i < groups.size(0); ++i) {
    const int64_t slot = g[4 * i], start = g[4 * i + 1], count = g[4 * i + 2], planes = g[4 * i + 3];
    TORCH_CHECK(slot >= 0 && slot < S && planes >= 0 && planes <= P, "group ", i, ": slot or planes out of range");
    TORCH_CHECK(start >= 0 && count >= 0 && start + count <= n_perm, "group ", i, ": tokens out of range");
    for (int64_t c0 = 0; c0 < count; c0 += 8) {
      Chunk c{};
      c.slot = slot, c.planes = planes, c.n = std::min<int64_t>(8, count - c0);
      c.width = c.n == 1 ? 1 : c.n == 2 ? 2 : c.n <= 4 ? 4 : 8;
      for (int64_t t = 0; t < c.n; ++t) {
        c.tokens[t] = pm[start + c0 + t];
        TORCH_CHECK(c.tokens[t] >= 0 && c.tokens[t] < T, "token index out of range");
      }
      c.table_offset = table_floats;
#if defined(__AVX512F__)
      table_floats += c.n * 8 * n_words * 16;
#else
      table_floats += nb * 256 * c.width;
#endif
      chunks.push_back(c);
    }
  }
  if (chunks.empty() || N == 0) return;
  // Reused across calls (grown, never shrunk): a fresh buffer per layer would page-fault every call.
  static thread_local std::vector<float> table;
  if (static_cast<int64_t>(table.size()) < table_floats) table.resize(table_floats);
  float* tables = table.data();  // the caller's buffer: worker threads must not name the thread_local
  const uint8_t* wb = reinterpret_cast<const uint8_t*>(words.data_ptr<int32_t>());
  const int64_t word_bytes = words.size(3) * 4;
  const float* sc = scales.data_ptr<float>();
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "sign_delta_add", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t n_chunks = static_cast<int64_t>(chunks.size());
#if defined(__AVX512F__)
    at::parallel_for(0, n_chunks * n_words, 4, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        build_nibbles<scalar_t>(chunks[i / n_words], i % n_words, xp, x.stride(0), K, n_words, tables);
    });
    const int32_t* wp = words.data_ptr<int32_t>();
    at::parallel_for(0, n_chunks * blocks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o0 = (i % blocks) * kRowBlock;
        rows_avx512<scalar_t>(chunks[i / blocks], o0, std::min(N, o0 + kRowBlock), tables, wp, P, N, n_words, sc,
                              yp, y.stride(0));
      }
    });
#else
    at::parallel_for(0, n_chunks * nb, 8, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) build_table<scalar_t>(chunks[i / nb], i % nb, xp, x.stride(0), K, tables);
    });
    // Tokens of different chunks never share an output element (each token is in one group), so
    // the work items write disjoint parts of y.
    at::parallel_for(0, n_chunks * blocks, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const Chunk& c = chunks[i / blocks];
        const int64_t o0 = (i % blocks) * kRowBlock, o1 = std::min(N, o0 + kRowBlock);
        const float* tb = tables + c.table_offset;
        switch (c.width) {
          case 1: rows<1>(c, o0, o1, tb, wb, P, N, word_bytes, sc, nb, yp, y.stride(0)); break;
          case 2: rows<2>(c, o0, o1, tb, wb, P, N, word_bytes, sc, nb, yp, y.stride(0)); break;
          case 4: rows<4>(c, o0, o1, tb, wb, P, N, word_bytes, sc, nb, yp, y.stride(0)); break;
          default: rows<8>(c, o0, o1, tb, wb, P, N, word_bytes, sc, nb, yp, y.stride(0)); break;
        }
      }
    });
#endif
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sign_delta_add", &sign_delta_add, "y[tokens of each slot group] += x . sign-delta^T (byte tables)");
}
