// See tcp_bootstrap.hpp. The wire structs are fixed-size and carry a magic number, so a stray
// connection to the rendezvous port (or a different program on it) is refused, not misread.
#include "comm/tcp_bootstrap.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "common/check.hpp"

namespace longattn::comm {
namespace {

constexpr std::uint32_t kMagic = 0x4c415443;  // "LATC"
constexpr std::size_t kNameBytes = 64;
constexpr std::size_t kReasonBytes = 512;

struct Hello {  // rank r -> rank 0 at the rendezvous
  std::uint32_t magic;
  std::int32_t rank;
  std::int32_t world_size;
  std::uint16_t listen_port;
  char hostname[kNameBytes];
};
struct TableHeader {  // rank 0 -> every rank: 0 and the table, or 1 and why the job was refused
  std::uint32_t magic;
  std::uint32_t refused;
  char reason[kReasonBytes];
};
struct TableEntry {
  char address[kNameBytes];
  char hostname[kNameBytes];
  std::uint16_t port;
};
struct MeshHello {  // rank i -> rank j > ... when the mesh connects
  std::uint32_t magic;
  std::int32_t rank;
};

void copy_name(char (&to)[kNameBytes], const std::string& from) {
  std::memset(to, 0, kNameBytes);
  from.copy(to, kNameBytes - 1);
}
std::string name_of(const char (&from)[kNameBytes]) { return std::string(from, strnlen(from, kNameBytes)); }

std::string this_hostname() {
  char name[256] = {};
  if (gethostname(name, sizeof name - 1) != 0) return "unknown-host";
  return name;
}

Deadline deadline_after(std::chrono::seconds timeout) { return std::chrono::steady_clock::now() + timeout; }

// Rank 0: gathers every other rank's hello, checks the job, answers with the table or the refusal.
std::vector<TableEntry> rendezvous_as_master(tcp::acceptor& acceptor, const TcpRendezvous& where,
                                             std::vector<std::unique_ptr<tcp::socket>>& peers, std::chrono::seconds timeout) {
  const int size = where.world_size;
  std::vector<TableEntry> table(static_cast<std::size_t>(size));
  copy_name(table[0].hostname, this_hostname());
  std::string refusal;
  const Deadline deadline = deadline_after(timeout);
  for (int joined = 1; joined < size; ++joined) {
    std::string missing;
    for (int r = 1; r < size; ++r)
      if (!peers[static_cast<std::size_t>(r)]) missing += fmt::format("{}{}", missing.empty() ? "" : ", ", r);
    auto socket = std::make_unique<tcp::socket>(
        accept_before(acceptor, deadline, fmt::format("rank(s) {} of {} at the rendezvous port {}", missing, size, acceptor.local_endpoint().port())));
    const std::string from = socket->remote_endpoint().address().to_string();
    Hello hello{};
    read_before(*socket, &hello, sizeof hello, deadline, "a process connecting from " + from);
    LONGATTN_REQUIRE(hello.magic == kMagic, ErrorCode::protocol,
                     "a process at {} connected to the rendezvous port {} but is not a longattn rank; is another program "
                     "using this port? Choose another MASTER_PORT (longattn listens on MASTER_PORT + its offset)",
                     from, acceptor.local_endpoint().port());
    const int r = hello.rank;
    if (refusal.empty() && hello.world_size != size)
      refusal = fmt::format("rank {} (on {}) has WORLD_SIZE={} but rank 0 has WORLD_SIZE={}: launch every rank with the same world "
                            "size", r, name_of(hello.hostname), hello.world_size, size);
    if (refusal.empty() && (r <= 0 || r >= size))
      refusal = fmt::format("a process on {} has RANK={}, outside 1..{} (rank 0 is {})", name_of(hello.hostname), r, size - 1,
                            name_of(table[0].hostname));
    if (refusal.empty() && peers[static_cast<std::size_t>(r)])
      refusal = fmt::format("two processes have RANK={} (on {} and {}): give every process its own rank", r,
                            name_of(table[static_cast<std::size_t>(r)].hostname), name_of(hello.hostname));
    if (!refusal.empty()) {
      // Answer this process and everyone already joined; later ones find the port closed.
      TableHeader no{kMagic, 1, {}};
      refusal.copy(no.reason, kReasonBytes - 1);
      write_all(*socket, &no, sizeof no, "rank " + std::to_string(r));
      for (auto& p : peers)
        if (p) write_all(*p, &no, sizeof no, "a joined rank");
      throw Error(ErrorCode::invalid_argument, refusal);
    }
    auto& entry = table[static_cast<std::size_t>(r)];
    copy_name(entry.address, from);
    copy_name(entry.hostname, name_of(hello.hostname));
    entry.port = hello.listen_port;
    peers[static_cast<std::size_t>(r)] = std::move(socket);
  }
  TableHeader yes{kMagic, 0, {}};
  for (int r = 1; r < size; ++r) {
    auto& p = *peers[static_cast<std::size_t>(r)];
    write_all(p, &yes, sizeof yes, "rank " + std::to_string(r));
    write_all(p, table.data(), table.size() * sizeof(TableEntry), "rank " + std::to_string(r));
  }
  return table;
}

// Rank r > 0: says who it is to rank 0 and reads the table.
std::vector<TableEntry> rendezvous_as_member(boost::asio::io_context& io, const TcpRendezvous& where, std::uint16_t listen_port,
                                             std::vector<std::unique_ptr<tcp::socket>>& peers, std::chrono::seconds timeout) {
  const Deadline deadline = deadline_after(timeout);
  const std::string master = fmt::format("rank 0 (the master, {}:{})", where.master_addr, where.master_port);
  auto socket = std::make_unique<tcp::socket>(connect_with_retry(io, where.master_addr, where.master_port, deadline, "rank 0 (the master)"));
  Hello hello{kMagic, where.rank, where.world_size, listen_port, {}};
  copy_name(hello.hostname, this_hostname());
  write_all(*socket, &hello, sizeof hello, master);
  TableHeader header{};
  read_before(*socket, &header, sizeof header, deadline_after(timeout), master + " while the other ranks joined");
  LONGATTN_REQUIRE(header.magic == kMagic, ErrorCode::protocol, "{} answered with something that is not longattn's rendezvous", master);
  LONGATTN_REQUIRE(!header.refused, ErrorCode::invalid_argument, "the master refused the job: {}",
                   std::string(header.reason, strnlen(header.reason, kReasonBytes)));
  std::vector<TableEntry> table(static_cast<std::size_t>(where.world_size));
  read_before(*socket, table.data(), table.size() * sizeof(TableEntry), deadline_after(timeout), master);
  peers[0] = std::move(socket);
  return table;
}

}  // namespace

TcpMesh build_mesh(boost::asio::io_context& io, const TcpRendezvous& where, std::chrono::seconds timeout) {
  LONGATTN_INVALID(where.world_size >= 1, "WORLD_SIZE must be at least 1, got {}", where.world_size);
  LONGATTN_INVALID(where.rank >= 0 && where.rank < where.world_size, "RANK={} is outside [0, WORLD_SIZE={})", where.rank, where.world_size);
  TcpMesh mesh;
  mesh.rank = where.rank;
  mesh.size = where.world_size;
  mesh.peers.resize(static_cast<std::size_t>(mesh.size));
  if (mesh.size == 1) {
    mesh.hostnames = {this_hostname()};
    mesh.addresses = {"self"};
    return mesh;
  }
  LONGATTN_INVALID(where.master_port > 0 && where.master_port <= std::numeric_limits<std::uint16_t>::max(),
                   "the rendezvous port {} is outside 1..65535 (MASTER_PORT plus the offset)", where.master_port);

  // Rank 0 listens at the rendezvous port; the others on a port of the system's choosing, which
  // the table tells every rank. Listening starts before the rendezvous, so a connection from a
  // higher rank waits in the backlog until it is accepted.
  const bool master = mesh.rank == 0;
  tcp::acceptor acceptor(io);
  const tcp::endpoint listen_at(tcp::v4(), master ? static_cast<std::uint16_t>(where.master_port) : 0);
  boost::system::error_code ec;
  acceptor.open(listen_at.protocol(), ec);
  if (!ec) acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) acceptor.bind(listen_at, ec);
  if (!ec) acceptor.listen(tcp::socket::max_listen_connections, ec);
  LONGATTN_REQUIRE(!ec, ErrorCode::communication, "rank {} cannot listen on TCP port {}: {}{}", mesh.rank, listen_at.port(), ec.message(),
                   master ? "; another job may hold it: choose another MASTER_PORT" : "");
  const auto table = master ? rendezvous_as_master(acceptor, where, mesh.peers, timeout)
                            : rendezvous_as_member(io, where, acceptor.local_endpoint().port(), mesh.peers, timeout);

  for (const auto& entry : table) {
    mesh.hostnames.push_back(name_of(entry.hostname));
    mesh.addresses.push_back(fmt::format("{}:{}", name_of(entry.address), entry.port));
  }
  mesh.addresses[0] = fmt::format("{}:{}", where.master_addr, where.master_port);
  auto who = [&](int r) { return fmt::format("rank {} ({}, {})", r, mesh.hostnames[static_cast<std::size_t>(r)], mesh.addresses[static_cast<std::size_t>(r)]); };

  // The mesh: connect to every lower rank but 0 (the rendezvous connection is that link), then
  // accept every higher one.
  const Deadline deadline = deadline_after(timeout);
  for (int j = 1; j < mesh.rank; ++j) {
    const auto& entry = table[static_cast<std::size_t>(j)];
    auto socket = std::make_unique<tcp::socket>(connect_with_retry(io, name_of(entry.address), entry.port, deadline, who(j)));
    const MeshHello hello{kMagic, mesh.rank};
    write_all(*socket, &hello, sizeof hello, who(j));
    mesh.peers[static_cast<std::size_t>(j)] = std::move(socket);
  }
  if (!master) {
    for (int accepted = mesh.rank + 1; accepted < mesh.size; ++accepted) {
      auto socket = std::make_unique<tcp::socket>(accept_before(acceptor, deadline, fmt::format("ranks {}..{} to connect to rank {}", mesh.rank + 1, mesh.size - 1, mesh.rank)));
      MeshHello hello{};
      read_before(*socket, &hello, sizeof hello, deadline, "a rank connecting to rank " + std::to_string(mesh.rank));
      const int k = hello.rank;
      LONGATTN_REQUIRE(hello.magic == kMagic && k > mesh.rank && k < mesh.size && !mesh.peers[static_cast<std::size_t>(k)],
                       ErrorCode::protocol, "rank {} got an unexpected connection (rank {}) while the mesh was being built", mesh.rank, k);
      mesh.peers[static_cast<std::size_t>(k)] = std::move(socket);
    }
  }
  return mesh;
}

}  // namespace longattn::comm
