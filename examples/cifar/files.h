#pragma once

// Files that lose nothing: written atomically with checked I/O, and read back
// only after an integrity check.
//
// `write_file_atomically(path, bytes)` writes `bytes` to `path.tmp.<pid>`,
// checking every write, fsync and close, then renames it over `path`: on any
// failure (a full disk, a file-size limit, a vanished directory) the
// temporary file is removed, `path` is left exactly as it was, and a one-line
// std::runtime_error names the file and the system's reason. The writer
// holds an exclusive flock on its temporary file until it is renamed, so
// that `remove_stale_temporaries` tells a killed writer's leftover (no lock:
// the kernel drops it with the process) from a live one's, whatever the
// process ids (which a sandbox may hand out again at once).
//
// `seal` / `unseal` frame a payload with a header of our own (magic, format
// version, payload size, CRC-32 of the payload and of the header), so that a
// checkpoint with any byte changed, cut short or grown is refused before
// LibTorch's parser sees it. CRC-32 detects every change of up to 32
// consecutive bits and all but 2^-32 of the others; it guards against
// corruption, not against a deliberately forged file.

#include <csignal>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

namespace cifar {

/// A file that is missing, unreadable, unwritable, corrupt or of the wrong
/// kind; the message names the file.
struct FileError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

inline std::string system_reason(int error) {
  return std::strerror(error);
}

/// fsync a file or directory by path; best effort for directories.
inline void sync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

/// The temporary name `write_file_atomically` writes `path` under.
inline std::string temporary_name(const std::string& path, long pid) {
  return path + ".tmp." + std::to_string(pid);
}

} // namespace detail

/// Writes `bytes` to `path` atomically (see the file comment). Throws
/// FileError; `path` is then unchanged and no temporary file is left.
inline void write_file_atomically(
    const std::string& path,
    std::string_view bytes) {
  const std::string tmp = detail::temporary_name(path, ::getpid());
  auto fail = [&](const std::string& what, int error) {
    ::unlink(tmp.c_str());
    throw FileError(
        "cannot write " + path + ": " + what + ": " +
        detail::system_reason(error) + " (the previous file is unchanged)");
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) {
    const int error = errno;
    throw FileError(
        "cannot write " + path + ": cannot create " + tmp + ": " +
        detail::system_reason(error) + " (the previous file is unchanged)");
  }
  // Held until the rename: a live writer's temporary file is never stale.
  if (::flock(fd, LOCK_EX) != 0) {
    const int error = errno;
    ::close(fd);
    fail("cannot lock " + tmp, error);
  }
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      const int error = n < 0 ? errno : EIO;
      ::close(fd);
      fail("write failed after " + std::to_string(done) + " bytes", error);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int error = errno;
    ::close(fd);
    fail("fsync failed", error);
  }
  // Renamed while still open, so the lock covers the temporary name until
  // it is gone; the data is on disk already (fsync).
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::close(fd);
    fail("rename from " + tmp + " failed", error);
  }
  if (::close(fd) != 0) {
    const int error = errno;
    throw FileError(
        "wrote " + path +
        " but closing it failed: " + detail::system_reason(error));
  }
  detail::sync_path(std::filesystem::absolute(path).parent_path().string());
}

/// Removes the temporary files that writers of `path` killed mid-write left
/// behind: a `path.tmp.<pid>` of another process that no writer holds the
/// lock of (the lock, not the process id, decides: ids may be reused).
/// Returns how many were removed. Only one run should write a given path at
/// a time; a second one started at the very moment a writer has created its
/// temporary file but not yet locked it could remove that file, and the
/// writer would then report a failed rename.
inline int remove_stale_temporaries(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path target = fs::absolute(path);
  const std::string prefix = target.filename().string() + ".tmp.";
  std::error_code ec;
  fs::directory_iterator it(target.parent_path(), ec);
  if (ec) {
    return 0;
  }
  int removed = 0;
  for (const auto& entry : it) {
    const std::string name = entry.path().filename().string();
    if (name.compare(0, prefix.size(), prefix) != 0) {
      continue;
    }
    const std::string digits = name.substr(prefix.size());
    if (digits.empty() ||
        digits.find_first_not_of("0123456789") != std::string::npos ||
        digits.size() > 9) {
      continue;
    }
    const long pid = std::stol(digits);
    if (pid == ::getpid()) {
      continue; // our own
    }
    const int fd = ::open(entry.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      continue;
    }
    // Locked: its writer is still writing. Unlocked: the writer is gone.
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0 && fs::remove(entry.path(), ec)) {
      ++removed;
    }
    ::close(fd);
  }
  return removed;
}

/// Reads the whole of `path`, which must be a regular file.
inline std::string read_file_bytes(const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    throw FileError(
        "cannot read " + path + ": " + detail::system_reason(errno));
  }
  if (!S_ISREG(info.st_mode)) {
    throw FileError("cannot read " + path + ": not a regular file");
  }
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    throw FileError(
        "cannot read " + path + ": " + detail::system_reason(errno));
  }
  std::string bytes;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      const int error = errno;
      ::close(fd);
      throw FileError(
          "cannot read " + path + ": " + detail::system_reason(error));
    }
    if (n == 0) {
      break;
    }
    bytes.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return bytes;
}

namespace detail {

/// "torchrev-sealed" and a NUL; then format version, payload size, payload
/// CRC-32 and header CRC-32 (little-endian).
constexpr char kSealMagic[16] = "torchrev-sealed";
constexpr uint32_t kSealVersion = 1;
constexpr size_t kSealHeaderBytes = 16 + 4 + 8 + 4 + 4;

inline uint32_t crc32_of(std::string_view bytes) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  size_t done = 0;
  while (done < bytes.size()) { // zlib takes uInt lengths
    const size_t n = std::min<size_t>(bytes.size() - done, 1u << 30);
    crc = ::crc32(
        crc,
        reinterpret_cast<const Bytef*>(bytes.data() + done),
        static_cast<uInt>(n));
    done += n;
  }
  return static_cast<uint32_t>(crc);
}

inline void put_le(std::string& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) {
    out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
  }
}

inline uint64_t get_le(std::string_view in, size_t offset, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) {
    value |= uint64_t(static_cast<unsigned char>(in[offset + i])) << (8 * i);
  }
  return value;
}

} // namespace detail

/// `payload` framed by the integrity header (see the file comment).
inline std::string seal(std::string_view payload) {
  std::string out(detail::kSealMagic, sizeof(detail::kSealMagic));
  detail::put_le(out, detail::kSealVersion, 4);
  detail::put_le(out, payload.size(), 8);
  detail::put_le(out, detail::crc32_of(payload), 4);
  detail::put_le(out, detail::crc32_of(out), 4);
  out.append(payload);
  return out;
}

/// The payload of a sealed file's bytes, after checking the header, the size
/// and both checksums. Throws FileError naming `path` and what is wrong.
inline std::string_view unseal(
    std::string_view sealed,
    const std::string& path) {
  using namespace detail;
  auto fail = [&](const std::string& what) {
    throw FileError(path + ": " + what);
  };
  if (sealed.size() < kSealHeaderBytes ||
      sealed.compare(
          0,
          sizeof(kSealMagic),
          std::string_view(kSealMagic, sizeof(kSealMagic))) != 0) {
    fail(
        "not a torchrev sealed file (no header; written by another program "
        "or an older version?)");
  }
  if (static_cast<uint32_t>(get_le(sealed, 32, 4)) !=
      crc32_of(sealed.substr(0, 32))) {
    fail("corrupt header (checksum mismatch)");
  }
  const uint64_t version = get_le(sealed, 16, 4);
  if (version != kSealVersion) {
    fail(
        "format version " + std::to_string(version) + ", expected " +
        std::to_string(kSealVersion));
  }
  const uint64_t size = get_le(sealed, 20, 8);
  if (size != sealed.size() - kSealHeaderBytes) {
    fail(
        "truncated or extended: the header says " + std::to_string(size) +
        " bytes of data, the file has " +
        std::to_string(sealed.size() - kSealHeaderBytes));
  }
  auto payload = sealed.substr(kSealHeaderBytes);
  if (static_cast<uint32_t>(get_le(sealed, 28, 4)) != crc32_of(payload)) {
    fail(
        "corrupt (checksum mismatch: the file was changed after it was "
        "written)");
  }
  return payload;
}

} // namespace cifar
