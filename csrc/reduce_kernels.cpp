// Reductions written once as portable loops that the compiler vectorizes, instantiated twice on
// x86-64: for the baseline and for x86-64-v3 (AVX2, FMA, F16C). The first call picks the set
// that the CPU runs, so one build runs on any x86-64 (and the portable set on arm64). The choice
// is a plain function-pointer table rather than ifunc multiversioning, whose resolvers run
// before the sanitizer runtimes start.
#include "reduce_kernels.hpp"

#include <algorithm>
#include <cstring>

#include "errors.hpp"

#define NXD_INLINE inline __attribute__((always_inline))

namespace nxd {
namespace {

// How a stored element type widens to its accumulator and narrows back.
struct Float32Traits {
  using Stored = float;
  using Acc = float;
  static NXD_INLINE Acc load(Stored v) { return v; }
  static NXD_INLINE Stored store(Acc v) { return v; }
};

struct Float64Traits {
  using Stored = double;
  using Acc = double;
  static NXD_INLINE Acc load(Stored v) { return v; }
  static NXD_INLINE Stored store(Acc v) { return v; }
};

struct Float16Traits {
  using Stored = Half;
  using Acc = float;
  static NXD_INLINE Acc load(Stored v) { return static_cast<float>(v); }
  static NXD_INLINE Stored store(Acc v) { return static_cast<Half>(v); }
};

// bfloat16 is the upper half of a float32: widen by shifting, narrow rounding to nearest even.
struct BFloat16Traits {
  using Stored = uint16_t;
  using Acc = float;
  static NXD_INLINE Acc load(Stored v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static NXD_INLINE Stored store(Acc v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return static_cast<Stored>(v != v ? quiet_nan : rounded);
  }
};

struct SumOp {
  template <typename Acc>
  static NXD_INLINE Acc combine(Acc acc, Acc x) { return acc + x; }
};

// NaN-propagating maximum, like torch.maximum.
struct MaxOp {
  template <typename Acc>
  static NXD_INLINE Acc combine(Acc acc, Acc x) { return (acc >= x || acc != acc) ? acc : x; }
};

// Elements reduced per block: the accumulators of one block stay in L1.
constexpr size_t kBlock = 1024;

template <typename Traits, typename Op>
NXD_INLINE void reduce_blocks(void* dst_raw, void* mirror, const void* const* srcs_raw, size_t n_src, size_t count) {
  using Stored = typename Traits::Stored;
  using Acc = typename Traits::Acc;
  auto* dst = static_cast<Stored*>(dst_raw);
  Acc acc[kBlock];
  for (size_t base = 0; base < count; base += kBlock) {
    const size_t n = std::min(kBlock, count - base);
    const auto* first = static_cast<const Stored*>(srcs_raw[0]) + base;
    for (size_t i = 0; i < n; ++i) acc[i] = Traits::load(first[i]);
    for (size_t s = 1; s < n_src; ++s) {
      const auto* src = static_cast<const Stored*>(srcs_raw[s]) + base;
      for (size_t i = 0; i < n; ++i) acc[i] = Op::combine(acc[i], Traits::load(src[i]));
    }
    for (size_t i = 0; i < n; ++i) dst[base + i] = Traits::store(acc[i]);
    if (mirror != nullptr) std::memcpy(static_cast<Stored*>(mirror) + base, dst + base, n * sizeof(Stored));
  }
}

template <typename Traits>
NXD_INLINE void reduce_typed(ReduceOp op, void* dst, void* mirror, const void* const* srcs, size_t n_src,
                             size_t count) {
  if (op == ReduceOp::Sum) reduce_blocks<Traits, SumOp>(dst, mirror, srcs, n_src, count);
  else reduce_blocks<Traits, MaxOp>(dst, mirror, srcs, n_src, count);
}

using Kernel = void (*)(ReduceOp, void*, void*, const void* const*, size_t, size_t);

// One kernel per dtype, indexed by DType.
struct KernelSet {
  Kernel by_dtype[kDTypeCount];
};

// Defines the kernel set `name`, each function compiled with `attributes`.
#define NXD_DEFINE_KERNEL_SET(name, attributes)                                                  \
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
    reduce_typed<Float16Traits>(op, d, m, s, n, c);                                                 \
  }                                                                                              \
  constexpr KernelSet name{{name##_float32, name##_float64, name##_bfloat16, name##_float16}};

NXD_DEFINE_KERNEL_SET(portable_kernels, )
#if defined(__x86_64__)
NXD_DEFINE_KERNEL_SET(x86_64_v3_kernels, __attribute__((target("arch=x86-64-v3"))))
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
