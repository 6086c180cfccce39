// Reductions written once with the compiler's generic vectors, instantiated twice on x86-64: for
// the baseline and for x86-64-v3 (AVX2, FMA, F16C). The first call picks the set that the CPU
// runs, so one build runs on any x86-64 (and the portable set on arm64). The choice is a plain
// function-pointer table rather than ifunc multiversioning, whose resolvers run before the
// sanitizer runtimes start.
//
// Generic vectors rather than loops left to the auto-vectorizer: GCC 12 vectorized the old
// loops only at -O3, and even there copied the first source into the accumulators with rep
// movsq and vectorized the loop over sources instead of the one over elements for max. A
// vector type is lowered to the target's registers at any optimization level.
#include "reduce_kernels.hpp"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "errors.hpp"

#define NXD_INLINE inline __attribute__((always_inline))

// Rows are 32-byte vectors, returned by value from always-inlined functions only (never through
// a real call), so GCC's warning that returning them without AVX would change the ABI
// (-Wpsabi, in the portable set) does not concern us.
#pragma GCC diagnostic ignored "-Wpsabi"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bfloat16 rows split 32-bit words little-endian");

namespace nxd {
namespace {

// N lanes of T, lowered to the target's vector registers.
template <typename T, size_t N>
struct VecOf {
  typedef T type __attribute__((vector_size(sizeof(T) * N)));
};
template <typename T, size_t N>
using Vec = typename VecOf<T, N>::type;

// A row is 32 bytes of accumulators: one AVX2 register (two SSE2 or NEON ones). Wider generic
// vectors did not stay in registers: GCC kept a 128-byte accumulator on the stack.
constexpr size_t kRowBytes = 32;

template <typename To, typename From>
NXD_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(to));
  return to;
}

template <typename V, typename T>
NXD_INLINE V load_unaligned(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, typename V>
NXD_INLINE void store_unaligned(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

// How a stored element type widens to its accumulator and narrows back: a Row of kLanes elements
// at a time, or one element (the tail). Both do the same arithmetic on each element, so an
// element's bits do not depend on whether a row or the tail computed it.
template <typename T>
struct SameTypeTraits {
  using Stored = T;
  using Acc = T;
  static constexpr size_t kLanes = kRowBytes / sizeof(T);
  using Row = Vec<T, kLanes>;
  static NXD_INLINE Row load_row(const Stored* p) { return load_unaligned<Row>(p); }
  static NXD_INLINE void store_row(Stored* p, const Row& v) { store_unaligned(p, v); }
  static NXD_INLINE Acc load_one(const Stored* p) { return *p; }
  static NXD_INLINE void store_one(Stored* p, Acc v) { *p = v; }
};
using Float32Traits = SameTypeTraits<float>;
using Float64Traits = SameTypeTraits<double>;

// Two vectors of one row, reduced lane by lane like one.
template <typename V>
struct Pair {
  V even, odd;
};

// bfloat16 is the upper half of a float32. A row is 16 elements read as 8 32-bit words: the odd
// elements are the words with their low halves cleared, the even ones the words shifted up, so
// widening and narrowing take two integer operations per 8 lanes and no shuffles. Narrowing
// rounds to nearest even; NaN is quieted instead (rounding could carry it into infinity).
struct BFloat16Traits {
  using Stored = uint16_t;
  using Acc = float;
  static constexpr size_t kLanes = kRowBytes / sizeof(Stored);
  using Words = Vec<uint32_t, kLanes / 2>;
  using Row = Pair<Vec<float, kLanes / 2>>;

  // The float32 bits rounded to bfloat16, in the upper 16 bits (the lower ones are garbage).
  template <typename Bits, typename Float>
  static NXD_INLINE Bits round_to_upper_half(const Bits& bits, const Float& value) {
    const Bits rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
    return value != value ? bits | 0x400000u : rounded;
  }

  static NXD_INLINE Row load_row(const Stored* p) {
    const auto words = load_unaligned<Words>(p);
    return {bit_cast<Vec<float, kLanes / 2>>(words << 16), bit_cast<Vec<float, kLanes / 2>>(words & 0xffff0000u)};
  }
  static NXD_INLINE void store_row(Stored* p, const Row& v) {
    const Words even = round_to_upper_half(bit_cast<Words>(v.even), v.even);
    const Words odd = round_to_upper_half(bit_cast<Words>(v.odd), v.odd);
    store_unaligned(p, (odd & 0xffff0000u) | (even >> 16));
  }
  static NXD_INLINE Acc load_one(const Stored* p) { return bit_cast<float>(static_cast<uint32_t>(*p) << 16); }
  static NXD_INLINE void store_one(Stored* p, Acc v) {
    *p = static_cast<Stored>(round_to_upper_half(bit_cast<uint32_t>(v), v) >> 16);
  }
};

// float16 through the compiler's conversions: NEON's fcvtl/fcvtn on arm64, a library call per
// element on baseline x86-64 (slow, but only for CPUs older than 2013).
struct Float16Traits {
  using Stored = Half;
  using Acc = float;
  static constexpr size_t kLanes = kRowBytes / sizeof(Acc);
  using Row = Vec<float, kLanes>;
  static NXD_INLINE Row load_row(const Stored* p) {
    return __builtin_convertvector(load_unaligned<Vec<Half, kLanes>>(p), Row);
  }
  static NXD_INLINE void store_row(Stored* p, const Row& v) {
    store_unaligned(p, __builtin_convertvector(v, Vec<Half, kLanes>));
  }
  static NXD_INLINE Acc load_one(const Stored* p) { return static_cast<float>(*p); }
  static NXD_INLINE void store_one(Stored* p, Acc v) { *p = static_cast<Half>(v); }
};

#if defined(__x86_64__)
#define NXD_X86_64_V3 __attribute__((target("arch=x86-64-v3")))
// float16 on x86-64-v3 with F16C's vcvtph2ps/vcvtps2ph, 8 lanes per instruction (GCC 12 turns the
// generic conversion into one instruction per lane). Both round to nearest even, like the casts.
// Not always_inline: GCC refuses to inline these into the target-neutral templates; the kernel
// functions of the x86-64-v3 set are `flatten`, which inlines them there, where targets match.
struct Float16F16CTraits : Float16Traits {
  NXD_X86_64_V3 static inline Row load_row(const Stored* p) {
    return bit_cast<Row>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  NXD_X86_64_V3 static inline void store_row(Stored* p, const Row& v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(bit_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
  }
  NXD_X86_64_V3 static inline Acc load_one(const Stored* p) { return _cvtsh_ss(bit_cast<uint16_t>(*p)); }
  NXD_X86_64_V3 static inline void store_one(Stored* p, Acc v) {
    *p = bit_cast<Half>(static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT)));
  }
};
#endif

struct SumOp {
  template <typename V>
  static NXD_INLINE V combine(const V& acc, const V& x) { return acc + x; }
};

// NaN-propagating maximum, like torch.maximum.
struct MaxOp {
  template <typename V>
  static NXD_INLINE V combine(const V& acc, const V& x) { return (acc >= x) | (acc != acc) ? acc : x; }
};

template <typename Op, typename V>
NXD_INLINE V combine(const V& acc, const V& x) { return Op::combine(acc, x); }

template <typename Op, typename V>
NXD_INLINE Pair<V> combine(const Pair<V>& acc, const Pair<V>& x) {
  return {Op::combine(acc.even, x.even), Op::combine(acc.odd, x.odd)};
}

// dst[i] = the reduction of every source's element i, for i in [begin, end): rows, then the tail
// one element at a time. Each row's accumulators stay in registers while it reads every source
// once, in source order.
template <typename Traits, typename Op>
NXD_INLINE void reduce_span(typename Traits::Stored* dst, const void* const* srcs, size_t n_src, size_t begin,
                            size_t end) {
  using Stored = typename Traits::Stored;
  auto source = [srcs](size_t s, size_t i) { return static_cast<const Stored*>(srcs[s]) + i; };
  size_t i = begin;
  for (; i + Traits::kLanes <= end; i += Traits::kLanes) {
    auto acc = Traits::load_row(source(0, i));
    for (size_t s = 1; s < n_src; ++s) acc = combine<Op>(acc, Traits::load_row(source(s, i)));
    Traits::store_row(dst + i, acc);
  }
  for (; i < end; ++i) {
    auto acc = Traits::load_one(source(0, i));
    for (size_t s = 1; s < n_src; ++s) acc = combine<Op>(acc, Traits::load_one(source(s, i)));
    Traits::store_one(dst + i, acc);
  }
}

// Bytes of output per block: `mirror` receives each block by memcpy while it is still in L1.
// Measured (512 KB of float32, two sources, 4 KB to 16 KB blocks): 20-22 us, against 26-37 us
// for storing every row twice, and 10 us for the memcpy alone.
constexpr size_t kMirrorBlockBytes = 4096;

template <typename Traits, typename Op>
NXD_INLINE void reduce_typed_op(void* dst_raw, void* mirror_raw, const void* const* srcs, size_t n_src, size_t count) {
  using Stored = typename Traits::Stored;
  auto* dst = static_cast<Stored*>(dst_raw);
  if (mirror_raw == nullptr) {
    reduce_span<Traits, Op>(dst, srcs, n_src, 0, count);
    return;
  }
  auto* mirror = static_cast<Stored*>(mirror_raw);
  constexpr size_t block = kMirrorBlockBytes / sizeof(Stored);
  for (size_t begin = 0; begin < count; begin += block) {
    const size_t end = std::min(count, begin + block);
    reduce_span<Traits, Op>(dst, srcs, n_src, begin, end);
    std::memcpy(mirror + begin, dst + begin, (end - begin) * sizeof(Stored));
  }
}

template <typename Traits>
NXD_INLINE void reduce_typed(ReduceOp op, void* dst, void* mirror, const void* const* srcs, size_t n_src,
                             size_t count) {
  if (op == ReduceOp::Sum) reduce_typed_op<Traits, SumOp>(dst, mirror, srcs, n_src, count);
  else reduce_typed_op<Traits, MaxOp>(dst, mirror, srcs, n_src, count);
}

using Kernel = void (*)(ReduceOp, void*, void*, const void* const*, size_t, size_t);

// One kernel per dtype, indexed by DType.
struct KernelSet {
  Kernel by_dtype[kDTypeCount];
};

// Defines the kernel set `name`, each function compiled with `attributes`, float16 through
// `half_traits`.
#define NXD_DEFINE_KERNEL_SET(name, attributes, half_traits)                                       \
  attributes void name##_float32(ReduceOp op, void* d, void* m, const void* const* s, size_t n, size_t c) { \
    reduce_typed<Float32Traits>(op, d, m, s, n, c);                                                 \
  }                                                                                              \
  attributes void name##_float64(ReduceOp op, void* d, void* m, const void* const* s, size_t n, size_t c) { \
    reduce_typed<Float64Traits>(op, d, m, s, n, c);                                                 \
  }                                                                                              \
  attributes void name##_bfloat16(ReduceOp op, void* d, void* m, const void* const* s, size_t n, size_t c) { \
    reduce_typed<BFloat16Traits>(op, d, m, s, n, c);                                                \
  }                                                                                              \
  attributes void name##_float16(ReduceOp op, void* d, void* m, const void* const* s, size_t n, size_t c) { \
    reduce_typed<half_traits>(op, d, m, s, n, c);                                                   \
  }                                                                                              \
  constexpr KernelSet name{{name##_float32, name##_float64, name##_bfloat16, name##_float16}};

NXD_DEFINE_KERNEL_SET(portable_kernels, , Float16Traits)
#if defined(__x86_64__)
NXD_DEFINE_KERNEL_SET(x86_64_v3_kernels, NXD_X86_64_V3 __attribute__((flatten)), Float16F16CTraits)
#endif

const KernelSet& kernels_for_this_cpu() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) return x86_64_v3_kernels;
#endif
  return portable_kernels;
}

}  // namespace

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::BFloat16: return 2;
    case DType::Float16: return 2;
    case DType::kCount: break;
  }
  throw UnsupportedArgument("unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
    case DType::kCount: break;
  }
  return "unknown dtype";
}

const char* reduce_op_name(ReduceOp op) { return op == ReduceOp::Sum ? "sum" : "max"; }

void reduce(DType dtype, ReduceOp op, void* dst, void* mirror, const void* const* srcs, size_t n_src, size_t count) {
  static const KernelSet& kernels = kernels_for_this_cpu();
  const auto index = static_cast<size_t>(dtype);
  if (index >= kDTypeCount) throw UnsupportedArgument(std::string("cannot reduce elements of ") + dtype_name(dtype));
  if (n_src == 0 || count == 0) return;
  kernels.by_dtype[index](op, dst, mirror, srcs, n_src, count);
}

}  // namespace nxd
