#include "process_identity.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace nxd {
namespace {

struct ProcStat {
  bool found;
  char state;
  uint64_t start_time;
};

// Reads the state (field 3) and start time (field 22) of /proc/<pid>/stat.
ProcStat read_proc_stat(int32_t pid) {
  const std::string path = "/proc/" + std::to_string(pid) + "/stat";
  FILE* file = std::fopen(path.c_str(), "r");
  if (file == nullptr) return {false, 0, 0};
  char buffer[1024];
  const size_t n = std::fread(buffer, 1, sizeof(buffer) - 1, file);
  std::fclose(file);
  buffer[n] = '\0';
  // The command name (field 2) is in parentheses and may itself hold spaces or ')'.
  const char* cursor = std::strrchr(buffer, ')');
  if (cursor == nullptr || cursor[1] == '\0' || cursor[2] == '\0') return {false, 0, 0};
  const char state = cursor[2];
  cursor += 3;
  for (int field = 4; field <= 22 && cursor != nullptr; ++field) {
    cursor = std::strchr(cursor, ' ');
    if (cursor != nullptr) ++cursor;
  }
  const uint64_t start_time = cursor != nullptr ? std::strtoull(cursor, nullptr, 10) : 0;
  return {true, state, start_time};
}

}  // namespace

ProcessIdentity current_process() {
  const auto pid = static_cast<int32_t>(::getpid());
  return {pid, read_proc_stat(pid).start_time};
}

bool process_alive(const ProcessIdentity& process) {
  const ProcStat stat = read_proc_stat(process.pid);
  if (!stat.found || stat.state == 'Z' || stat.state == 'X') return false;
  return stat.start_time == process.start_time;
}

}  // namespace nxd
