// Identifies a process across address spaces and tells whether it still runs.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

namespace nxd {

// A pid plus its start time, so a recycled pid is not mistaken for the original process.
// Copied into shared memory, so it must stay trivially copyable.
struct ProcessIdentity {
  int32_t pid;
  uint64_t start_time;  // clock ticks after boot; kUnknownStartTime where /proc could not tell
};
static_assert(std::is_trivially_copyable_v<ProcessIdentity> && std::is_standard_layout_v<ProcessIdentity>);

inline constexpr uint64_t kUnknownStartTime = 0;

// What /proc says of a process. Unknown means /proc could not be read or parsed (EACCES under
// a hardened mount, no /proc in a container, a format we do not know): callers must not take
// it for an exit, only keep waiting, so the timeout, not a guess, ends the wait.
enum class Liveness : uint8_t { Alive, Dead, Unknown };

const char* liveness_name(Liveness liveness);

ProcessIdentity current_process();

// Dead once the process has exited (no /proc entry, or an unreaped zombie) or its pid was
// reused (another start time). `proc_root` is where procfs is mounted.
Liveness process_liveness(const ProcessIdentity& process, const std::string& proc_root = "/proc");

}  // namespace nxd
