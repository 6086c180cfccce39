// A POSIX shared-memory segment mapped into this process, and the naming rules of ours.
#pragma once

#include <cstddef>
#include <string>

namespace nxd {

// Name prefix of our segments in /dev/shm; the rest is "<uid>-<pid namespace>-<creator pid>-<token>".
inline constexpr const char* kSegmentPrefix = "nxd-";

// A segment name for a creator in this process: "/nxd-<uid>-<pidns>-<pid>-<token>".
// `token` (letters and digits) keeps names of concurrent jobs apart.
std::string segment_name(const std::string& token);

// Removes segments in /dev/shm named by this user, from this pid namespace, whose creator
// process is gone (left behind when every rank of a group died during set-up). Returns the count.
int remove_orphaned_segments();

class SharedSegment {
 public:
  // Creates `name` (mode 0600, exclusive) with `bytes` of memory reserved up front, so a
  // full /dev/shm fails here and not later with SIGBUS.
  static SharedSegment create(const std::string& name, size_t bytes);
  // Maps an existing segment created by a peer.
  static SharedSegment open(const std::string& name);
  // Removes the name from /dev/shm; mappings stay valid. Missing names are not an error.
  static void unlink(const std::string& name);

  SharedSegment(SharedSegment&& other) noexcept;
  SharedSegment& operator=(SharedSegment&&) = delete;
  SharedSegment(const SharedSegment&) = delete;
  ~SharedSegment();

  void* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  SharedSegment(void* data, size_t size) : data_(data), size_(size) {}
  void* data_;
  size_t size_;
};

}  // namespace nxd
