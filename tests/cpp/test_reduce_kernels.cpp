// The reduction kernels on their own: every dtype and op, odd sizes, NaN, rounding, aliasing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

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

// 40 elements: vector rows (8 or 16 lanes) and a scalar tail; every case sits at every position.
constexpr size_t kRowsAndTail = 40;

TEST_P(ReduceKernels, MaxPropagatesNaN) {
  const DType dtype = GetParam();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double cases[][2] = {{nan, 1.0}, {1.0, nan}, {-2.0, 3.0}};
  for (size_t c = 0; c < std::size(cases); ++c) {
    TypedBuffer a(dtype, kRowsAndTail), b(dtype, kRowsAndTail), out(dtype, kRowsAndTail);
    for (size_t i = 0; i < kRowsAndTail; ++i) a.set(i, cases[c][0]), b.set(i, cases[c][1]);
    const void* sources[] = {a.data(), b.data()};
    reduce(dtype, ReduceOp::Max, out.data(), nullptr, sources, 2, kRowsAndTail);
    for (size_t i = 0; i < kRowsAndTail; ++i) {
      if (c < 2) EXPECT_TRUE(std::isnan(out.get(i))) << "case " << c << " element " << i;
      else EXPECT_EQ(out.get(i), 3.0) << "element " << i;
    }
  }
}

// Rows and the tail must compute each element alike: element i reduced among kRowsAndTail (in a
// row, or in the tail) has the bits of element i reduced alone. Inexact values, signed zeros,
// infinities and NaN; sums that overflow float16 and round in bfloat16.
TEST_P(ReduceKernels, EveryElementHasTheSameBitsInARowAndAlone) {
  const DType dtype = GetParam();
  const double special[] = {0.0, -0.0, std::numeric_limits<double>::infinity(),
                            -std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN(),
                            65504.0, 1e-6};
  std::mt19937 random(7);
  std::uniform_real_distribution<double> uniform(-1, 1);
  std::vector<TypedBuffer> sources(3, TypedBuffer(dtype, kRowsAndTail));
  std::vector<const void*> pointers;
  for (size_t s = 0; s < sources.size(); ++s) {
    for (size_t i = 0; i < kRowsAndTail; ++i) {
      sources[s].set(i, (i + s) % 5 == 0 ? special[(i + s) % std::size(special)] : uniform(random) * 300);
    }
    pointers.push_back(sources[s].data());
  }
  const size_t element = dtype_size(dtype);
  for (ReduceOp op : {ReduceOp::Sum, ReduceOp::Max}) {
    TypedBuffer all(dtype, kRowsAndTail), mirror(dtype, kRowsAndTail);
    reduce(dtype, op, all.data(), mirror.data(), pointers.data(), pointers.size(), kRowsAndTail);
    EXPECT_EQ(mirror.bytes(), all.bytes());
    for (size_t i = 0; i < kRowsAndTail; ++i) {
      std::vector<const void*> one;
      for (const void* p : pointers) one.push_back(static_cast<const unsigned char*>(p) + i * element);
      TypedBuffer alone(dtype, 1);
      reduce(dtype, op, alone.data(), nullptr, one.data(), one.size(), 1);
      EXPECT_EQ(std::memcmp(alone.data(), all.bytes().data() + i * element, element), 0)
          << dtype_name(dtype) << " " << reduce_op_name(op) << " element " << i << ": " << alone.get(0) << " alone, "
          << all.get(i) << " in a row";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, ReduceKernels, ::testing::ValuesIn(kAllDTypes),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// Reduces one element's sources, placed at every position of kRowsAndTail elements.
std::vector<double> reduce_everywhere(DType dtype, const std::vector<double>& values) {
  std::vector<TypedBuffer> sources(values.size(), TypedBuffer(dtype, kRowsAndTail));
  std::vector<const void*> pointers;
  for (size_t s = 0; s < values.size(); ++s) {
    for (size_t i = 0; i < kRowsAndTail; ++i) sources[s].set(i, values[s]);
    pointers.push_back(sources[s].data());
  }
  TypedBuffer out(dtype, kRowsAndTail);
  reduce(dtype, ReduceOp::Sum, out.data(), nullptr, pointers.data(), pointers.size(), kRowsAndTail);
  std::vector<double> results;
  for (size_t i = 0; i < kRowsAndTail; ++i) results.push_back(out.get(i));
  return results;
}

TEST(ReduceKernelsBFloat16, AccumulatesInFloat32AndRoundsToNearestEven) {
  // 256 + 1 + 1: in bfloat16 each partial sum would round back to 256; float32 keeps 258.
  for (double sum : reduce_everywhere(DType::BFloat16, {256.0, 1.0, 1.0})) EXPECT_EQ(sum, 258.0);
  // 256 + 1 = 257 lies halfway between 256 and 258: ties go to the even mantissa, 256.
  for (double sum : reduce_everywhere(DType::BFloat16, {256.0, 1.0})) EXPECT_EQ(sum, 256.0);
  // 258 + 1 = 259 lies halfway between 258 and 260: the even mantissa is 260's.
  for (double sum : reduce_everywhere(DType::BFloat16, {258.0, 1.0})) EXPECT_EQ(sum, 260.0);
}

TEST(ReduceKernelsFloat16, AccumulatesInFloat32) {
  // 2048 + 1 + 1: float16 partial sums would stay at 2048.
  for (double sum : reduce_everywhere(DType::Float16, {2048.0, 1.0, 1.0})) EXPECT_EQ(sum, 2050.0);
  // 2048 + 1 is halfway between 2048 and 2050: the even mantissa, 2048.
  for (double sum : reduce_everywhere(DType::Float16, {2048.0, 1.0})) EXPECT_EQ(sum, 2048.0);
}

}  // namespace
}  // namespace nxd::testing
