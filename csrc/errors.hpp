// Exceptions of the shared-memory engine; the bindings map them to Python exceptions.
#pragma once

#include <stdexcept>
#include <string>

namespace nxd {

// A collective that cannot complete: a peer died, stalled past the timeout, disagreed on
// the call, or the group was aborted by an earlier failure. The group is unusable after it.
class CollectiveFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Setting up or attaching the shared-memory segment failed (system call errors, bad layout).
class SegmentError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A collective called with arguments the engine cannot handle (e.g. an unsupported dtype).
class UnsupportedArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace nxd
