//! Kernel object names. The kernel cuts them at 15 bytes, so they are short and kept in one place.

pub const PROG_BIND4: &str = "pg_bind4";
pub const PROG_CONNECT4: &str = "pg_connect4";
pub const PROG_POST_BIND4: &str = "pg_post_bind4";
pub const PROG_SENDMSG4: &str = "pg_sendmsg4";
pub const PROG_SOCK_RELEASE: &str = "pg_sock_release";
pub const PROG_BIND6: &str = "pg_bind6";
pub const PROG_CONNECT6: &str = "pg_connect6";
pub const PROG_POST_BIND6: &str = "pg_post_bind6";
pub const PROG_SENDMSG6: &str = "pg_sendmsg6";

/// Every program the daemon loads and attaches, in attach order. Accounting programs
/// (release, post-bind) go first so that no port the deciding programs hand out goes uncounted.
pub const ALL_PROGRAMS: [&str; 9] = [
    PROG_SOCK_RELEASE,
    PROG_POST_BIND4,
    PROG_POST_BIND6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_BIND4,
    PROG_BIND6,
    PROG_CONNECT4,
    PROG_CONNECT6,
];

pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_SCOPE_BY_CGROUP: &str = "SCOPE_BY_CGROUP";
pub const MAP_RULES: &str = "RULES";
pub const MAP_BIND_ALLOW: &str = "BIND_ALLOW";
pub const MAP_PORT_OWNER: &str = "PORT_OWNER";
pub const MAP_PORT_HELD: &str = "PORT_HELD";
pub const MAP_SOCKETS: &str = "SOCKETS";
pub const MAP_SCOPE_NAMES: &str = "SCOPE_NAMES";
pub const MAP_RESERVED: &str = "RESERVED";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_LOST_EVENTS: &str = "LOST_EVENTS";
pub const MAP_PORT_SHARED: &str = "PORT_SHARED";
pub const MAP_TUPLES: &str = "TUPLES";
pub const MAP_SOCKET_TUPLES: &str = "SOCKET_TUPLES";
pub const MAP_TIME_WAIT: &str = "TIME_WAIT";
pub const MAP_BUSY_HINT: &str = "BUSY_HINT";
pub const MAP_DEST_COUNTERS: &str = "DEST_COUNTERS";
pub const MAP_PORT_SECRET: &str = "PORT_SECRET";

pub const ALL_MAPS: [&str; 19] = [
    MAP_CONFIG,
    MAP_SCOPE_BY_CGROUP,
    MAP_RULES,
    MAP_BIND_ALLOW,
    MAP_PORT_OWNER,
    MAP_PORT_HELD,
    MAP_SOCKETS,
    MAP_SCOPE_NAMES,
    MAP_RESERVED,
    MAP_COUNTERS,
    MAP_EVENTS,
    MAP_LOST_EVENTS,
    MAP_PORT_SHARED,
    MAP_TUPLES,
    MAP_SOCKET_TUPLES,
    MAP_TIME_WAIT,
    MAP_BUSY_HINT,
    MAP_DEST_COUNTERS,
    MAP_PORT_SECRET,
];
