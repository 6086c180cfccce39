#include "process_identity.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "file_descriptor.hpp"

namespace nxd {
namespace {

// The fields of /proc/<pid>/stat we use, or why they are missing.
struct ProcStat {
  enum class Read : uint8_t { Ok, Missing, Unreadable } read;
  char state;           // field 3
  uint64_t start_time;  // field 22
};

ProcStat read_proc_stat(const std::string& proc_root, int32_t pid) {
  const std::string path = proc_root + "/" + std::to_string(pid) + "/stat";
  const FileDescriptor file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  // ENOENT: no such process. ESRCH: it exited between open and read. Anything else says
  // nothing about the process, only about our access to /proc.
  auto failed = [](int err) {
    return ProcStat{err == ENOENT || err == ESRCH ? ProcStat::Read::Missing : ProcStat::Read::Unreadable, 0, 0};
  };
  if (!file) return failed(errno);
  char buffer[1024];
  ssize_t n;
  do {
    n = ::read(file.get(), buffer, sizeof(buffer) - 1);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return failed(errno);
  buffer[n] = '\0';
  const ProcStat unparsed{ProcStat::Read::Unreadable, 0, 0};
  // The command name (field 2) is in parentheses and may itself hold spaces or ')'.
  const char* cursor = std::strrchr(buffer, ')');
  if (cursor == nullptr || cursor[1] != ' ' || cursor[2] == '\0') return unparsed;
  const char state = cursor[2];
  cursor += 3;
  for (int field = 4; field <= 22 && cursor != nullptr; ++field) {
    cursor = std::strchr(cursor, ' ');
    if (cursor != nullptr) ++cursor;
  }
  if (cursor == nullptr) return unparsed;
  char* end = nullptr;
  const uint64_t start_time = std::strtoull(cursor, &end, 10);
  if (end == cursor) return unparsed;
  return {ProcStat::Read::Ok, state, start_time};
}

bool procfs_lists_processes(const std::string& proc_root) {
  return ::access((proc_root + "/self/stat").c_str(), R_OK) == 0;
}

}  // namespace

const char* liveness_name(Liveness liveness) {
  switch (liveness) {
    case Liveness::Alive: return "alive";
    case Liveness::Dead: return "dead";
    case Liveness::Unknown: return "unknown";
  }
  return "?";
}

ProcessIdentity current_process() {
  const auto pid = static_cast<int32_t>(::getpid());
  const ProcStat stat = read_proc_stat("/proc", pid);
  return {pid, stat.read == ProcStat::Read::Ok ? stat.start_time : kUnknownStartTime};
}

Liveness process_liveness(const ProcessIdentity& process, const std::string& proc_root) {
  const ProcStat stat = read_proc_stat(proc_root, process.pid);
  switch (stat.read) {
    // A missing entry proves an exit only where procfs is mounted and lists processes at all.
    case ProcStat::Read::Missing: return procfs_lists_processes(proc_root) ? Liveness::Dead : Liveness::Unknown;
    case ProcStat::Read::Unreadable: return Liveness::Unknown;
    case ProcStat::Read::Ok: break;
  }
  if (stat.state == 'Z' || stat.state == 'X') return Liveness::Dead;
  // Without the start time it recorded, the process cannot tell a reused pid from itself.
  if (process.start_time == kUnknownStartTime) return Liveness::Unknown;
  return stat.start_time == process.start_time ? Liveness::Alive : Liveness::Dead;
}

}  // namespace nxd
