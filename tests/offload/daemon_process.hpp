// The real longattn-offload-server as a child process, for tests that measure what only a
// separate process shows: its resident memory and CPU time from /proc, its start-up checks and
// its log lines (stderr goes to a file the test reads).
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace longattn::offload::test {

inline std::string daemon_path() {
  const auto self = std::filesystem::read_symlink("/proc/self/exe");
  return (self.parent_path() / "longattn-offload-server").string();
}

// A scratch folder removed when the test ends.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    path = std::filesystem::temp_directory_path() /
           ("longattn-offload-" + std::to_string(::getpid()) + "-" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

class Daemon {
 public:
  // Starts the daemon with `args` (after the program name); `open_files` > 0 sets its soft and hard
  // open-file limits first. Returns once it printed LISTENING, or exited, or `within` passed.
  Daemon(const std::vector<std::string>& args, const std::string& stderr_file, long open_files = 0,
         std::chrono::milliseconds within = std::chrono::seconds(10))
      : stderr_file_(stderr_file) {
    int fds[2];
    if (::pipe(fds) != 0) return;
    const std::string exe = daemon_path();
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fds[1], 1);
      std::FILE* err = std::fopen(stderr_file.c_str(), "w");
      if (err) ::dup2(::fileno(err), 2);
      ::close(fds[0]);
      if (open_files > 0) {
        rlimit lim{static_cast<rlim_t>(open_files), static_cast<rlim_t>(open_files)};
        ::setrlimit(RLIMIT_NOFILE, &lim);
      }
      std::vector<char*> argv{const_cast<char*>(exe.c_str())};
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(exe.c_str(), argv.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_fd_ = fds[0];
    ::fcntl(out_fd_, F_SETFL, ::fcntl(out_fd_, F_GETFL) | O_NONBLOCK);  // read_line waits with a deadline
    const std::string first = read_line(within);
    if (first.rfind("LISTENING ", 0) == 0) port_ = std::stoi(first.substr(10));
  }
  ~Daemon() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) ::close(out_fd_);
  }
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  int port() const { return port_; }  // 0 when it did not start
  pid_t pid() const { return pid_; }

  // Its exit status once it ended within `within`; -1 when it is still running (then killed).
  int wait_exit(std::chrono::milliseconds within) {
    const auto end = std::chrono::steady_clock::now() + within;
    while (std::chrono::steady_clock::now() < end) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return -1;
  }

  std::string stderr_text() const {
    std::ifstream in(stderr_file_);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  // A field of /proc/PID/status in kB (VmRSS, VmHWM).
  long status_kb(const std::string& field) const {
    std::ifstream in("/proc/" + std::to_string(pid_) + "/status");
    std::string line;
    while (std::getline(in, line))
      if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
    return -1;
  }

  // User + system CPU time so far, in seconds (/proc/PID/stat fields 14 and 15).
  double cpu_seconds() const {
    std::ifstream in("/proc/" + std::to_string(pid_) + "/stat");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::istringstream rest(text.substr(text.rfind(')') + 2));  // the command name may hold spaces
    std::string field;
    long utime = 0, stime = 0;
    for (int i = 3; i <= 15 && rest >> field; ++i) {
      if (i == 14) utime = std::stol(field);
      if (i == 15) stime = std::stol(field);
    }
    return static_cast<double>(utime + stime) / static_cast<double>(::sysconf(_SC_CLK_TCK));
  }

  // The next line of its stdout ("" at its end, or when none came within `within`).
  std::string read_line(std::chrono::milliseconds within) {
    const auto end = std::chrono::steady_clock::now() + within;
    std::string line;
    while (std::chrono::steady_clock::now() < end) {
      char ch;
      const auto n = ::read(out_fd_, &ch, 1);
      if (n == 1) {
        if (ch == '\n') return line;
        line += ch;
      } else if (n == 0) {
        return line;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    }
    return line;
  }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  int port_ = 0;
  std::string stderr_file_;
};

// A token file the daemon accepts (mode 0600), holding `token`.
inline std::string write_token_file(const TempDir& dir, const std::string& token) {
  const std::string path = dir.file("token");
  {
    std::ofstream(path) << token << "\n";
  }
  std::filesystem::permissions(path, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  return path;
}

}  // namespace longattn::offload::test
