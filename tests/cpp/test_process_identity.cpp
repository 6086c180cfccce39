// Liveness from /proc: alive, dead (exited, zombie, pid reused) and unknown (/proc unreadable,
// unparsable or absent), on real processes and on a fake procfs tree.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "process_identity.hpp"

namespace nxd::testing {
namespace {

constexpr int32_t kFakePid = 4242;
constexpr uint64_t kFakeStart = 987654;

// A stat line as the kernel writes it: the command name may hold spaces and ')'.
std::string stat_line(char state, uint64_t start_time) {
  std::string line = std::to_string(kFakePid) + " (a b) c) " + state;
  for (int field = 4; field <= 21; ++field) line += " 0";
  return line + " " + std::to_string(start_time) + " 0 0\n";
}

// A directory laid out like /proc, with a `self` entry unless told otherwise.
class FakeProc : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/nxd-fake-proc-XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    root_ = pattern;
    ASSERT_EQ(::chmod(root_.c_str(), 0755), 0);
    write("self/stat", stat_line('R', 1));
  }
  void TearDown() override { std::system(("rm -rf " + root_).c_str()); }

  void write(const std::string& relative, const std::string& text) {
    const std::string path = root_ + "/" + relative;
    ::mkdir(path.substr(0, path.rfind('/')).c_str(), 0755);
    std::ofstream(path) << text;
  }
  std::string pid_dir() const { return root_ + "/" + std::to_string(kFakePid); }
  Liveness liveness(uint64_t recorded_start = kFakeStart) const {
    return process_liveness({kFakePid, recorded_start}, root_);
  }

  std::string root_;
};

TEST(ProcessLiveness, TheCurrentProcessIsAliveAndAnotherStartTimeIsAReusedPid) {
  const ProcessIdentity me = current_process();
  ASSERT_NE(me.start_time, kUnknownStartTime);
  EXPECT_EQ(process_liveness(me), Liveness::Alive);
  EXPECT_EQ(process_liveness({me.pid, me.start_time + 1}), Liveness::Dead);
}

TEST(ProcessLiveness, AnExitedChildIsDeadAsAZombieAndOnceReaped) {
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const ProcessIdentity me = current_process();
    const bool sent = ::write(pipe_fds[1], &me, sizeof(me)) == static_cast<ssize_t>(sizeof(me));
    ::_exit(sent ? 0 : 1);
  }
  ::close(pipe_fds[1]);
  ProcessIdentity identity{};
  ASSERT_EQ(::read(pipe_fds[0], &identity, sizeof(identity)), static_cast<ssize_t>(sizeof(identity)));
  ::close(pipe_fds[0]);
  siginfo_t info{};
  ASSERT_EQ(::waitid(P_PID, child, &info, WEXITED | WNOWAIT), 0);  // exited, not reaped: a zombie
  EXPECT_EQ(process_liveness(identity), Liveness::Dead);
  ASSERT_EQ(::waitpid(child, nullptr, 0), child);
  EXPECT_EQ(process_liveness(identity), Liveness::Dead);
}

TEST_F(FakeProc, AWellFormedEntryIsAliveUnlessAZombieOrAnotherStart) {
  write(std::to_string(kFakePid) + "/stat", stat_line('S', kFakeStart));
  EXPECT_EQ(liveness(), Liveness::Alive);
  EXPECT_EQ(liveness(kFakeStart + 1), Liveness::Dead);
  write(std::to_string(kFakePid) + "/stat", stat_line('Z', kFakeStart));
  EXPECT_EQ(liveness(), Liveness::Dead);
}

TEST_F(FakeProc, AMissingEntryIsDeadOnlyWhereProcListsProcesses) {
  EXPECT_EQ(liveness(), Liveness::Dead);
  ASSERT_EQ(::unlink((root_ + "/self/stat").c_str()), 0);  // like an empty, unmounted /proc
  EXPECT_EQ(liveness(), Liveness::Unknown);
}

TEST_F(FakeProc, AnUnreadableOrUnparsableEntryIsUnknown) {
  ASSERT_EQ(::mkdir(pid_dir().c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((pid_dir() + "/stat").c_str(), 0755), 0);  // read() fails with EISDIR
  EXPECT_EQ(liveness(), Liveness::Unknown);
  ASSERT_EQ(::rmdir((pid_dir() + "/stat").c_str()), 0);
  write(std::to_string(kFakePid) + "/stat", "4242 (truncated");
  EXPECT_EQ(liveness(), Liveness::Unknown);
  write(std::to_string(kFakePid) + "/stat", stat_line('S', kFakeStart));
  EXPECT_EQ(liveness(kUnknownStartTime), Liveness::Unknown);  // no start time to tell a reused pid
}

// EACCES, as under a /proc mounted with hidepid or a stricter LSM: the child drops root (which
// would read past the mode bits) before it looks.
TEST_F(FakeProc, PermissionDeniedIsUnknownNotDead) {
  write(std::to_string(kFakePid) + "/stat", stat_line('S', kFakeStart));
  ASSERT_EQ(::chmod((pid_dir() + "/stat").c_str(), 0), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) ::_exit(100);
    ::_exit(static_cast<int>(liveness()));
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_NE(WEXITSTATUS(status), 100) << "could not drop root in the child";
  EXPECT_EQ(static_cast<Liveness>(WEXITSTATUS(status)), Liveness::Unknown)
      << liveness_name(static_cast<Liveness>(WEXITSTATUS(status)));
}

}  // namespace
}  // namespace nxd::testing
