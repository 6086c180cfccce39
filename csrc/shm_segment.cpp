#include "shm_segment.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "errors.hpp"
#include "file_descriptor.hpp"

namespace nxd {
namespace {

std::string system_error(const std::string& what, int err) { return what + ": " + std::strerror(err); }

// The inode number of this process's pid namespace: pids are only comparable within one.
unsigned long pid_namespace_id() {
  struct stat st {};
  if (::stat("/proc/self/ns/pid", &st) != 0) return 0;
  return static_cast<unsigned long>(st.st_ino);
}

std::string name_stem() {
  return std::string(kSegmentPrefix) + std::to_string(::getuid()) + "-" + std::to_string(pid_namespace_id()) + "-";
}

void* map_shared(const FileDescriptor& fd, size_t bytes, const std::string& name) {
  void* data = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (data == MAP_FAILED) throw SegmentError(system_error("cannot map shared-memory segment " + name, errno));
  return data;
}

}  // namespace

std::string segment_name(const std::string& token) {
  for (char c : token) {
    if (!std::isalnum(static_cast<unsigned char>(c))) {
      throw SegmentError("segment token must be letters and digits only, got '" + token + "'");
    }
  }
  return "/" + name_stem() + std::to_string(::getpid()) + "-" + token;
}

int remove_orphaned_segments() {
  const std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir("/dev/shm"), &::closedir);
  if (dir == nullptr) return 0;
  const std::string stem = name_stem();
  int removed = 0;
  while (const dirent* entry = ::readdir(dir.get())) {
    const std::string file = entry->d_name;
    if (file.compare(0, stem.size(), stem) != 0) continue;
    const pid_t creator = static_cast<pid_t>(std::strtol(file.c_str() + stem.size(), nullptr, 10));
    // Only ESRCH proves the creator gone; EPERM (alive, another user's) keeps the segment.
    if (creator <= 0 || ::kill(creator, 0) == 0 || errno != ESRCH) continue;
    if (::shm_unlink(("/" + file).c_str()) == 0) ++removed;
  }
  return removed;
}

SharedSegment SharedSegment::create(const std::string& name, size_t bytes) {
  FileDescriptor fd(::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, S_IRUSR | S_IWUSR));
  if (!fd) throw SegmentError(system_error("cannot create shared-memory segment " + name, errno));
  // Creation mode is filtered by the umask; make sure nobody else can read the segment.
  if (::fchmod(fd.get(), S_IRUSR | S_IWUSR) != 0 || ::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) {
    const int err = errno;
    ::shm_unlink(name.c_str());
    throw SegmentError(system_error("cannot size shared-memory segment " + name, err));
  }
  const int err = ::posix_fallocate(fd.get(), 0, static_cast<off_t>(bytes));
  if (err != 0) {
    ::shm_unlink(name.c_str());
    throw SegmentError(system_error("cannot reserve " + std::to_string(bytes) + " bytes in /dev/shm for " + name +
                                        " (is /dev/shm full or too small?)",
                                    err));
  }
  try {
    return SharedSegment(map_shared(fd, bytes, name), bytes);
  } catch (...) {
    ::shm_unlink(name.c_str());
    throw;
  }
}

SharedSegment SharedSegment::open(const std::string& name) {
  FileDescriptor fd(::shm_open(name.c_str(), O_RDWR, 0));
  if (!fd) throw SegmentError(system_error("cannot open shared-memory segment " + name, errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw SegmentError(system_error("cannot stat shared-memory segment " + name, errno));
  const auto bytes = static_cast<size_t>(st.st_size);
  return SharedSegment(map_shared(fd, bytes, name), bytes);
}

void SharedSegment::unlink(const std::string& name) {
  if (::shm_unlink(name.c_str()) != 0 && errno != ENOENT) {
    throw SegmentError(system_error("cannot unlink shared-memory segment " + name, errno));
  }
}

SharedSegment::SharedSegment(SharedSegment&& other) noexcept : data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

SharedSegment::~SharedSegment() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

}  // namespace nxd
