// Identifies a process across address spaces and tells whether it still runs.
#pragma once

#include <cstdint>

namespace nxd {

// A pid plus its start time, so a recycled pid is not mistaken for the original process.
struct ProcessIdentity {
  int32_t pid;
  uint64_t start_time;
};

ProcessIdentity current_process();

// False once the process has exited (including an unreaped zombie) or its pid was reused.
bool process_alive(const ProcessIdentity& process);

}  // namespace nxd
