// Element-wise reductions over several source buffers, chosen at run time for the CPU.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nxd {

// The compiler's IEEE binary16 type: C++ knows it as __fp16 on arm64, _Float16 on x86-64.
#if defined(__aarch64__)
using Half = __fp16;
#elif defined(__FLT16_MAX__)
using Half = _Float16;
#else
#error "the engine needs a half-precision type: build with GCC >= 12 or Clang >= 15"
#endif

// kCount is one past the last, for tables indexed by the enum.
enum class DType : uint8_t { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3, kCount };
enum class ReduceOp : uint8_t { Sum = 0, Max = 1 };

inline constexpr size_t kDTypeCount = static_cast<size_t>(DType::kCount);

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
const char* reduce_op_name(ReduceOp op);

// dst[i] = op(srcs[0][i], srcs[1][i], ..., srcs[n_src - 1][i]) for i < count, combined in
// source order and accumulated in float32 (float64 for Float64), so every caller that
// passes the same sources gets bit-identical results. Max propagates NaN. `dst` may alias
// one of the sources. `mirror`, unless null, receives the same values as `dst` (while they
// are still in L1, cheaper than copying afterwards).
void reduce(DType dtype, ReduceOp op, void* dst, void* mirror, const void* const* srcs, size_t n_src, size_t count);

}  // namespace nxd
