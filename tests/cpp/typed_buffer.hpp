// Test helper: a byte buffer of one engine dtype, read and written as doubles.
#pragma once

#include <cstdint>
#include <cstring>
#include <iterator>
#include <vector>

#include "reduce_kernels.hpp"

namespace nxd::testing {

class TypedBuffer {
 public:
  TypedBuffer(DType dtype, size_t count) : dtype_(dtype), bytes_(count * dtype_size(dtype)) {}

  void set(size_t i, double value) {
    switch (dtype_) {
      case DType::Float32: store(i, static_cast<float>(value)); break;
      case DType::Float64: store(i, value); break;
      case DType::Float16: store(i, static_cast<Half>(value)); break;
      case DType::BFloat16: {
        // Exact for the test values (they fit in bfloat16): keep the upper half of the float.
        const float f = static_cast<float>(value);
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        store(i, static_cast<uint16_t>(bits >> 16));
        break;
      }
      case DType::kCount: break;  // the constructor's dtype_size() refused it
    }
  }

  double get(size_t i) const {
    switch (dtype_) {
      case DType::Float32: return load<float>(i);
      case DType::Float64: return load<double>(i);
      case DType::Float16: return static_cast<double>(load<Half>(i));
      case DType::BFloat16: {
        const uint32_t bits = static_cast<uint32_t>(load<uint16_t>(i)) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
      }
      case DType::kCount: break;
    }
    return 0;
  }

  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }
  size_t count() const { return bytes_.size() / dtype_size(dtype_); }
  size_t nbytes() const { return bytes_.size(); }
  const std::vector<unsigned char>& bytes() const { return bytes_; }

 private:
  template <typename T>
  void store(size_t i, T value) { std::memcpy(bytes_.data() + i * sizeof(T), &value, sizeof(T)); }
  template <typename T>
  T load(size_t i) const {
    T value;
    std::memcpy(&value, bytes_.data() + i * sizeof(T), sizeof(T));
    return value;
  }

  DType dtype_;
  std::vector<unsigned char> bytes_;
};

inline const DType kAllDTypes[] = {DType::Float32, DType::Float64, DType::BFloat16, DType::Float16};
static_assert(std::size(kAllDTypes) == kDTypeCount, "the tests cover every dtype");

// Small integers: exact in every dtype, also after summing a few ranks.
inline double test_value(int rank, size_t i) { return static_cast<double>((rank * 7 + i * 13) % 17) - 8.0; }

}  // namespace nxd::testing
