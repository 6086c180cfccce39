// The owned file descriptor: closed once, when its last owner goes, and never by a moved-from one.
#include <fcntl.h>
#include <gtest/gtest.h>

#include <type_traits>

#include "file_descriptor.hpp"

namespace nxd::testing {
namespace {

bool is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

static_assert(!std::is_copy_constructible_v<FileDescriptor> && !std::is_copy_assignable_v<FileDescriptor>);
static_assert(std::is_nothrow_move_constructible_v<FileDescriptor> &&
              std::is_nothrow_move_assignable_v<FileDescriptor>);

TEST(FileDescriptor, ClosesWhenItsLastOwnerGoes) {
  int raw = -1;
  {
    FileDescriptor first(::open("/dev/null", O_RDONLY));
    ASSERT_TRUE(first.valid());
    raw = first.get();
    FileDescriptor second(std::move(first));
    EXPECT_FALSE(first.valid());
    EXPECT_EQ(second.get(), raw);
    first = FileDescriptor();  // destroying an empty one closes nothing
    EXPECT_TRUE(is_open(raw));
  }
  EXPECT_FALSE(is_open(raw));
}

TEST(FileDescriptor, MoveAssignmentClosesTheDescriptorItReplaces) {
  FileDescriptor kept(::open("/dev/null", O_RDONLY));
  FileDescriptor replaced(::open("/dev/null", O_RDONLY));
  const int kept_raw = kept.get();
  const int replaced_raw = replaced.get();
  replaced = std::move(kept);
  EXPECT_FALSE(is_open(replaced_raw));
  EXPECT_EQ(replaced.get(), kept_raw);
  EXPECT_TRUE(is_open(kept_raw));
}

TEST(FileDescriptor, ReleaseHandsTheDescriptorOverUnclosed) {
  int raw = -1;
  {
    FileDescriptor owner(::open("/dev/null", O_RDONLY));
    raw = owner.release();
  }
  EXPECT_TRUE(is_open(raw));
  ::close(raw);
}

}  // namespace
}  // namespace nxd::testing
