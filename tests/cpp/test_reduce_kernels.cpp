// The reduction kernels on their own: every dtype and op, odd sizes, NaN, rounding, aliasing.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "reduce_kernels.hpp"
#include "typed_buffer.hpp"

namespace nxd::testing {
namespace {

class ReduceKernels : public ::testing::TestWithParam<DType> {};

TEST_P(ReduceKernels, MatchesElementwiseReferenceAcrossBlockBoundaries) {
  const DType dtype = GetParam();
  for (size_t n_src : {1, 2, 3, 5}) {
    for (size_t count : {1, 7, 1023, 1024, 1025, 4099}) {
      std::vector<TypedBuffer> sources(n_src, TypedBuffer(dtype, count));
      std::vector<const void*> pointers;
      for (size_t s = 0; s < n_src; ++s) {
        for (size_t i = 0; i < count; ++i) sources[s].set(i, test_value(static_cast<int>(s), i));
        pointers.push_back(sources[s].data());
      }
      TypedBuffer sum(dtype, count), max(dtype, count);
      reduce(dtype, ReduceOp::Sum, sum.data(), nullptr, pointers.data(), n_src, count);
      reduce(dtype, ReduceOp::Max, max.data(), nullptr, pointers.data(), n_src, count);
      for (size_t i = 0; i < count; ++i) {
        double expected_sum = 0, expected_max = -1e30;
        for (size_t s = 0; s < n_src; ++s) {
          expected_sum += test_value(static_cast<int>(s), i);
          expected_max = std::max(expected_max, test_value(static_cast<int>(s), i));
        }
        ASSERT_EQ(sum.get(i), expected_sum) << dtype_name(dtype) << " n_src=" << n_src << " i=" << i;
        ASSERT_EQ(max.get(i), expected_max) << dtype_name(dtype) << " n_src=" << n_src << " i=" << i;
      }
    }
  }
}

TEST_P(ReduceKernels, DestinationMayAliasASourceAndMirrorGetsTheSameValues) {
  const DType dtype = GetParam();
  const size_t count = 3000;
  TypedBuffer a(dtype, count), b(dtype, count);
  for (size_t i = 0; i < count; ++i) {
    a.set(i, test_value(0, i));
    b.set(i, test_value(1, i));
  }
  const void* sources[] = {a.data(), b.data()};
  TypedBuffer mirror(dtype, count);
  reduce(dtype, ReduceOp::Sum, a.data(), mirror.data(), sources, 2, count);
  for (size_t i = 0; i < count; ++i) ASSERT_EQ(a.get(i), test_value(0, i) + test_value(1, i));
  EXPECT_EQ(mirror.bytes(), a.bytes());
}

TEST_P(ReduceKernels, MaxPropagatesNaN) {
  const DType dtype = GetParam();
  TypedBuffer a(dtype, 3), b(dtype, 3), out(dtype, 3);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  a.set(0, nan), b.set(0, 1.0);
  a.set(1, 1.0), b.set(1, nan);
  a.set(2, -2.0), b.set(2, 3.0);
  const void* sources[] = {a.data(), b.data()};
  reduce(dtype, ReduceOp::Max, out.data(), nullptr, sources, 2, 3);
  EXPECT_TRUE(std::isnan(out.get(0)));
  EXPECT_TRUE(std::isnan(out.get(1)));
  EXPECT_EQ(out.get(2), 3.0);
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, ReduceKernels, ::testing::ValuesIn(kAllDTypes),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(ReduceKernelsBFloat16, AccumulatesInFloat32AndRoundsToNearestEven) {
  // 256 + 1 + 1: in bfloat16 each partial sum would round back to 256; float32 keeps 258.
  TypedBuffer a(DType::BFloat16, 1), b(DType::BFloat16, 1), c(DType::BFloat16, 1), out(DType::BFloat16, 1);
  a.set(0, 256.0), b.set(0, 1.0), c.set(0, 1.0);
  const void* sources[] = {a.data(), b.data(), c.data()};
  reduce(DType::BFloat16, ReduceOp::Sum, out.data(), nullptr, sources, 3, 1);
  EXPECT_EQ(out.get(0), 258.0);
  // 256 + 1 = 257 lies halfway between 256 and 258: ties go to the even mantissa, 256.
  reduce(DType::BFloat16, ReduceOp::Sum, out.data(), nullptr, sources, 2, 1);
  EXPECT_EQ(out.get(0), 256.0);
}

TEST(ReduceKernelsFloat16, AccumulatesInFloat32) {
  // 2048 + 1 + 1: float16 partial sums would stay at 2048.
  TypedBuffer a(DType::Float16, 1), b(DType::Float16, 1), c(DType::Float16, 1), out(DType::Float16, 1);
  a.set(0, 2048.0), b.set(0, 1.0), c.set(0, 1.0);
  const void* sources[] = {a.data(), b.data(), c.data()};
  reduce(DType::Float16, ReduceOp::Sum, out.data(), nullptr, sources, 3, 1);
  EXPECT_EQ(out.get(0), 2050.0);
}

}  // namespace
}  // namespace nxd::testing
